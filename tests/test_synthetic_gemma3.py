"""The synthetic gemma3 shape (iSWA: sliding-window layers and global ones) without the real Gemma file: it
loads as gemma3 with its window, and with most KV layers offloaded it gives the tokens and the logits, bit for
bit, of the all-in-RAM run, for a prompt longer than the window."""
from __future__ import annotations

from contextlib import closing

import llama_cpp
import numpy as np
import pytest

from conftest import last_logits, min_budget, prompt_tokens
from dualblade import Llama
from dualblade.gguf_header import model_info

N_CTX = 512
PROMPT_TOKENS = 300  # more than the 128-token window: the sliding-window layers mask the start
N_GEN = 16


@pytest.fixture(scope="module")
def gemma3_tiny(tmp_path_factory):
    """8 layers: 3 and 7 global, the others with a 128-token window; 4 heads on 1 KV head of 128 dims."""
    from dualblade.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("gemma3") / "gemma3-tiny.gguf", "gemma3-tiny", seed=1)


def _greedy(path, **kv) -> dict:
    """The prompt, then N_GEN greedy tokens one eval at a time: the tokens, the prompt's last logits and the
    final logits (as bytes), and kv_stats()."""
    with closing(Llama(str(path), n_ctx=N_CTX, flash_attn=True, verbose=False, seed=1, **kv)) as llm:
        llm.eval(prompt_tokens(llm, PROMPT_TOKENS))
        first = last_logits(llm).tobytes()
        out = []
        for _ in range(N_GEN):
            lg = np.frombuffer(last_logits(llm).tobytes(), np.float32)
            out.append(int(np.argmax(lg)))
            llm.eval([out[-1]])
        return {"tokens": out, "first": first, "last": last_logits(llm).tobytes(), "stats": llm.kv_stats()}


@pytest.fixture(scope="module")
def reference(gemma3_tiny):
    return _greedy(gemma3_tiny, kv_policy="ram")


def test_loads_as_iswa_gemma3(gemma3_tiny, capfd):
    info = model_info(gemma3_tiny)
    assert info.arch == "gemma3" and info.n_swa == 128 < PROMPT_TOKENS
    assert [l.swa for l in info.layers] == [True, True, True, False] * 2
    with closing(llama_cpp.Llama(str(gemma3_tiny), n_ctx=N_CTX, flash_attn=True, verbose=True, seed=1)) as llm:
        text = llm.create_completion("Once upon a time", max_tokens=N_GEN, temperature=0)["choices"][0]["text"]
        lg = np.frombuffer(last_logits(llm).tobytes(), np.float32)
    log = capfd.readouterr().err
    assert "arch                  = gemma3" in log and "n_swa                 = 128" in log, log[-3000:]
    assert "is_swa = 0" in log and "is_swa = 1" in log
    assert text.strip()
    assert np.isfinite(lg).all() and len(np.unique(lg)) > 1000  # random weights, but not a degenerate model


def test_reference_is_not_degenerate(reference):
    lg = np.frombuffer(reference["first"], np.float32)
    assert np.isfinite(lg).all() and len(np.unique(lg)) > 1000
    assert len(set(reference["tokens"])) > N_GEN // 2  # not one token over and over


@pytest.mark.parametrize("policy", ["mmap", "direct"])
def test_offloaded_equals_ram(gemma3_tiny, reference, policy, tmp_path):
    budget = min_budget(gemma3_tiny, N_CTX, "direct")  # the direct path's minimum: most layers offloaded
    got = _greedy(gemma3_tiny, kv_policy=policy, mem_budget=budget, kv_dir=str(tmp_path))
    st = got["stats"]
    offloaded = {l["layer"] for l in st["layers"] if l["path"] == policy}
    # sliding-window layers and at least one global layer off RAM
    assert offloaded - {3, 7} and offloaded & {3, 7}, st["layers"]
    if policy == "direct":
        assert len(offloaded) >= 6 and st["bytes_read"] > 0 and st["bytes_written"] > 0
    assert got["tokens"] == reference["tokens"]
    assert got["first"] == reference["first"]
    assert got["last"] == reference["last"], "final logits differ from the all-in-RAM run"
