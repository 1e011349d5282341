"""Llama.abort_eval(): an evaluation stops mid-batch, on the CPU within a node of the graph, and the context goes on
exactly.

A CPU context takes a long prompt in batches of several ubatches computed layer by layer (one llama_decode each):
a server whose client went away, checking between batches, would compute the whole prompt first. The abort
callback (the C module's, installed on the context) stops llama.cpp's CPU backend between two nodes; eval() raises
EvalAborted and the batch's tokens are not kept. Evaluating them again must give the same logits bytes as a context
that never stopped, on the direct path, in both orders (layer by layer, and llama.cpp's: whose earlier ubatches are
in the cells when the abort comes, and must go)."""
from __future__ import annotations

import threading
import time

import pytest

from conftest import heavy_direct, kv_written, last_logits, prompt_tokens
from dualblade import EvalAborted

N_CTX = 4096
PROMPT = 3600


def _direct(heavy_path, tmp_path, **kw):
    tmp_path.mkdir()
    return heavy_direct(heavy_path, tmp_path, N_CTX, **kw)


def _written(llm) -> int:
    return kv_written(llm.kv_stats())


def _abort_once_under_way(llm, written0: int, after: int, seen: list) -> None:
    """Asks llm to stop once the evaluation has written `after` bytes more than written0 (the batch under way)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        w = _written(llm) - written0
        if w > after:
            seen.append(w)
            llm.abort_eval()
            return
        time.sleep(0.002)


@pytest.mark.slow
@pytest.mark.parametrize("order", ["layer-major", "llama.cpp"])
def test_an_evaluation_stops_mid_batch_and_goes_on_exactly(heavy_path, tmp_path, order, monkeypatch):
    kw = {}
    if order == "llama.cpp":  # each ubatch through every layer: a batch of several (the caller's n_batch)
        monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", "0")
        kw = {"n_batch": N_CTX, "n_ubatch": 1024}
    ref = _direct(heavy_path, tmp_path / "ref", **kw)
    try:
        tokens = prompt_tokens(ref, PROMPT)
        ref.eval(tokens[:200])
        w0 = _written(ref)
        ref.eval(tokens[200:])
        full = _written(ref) - w0  # what the prompt's batch writes, computed to its end
        want = last_logits(ref)
        want_next = ref.sample(temp=0.0)
    finally:
        ref.close()

    llm = _direct(heavy_path, tmp_path / "llm", **kw)
    try:
        assert llm.n_batch >= PROMPT - 200  # the rest of the prompt is one batch (one llama_decode)
        llm.eval(tokens[:200])
        w0, seen = _written(llm), []
        # stopped after its first ubatch's rows went to storage for some layers: in llama.cpp's order past the
        # first ubatch, layer by layer within the first segments
        stopper = threading.Thread(target=_abort_once_under_way, args=(llm, w0, full // 4, seen))
        stopper.start()
        with pytest.raises(EvalAborted, match="after 0 of 3400 tokens"):
            llm.eval(tokens[200:])
        stopper.join()
        assert seen and seen[0] < full  # it stopped with the batch under way
        assert _written(llm) - w0 < full
        assert llm.n_tokens == 200  # the first turn stays, the stopped batch is gone

        llm.eval(tokens[200:])  # the request was consumed: this one runs to its end
        assert last_logits(llm).tobytes() == want.tobytes()
        assert llm.sample(temp=0.0) == want_next

        # a request made between evaluations stops the next one at once; withdrawn, it does not
        llm.abort_eval()
        with pytest.raises(EvalAborted):
            llm.eval(tokens[:1])
        assert llm.n_tokens == PROMPT
        llm.abort_eval()
        llm.abort_eval(False)
        llm.eval(tokens[:1])
        assert llm.n_tokens == PROMPT + 1
    finally:
        llm.close()
