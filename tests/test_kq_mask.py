"""The attention mask of one sequence in cell order (patch 0007) is the mask llama.cpp's general path makes.

llama.cpp fills a ubatch's KQ mask on the host, cell by cell; its general path checks each cell a token may see
differently from the token before, n_tokens^2 checks per ubatch, most of the mask's cost for a long prompt's large
ubatches (on a GPU, 0.1-0.3 s per graph at 30K). Patch 0007 writes each row of a single sequence whose cells hold
its positions in order as two runs (kept, dropped). The general path still serves any other batch: here the same
tokens, each also in a second sequence (n_seq_id 2, which the fast path leaves alone) with a unified KV cache, so
that the cells, n_kv and every other input are the same. The logits must be the same bytes, for several ubatches,
a second turn after a first, with flash attention (an f16 mask) and without (f32)."""
from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest

N_CTX = 1024


def _logits(model, tokens_per_turn: list[list[int]], n_seq: int, flash_attn: bool) -> list[bytes]:
    """Each turn's last logits, its tokens in n_seq sequences (0, then 1 too)."""
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = N_CTX, N_CTX, 256
    params.n_seq_max, params.kv_unified = 2, True
    params.n_threads = params.n_threads_batch = 2
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else \
        llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx, "no context"
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    out, pos = [], 0
    try:
        for tokens in tokens_per_turn:
            batch = llama_cpp.llama_batch_init(len(tokens), 0, 2)
            try:
                for i, t in enumerate(tokens):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos + i, n_seq
                    for s in range(n_seq):
                        batch.seq_id[i][s] = s
                    batch.logits[i] = i == len(tokens) - 1
                batch.n_tokens = len(tokens)
                assert llama_cpp.llama_decode(ctx, batch) == 0
            finally:
                llama_cpp.llama_batch_free(batch)
            pos += len(tokens)
            logits = llama_cpp.llama_get_logits_ith(ctx, -1)
            out.append(ctypes.string_at(logits, n_vocab * 4))
    finally:
        llama_cpp.llama_free(ctx)
    return out


@pytest.mark.parametrize("flash_attn", [True, False], ids=["f16-mask", "f32-mask"])
@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_the_in_order_mask_is_the_general_one(which, flash_attn, request):
    path = request.getfixturevalue(f"{which}_path")  # gemma: an iSWA cache, whose global layers' mask is this one
    mparams = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
    assert model
    try:
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
        rng = np.random.default_rng(7)
        turns = [rng.integers(1, n_vocab, 700).tolist(), rng.integers(1, n_vocab, 90).tolist()]  # 3 ubatches, then 1
        one = _logits(model, turns, 1, flash_attn)
        both = _logits(model, turns, 2, flash_attn)
        assert [len(x) for x in one] == [n_vocab * 4] * 2
        for turn, (a, b) in enumerate(zip(one, both)):
            assert a == b, f"turn {turn}: the in-order mask gives other logits than the general path"
        assert one[0] != one[1]
    finally:
        llama_cpp.llama_model_free(model)
