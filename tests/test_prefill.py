"""A prefill reads each offloaded layer about once (issue 21), on the CPU build, through kv_stats()'s byte counters.

A layer's rows below a ubatch are read back (staged from storage, or copied into VRAM) once per ubatch, so a P-token
prompt in llama-cpp-python's 512-token ubatches reads O(P^2/512) bytes. A context with offloaded layers processes
its prompt in large ubatches (placement.prefill_ubatch), with llama.cpp's compute buffers reserved for the outputs a
ubatch asks for rather than for every token's logits (patch 0005)."""
from __future__ import annotations

import pytest

from conftest import min_budget, prompt_tokens
from dualblade import Llama, placement
from dualblade.gguf_header import model_info

N_CTX = 4096
PROMPT = 3600


def _bytes(llm) -> tuple[int, int]:
    """Storage bytes read and written by the offloaded layers so far."""
    layers = [layer for layer in llm.kv_stats()["layers"] if layer["path"] in ("mmap", "direct")]
    assert layers, "no layer is offloaded"
    return sum(layer["bytes_read"] for layer in layers), sum(layer["bytes_written"] for layer in layers)


@pytest.mark.slow
def test_a_prefill_reads_each_offloaded_layer_about_once(heavy_path, tmp_path):
    kw = dict(n_ctx=N_CTX, mem_budget=min_budget(heavy_path, N_CTX, "direct"), kv_policy="direct",
              kv_dir=str(tmp_path), flash_attn=True, verbose=False)
    llm = Llama(str(heavy_path), **kw)
    try:
        assert llm.n_batch == placement.prefill_ubatch(model_info(heavy_path), N_CTX, gpu=False) == 1536  # n_ctx/3
        llm.eval(prompt_tokens(llm, PROMPT))
        read, written = _bytes(llm)
        assert written > PROMPT * 16 * 1024  # most of the prompt's rows are on storage (32 KiB a token)
        # ubatches of 1536, 1536, 528: the second reads 1536 rows, the third 3072 (1.28x the 3600 written)
        assert read <= 1.35 * written, (read, written)
        # the next turn reads the layers once more, not once per 512 tokens
        llm.eval(prompt_tokens(llm, 400)[:300])
        read2, written2 = _bytes(llm)
        assert read2 - read <= 1.1 * written + (written2 - written)
    finally:
        llm.close()

    # the same prompt in llama-cpp-python's 512-token ubatches: the counters see each layer read once per ubatch
    small = Llama(str(heavy_path), n_batch=512, n_ubatch=512, **kw)
    try:
        small.eval(prompt_tokens(small, PROMPT))
        read, written = _bytes(small)
        assert read > 2.5 * written, (read, written)
    finally:
        small.close()


def test_the_prefill_ubatch_follows_the_compute_allowance(heavy_path):
    info = model_info(heavy_path)
    # small contexts: the whole context in one ubatch
    assert placement.prefill_ubatch(info, 2048, gpu=False) == 2048
    # longer ones: a third of the context (each layer read about once by a prompt that fills it), in 256s
    assert placement.prefill_ubatch(info, 16384, gpu=False) == placement.prefill_ubatch(info, 16384, gpu=True) == 5632
    # long ones: as large as the allowance holds (the mask grows with the context), larger on a GPU
    host, gpu = placement.prefill_ubatch(info, 131072, gpu=False), placement.prefill_ubatch(info, 131072, gpu=True)
    assert 512 <= host < gpu < 131072 // 3 and host % 256 == 0 and gpu % 256 == 0
    per_token = 2 * 131072 + 4 * (3 * info.n_ff + 4 * info.n_embd)
    assert host * per_token <= placement.PREFILL_COMPUTE_HOST < (host + 256) * per_token
    assert gpu * 2 * 131072 <= placement.PREFILL_MASK_HOST  # the GPU's masks stay in host memory
