"""Speculative decoding over offloaded KV (issue 22), on the bundled Gemma-3-270M (real text: drafts are accepted).

The oracle is the same model with every KV layer in RAM and the same draft model (stock llama_cpp 0.3.36 cannot run
draft_model= at all: test_stock_fails_where_the_drop_in_runs). Rejected drafts' rows are removed from every tier
(the cells go empty, the next rows overwrite them), so every policy must give the oracle's tokens and logits bytes,
through rejections, a layer switch of auto between a verification batch and its rejection, a session saved right
after a rejection, and a prompt whose history was cut (the chat drops old turns)."""
from __future__ import annotations

import ctypes
import os
from contextlib import closing

import numpy as np
import pytest

import llama_cpp
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

from conftest import min_budget
from dualblade import Llama
from dualblade.speculative import PromptLookup, Speculation, fresh_prompt, lookup, repeat_prompt

N_CTX = 4096
N_GEN = 48


def _logits(llm) -> bytes:
    """The last evaluated position's logits, as bytes."""
    p = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return bytes(ctypes.string_at(p, llm.n_vocab() * 4))


def _generate(llm, tokens, n=N_GEN, each=None):
    out = []
    for t in llm.generate(tokens, temp=0.0, top_k=1):
        out.append(t)
        if each is not None:
            each(llm, len(out))
        if len(out) >= n:
            break
    return out


def _open(gemma_path, tmp_path, policy, draft=True, **kw):
    args = dict(n_ctx=N_CTX, flash_attn=True, verbose=False, seed=1, kv_policy=policy)
    tmp_path.mkdir(parents=True, exist_ok=True)
    if policy in ("direct", "auto"):
        args.update(mem_budget=min_budget(gemma_path, N_CTX, "direct"), kv_dir=str(tmp_path))
    elif policy == "mmap":
        args.update(mem_budget="1M", kv_dir=str(tmp_path))
    if draft:
        args["draft_model"] = PromptLookup()
    args.update(kw)
    return Llama(str(gemma_path), **args)


@pytest.fixture(scope="module")
def repeat_tokens(gemma_path):
    with closing(Llama(str(gemma_path), vocab_only=True, verbose=False)) as v:
        return v.tokenize(repeat_prompt().encode())


@pytest.fixture(scope="module")
def oracle(gemma_path, repeat_tokens, tmp_path_factory):
    """Every layer in RAM, the same draft model: tokens and the last logits after N_GEN tokens."""
    with closing(_open(gemma_path, tmp_path_factory.mktemp("oracle"), "ram")) as llm:
        out = _generate(llm, repeat_tokens)
        spec = llm.kv_stats()["speculation"]
        return out, _logits(llm), spec


def test_stock_fails_where_the_drop_in_runs(gemma_path, repeat_tokens):
    """The issue's report: stock llama_cpp 0.3.36 with draft_model= fails on a prompt longer than a batch (its
    scores matrix has n_batch rows; a verification batch's rows go past them). The drop-in runs it."""
    kw = dict(n_ctx=N_CTX, flash_attn=True, verbose=False, seed=1,
              draft_model=LlamaPromptLookupDecoding(num_pred_tokens=10))
    with closing(llama_cpp.Llama(str(gemma_path), **kw)) as stock:
        with pytest.raises(ValueError, match="broadcast"):
            _generate(stock, repeat_tokens, n=4)
    with closing(Llama(str(gemma_path), kv_policy="ram", **kw)) as llm:
        assert len(_generate(llm, repeat_tokens, n=16)) == 16
        assert llm.kv_stats()["speculation"]["passes"] > 0


def test_drafts_are_accepted_and_rejected(oracle):
    out, _, spec = oracle
    assert len(out) == N_GEN
    # real text that repeats: most drafts are right, some are not (both paths of the verification run)
    assert spec["passes"] > 0 and spec["accepted"] > 0 and spec["drafted"] > spec["accepted"], spec
    assert spec["mean_accepted_length"] > 1.5, spec


@pytest.mark.parametrize("policy", ["mmap", "direct", "auto"])
def test_offloaded_policies_equal_the_oracle(gemma_path, repeat_tokens, oracle, policy, tmp_path):
    with closing(_open(gemma_path, tmp_path, policy)) as llm:
        out = _generate(llm, repeat_tokens)
        st = llm.kv_stats()
        assert st["layers_by_path"][policy if policy != "auto" else "direct"] + st["layers_by_path"]["mmap"] > 0
        assert out == oracle[0]
        assert _logits(llm) == oracle[1], "logits differ from the all-in-RAM run"
        assert st["speculation"]["accepted"] == oracle[2]["accepted"]
        assert st["speculation"]["drafted"] == oracle[2]["drafted"]


def test_storage_bytes_per_generated_token(gemma_path, repeat_tokens, tmp_path):
    """kv_stats()["generation"]: what the generation steps read from storage per token they generated. A
    verification batch reads each direct layer once for all its tokens: with drafts that hold, the bytes per
    generated token fall by about the mean accepted length."""
    got = {}
    for draft in (False, True):
        with closing(_open(gemma_path, tmp_path / str(draft), "direct", draft=draft)) as llm:
            _generate(llm, repeat_tokens)
            st = llm.kv_stats()
        g = st["generation"]
        assert g["tokens"] == N_GEN - 1 and g["bytes_read"] > 0, g  # the first token comes from the prompt's pass
        assert g["bytes_read_per_token"] == g["bytes_read"] / g["tokens"]
        if draft:
            assert st["speculation"]["bytes_read_per_token"] == g["bytes_read_per_token"]
            assert st["speculation"]["mean_accepted_length"] > 1.5
        got[draft] = (g["bytes_read_per_token"], st["speculation"])
    print(f"bytes per generated token: plain {got[False][0]:.0f}, drafts {got[True][0]:.0f} "
          f"(mean accepted length {got[True][1]['mean_accepted_length']:.2f})")
    assert got[True][0] < got[False][0] / 1.4


def test_a_layer_switch_between_a_batch_and_its_rejection(gemma_path, repeat_tokens, oracle, tmp_path):
    """auto: layers move between the direct path and the page cache while generate runs, after every token, so
    that verification batches are written on one path and rolled back on the other."""
    paths = ["direct", "mmap"]
    moved: list[int] = []

    def flip(llm, n):
        for i, layer in enumerate(moved):
            llm.kv_set_path(layer, paths[(n + i) % 2])

    with closing(_open(gemma_path, tmp_path, "auto")) as llm:
        offloaded = [x["layer"] for x in llm.kv_stats()["layers"] if x["path"] in paths]
        moved += offloaded[::3]
        assert len(moved) >= 2, llm.kv_stats()["layers"]
        out = _generate(llm, repeat_tokens, each=flip)
        assert llm.kv_stats()["switch_count"] > 0
        assert out == oracle[0]
        assert _logits(llm) == oracle[1]


def test_a_session_saved_right_after_a_rejection(gemma_path, repeat_tokens, oracle, tmp_path):
    """The step in which a verification batch was cut short: saved there, loaded into a fresh context on another
    policy, generation goes on exactly as the oracle's. Batches of 512, fewer than the prompt's tokens: llama_cpp
    turns logits_all on for a draft_model and sizes its scores for one batch; the session keeps no logits (it once
    saved a batch's rows, the loader found them short of the history and called the file damaged)."""
    small = dict(n_batch=512, n_ubatch=512)
    with closing(_open(gemma_path, tmp_path / "a", "direct", **small)) as llm:
        saved = saved_after_a_rejection(llm, repeat_tokens, tmp_path / "s.dbs")
        assert len(repeat_tokens) > 512 and os.path.getsize(saved[1]) < llm.n_tokens * llm.n_vocab(), \
            "the session kept the drafts' logits"
    with closing(_open(gemma_path, tmp_path / "b", "mmap", **small)) as fresh:
        assert resumed(fresh, repeat_tokens, *saved) == oracle[0]


def saved_after_a_rejection(llm, tokens, path):
    """Generates until the last verification batch settled had a rejection, saves the session there: (its tokens,
    path). Shared with test_gpu_speculative.py."""
    out = []
    gen = llm.generate(tokens, temp=0.0, top_k=1)
    for t in gen:
        before = llm.kv_stats()["speculation"]
        out.append(t)
        if len(out) > 4 and before["drafted"] > before["accepted"]:
            break  # the last batch settled had a rejection
    gen.close()
    assert len(out) < N_GEN, "no rejection happened"
    llm.save_session(path)
    return out, path


def resumed(fresh, tokens, out, path):
    """The session loaded into a fresh context, generation goes on to N_GEN: every token."""
    fresh.load_session(path)
    return out + _generate(fresh, tokens + out, n=N_GEN - len(out))


def test_a_cut_history_and_a_new_prompt(gemma_path, repeat_tokens, tmp_path):
    """The chat drops old turns when the context fills: the next prompt shares only a prefix with the cache, whose
    rest (drafts included) is removed before it is evaluated. Same tokens as the oracle doing the same."""
    cut = repeat_tokens[:200] + repeat_tokens[900:]

    def two_turns(llm):
        first = _generate(llm, repeat_tokens, n=24)
        return first, _generate(llm, cut + first, n=24), _logits(llm)

    with closing(_open(gemma_path, tmp_path / "o", "ram")) as llm:
        want = two_turns(llm)
    with closing(_open(gemma_path, tmp_path / "d", "direct")) as llm:
        assert two_turns(llm) == want


def test_without_drafts_the_tokens_are_nearly_the_same(gemma_path, repeat_tokens, oracle, tmp_path):
    """Against the run without speculation: batched and single-token evaluation may round differently. Reported,
    and bounded: the first tokens agree."""
    with closing(_open(gemma_path, tmp_path, "ram", draft=False)) as llm:
        plain = _generate(llm, repeat_tokens)
        assert llm.kv_stats()["speculation"] is None
    differ = sum(a != b for a, b in zip(plain, oracle[0]))
    print(f"speculative vs plain: {differ} of {N_GEN} tokens differ")
    assert plain[:8] == oracle[0][:8]


# --- the draft policy, without a model ---

class _Fixed:
    """A draft model that always offers the same tokens."""
    num_pred_tokens = 8

    def __init__(self, toks):
        self.toks = np.array(toks, dtype=np.intc)

    def __call__(self, input_ids, **kw):
        return self.toks


def _simulate(spec, steps: int, accept, t1: float, dt: float) -> list[int]:
    """generate's side of `steps` steps: drafts asked for (the context up to the token sampled last), the batch
    evaluated (timed t1 + k dt), accept(k) of its drafts kept. The drafts asked for, step by step."""
    n, ks = 100, []
    for _ in range(steps):
        k = len(spec(np.zeros(n + 1, dtype=np.intc)))
        spec.begin(n, 1 + k)
        spec.timed(1 + k, t1 + k * dt)
        n += 1 + (min(k, accept(k)) if k else 0)
        ks.append(k)
    return ks


def test_failing_drafts_stop_and_are_probed_again():
    # none holds: drafting stops, two are tried now and then
    spec = Speculation(_Fixed(list(range(8))), k_max=8)
    ks = _simulate(spec, 200, lambda k: 0, t1=0.010, dt=0.008)
    assert ks[0] == 8 and ks[-60:].count(0) >= 50, ks
    probes = [k for k in ks[20:] if k]
    assert probes and set(probes) == {2}, ks
    assert spec.stats()["drafted"] < 80
    # the step times, as measured (for the stats): a plain step, and what a draft adds
    assert abs(spec.stats()["step_s"] - 0.010) < 1e-6 and abs(spec.stats()["draft_s"] - 0.008) < 1e-4


def test_drafts_that_hold_a_third_of_the_time_still_pay():
    # a verification batch reads the KV once: a third of the drafts holding is worth a draft or two per step
    rng = np.random.default_rng(1)
    spec = Speculation(_Fixed(list(range(8))), k_max=8)

    def accept(k):  # each draft holds with p = 1/3, up to the first that fails
        j = 0
        while j < k and rng.random() < 1 / 3:
            j += 1
        return j
    ks = _simulate(spec, 300, accept, t1=0.100, dt=0.001)
    assert sum(1 for k in ks[20:] if k > 0) > 0.9 * len(ks[20:]), ks
    assert 0.2 < spec.stats()["rate"] < 0.5


def test_drafts_that_hold_go_to_the_most():
    spec = Speculation(_Fixed(list(range(8))), k_max=8)
    ks = _simulate(spec, 60, lambda k: k, t1=0.030, dt=0.004)
    assert ks[-20:].count(8) >= 18, ks
    assert spec.stats()["mean_accepted_length"] > 7


def test_a_reset_is_not_a_verdict():
    spec = Speculation(_Fixed([1, 2, 3]), k_max=3)
    spec(np.arange(5, dtype=np.intc))
    spec.begin(500, 4)
    spec.begin(0, 300)  # reset(): a new prompt from position 0
    assert spec.stats()["passes"] == 0 and spec.k == 3


def test_prompt_lookup_takes_the_latest_longest_match():
    ids = np.array([5, 1, 2, 9, 9, 7, 1, 2, 3, 4, 8, 0, 1, 2], dtype=np.intc)
    # suffix [1, 2]: at 1-2 (then 9 9 7) and at 6-7 (then 3 4 8): the latest
    assert PromptLookup(num_pred_tokens=3)(ids).tolist() == [3, 4, 8]
    # a longer suffix decides: [0, 1, 2] ... [5, 1, 2] differ, the longest match wins over the latest shorter one
    ids2 = np.array([7, 1, 2, 6, 6, 3, 1, 2, 5, 5, 7, 1, 2], dtype=np.intc)
    assert PromptLookup(num_pred_tokens=2)(ids2).tolist() == [6, 6]
    assert PromptLookup()(np.array([1, 2, 3], dtype=np.intc)).tolist() == []
    assert PromptLookup()(np.array([4], dtype=np.intc)).tolist() == []


def test_the_draft_argument():
    assert lookup("lookup").num_pred_tokens == 10
    assert lookup("lookup:4").num_pred_tokens == 4
    for bad in ("lookahead", "lookup:0", "lookup:64", "lookup:x", "lookup:"):
        with pytest.raises(ValueError, match="use lookup or lookup:N"):
            lookup(bad)


def test_fresh_text_backs_off(gemma_path, tmp_path):
    with closing(Llama(str(gemma_path), vocab_only=True, verbose=False)) as v:
        toks = v.tokenize(fresh_prompt().encode())
    with closing(_open(gemma_path, tmp_path, "ram")) as llm:
        _generate(llm, toks, n=64)
        spec = llm.kv_stats()["speculation"]
    # drafts that fail are not asked for again at full length: at most about half of a full draft per token
    assert spec["drafted"] <= 64 * spec["k_max"] // 2, spec


# --- the commands ---

def _chat(*args, text):
    from conftest import run_cli

    return run_cli("chat", "-c", "2048", "-n", "48", "--temp", "0", "--seed", "1", "--stats", *args,
                   input=text.replace("\n", " ") + "\n", timeout=300)


def test_chat_with_lookup_drafts(tmp_path):
    from conftest import no_traceback

    text = repeat_prompt(3000)
    oracle = _chat("--policy", "ram", "--draft", "lookup", text=text)
    p = _chat("--policy", "direct", "--mem-budget", "9M", "--kv-dir", str(tmp_path), "--draft", "lookup:8", text=text)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert p.stdout == oracle.stdout and p.stdout.strip()
    line = [ln for ln in p.stderr.splitlines() if "drafts" in ln]
    assert line, p.stderr
    accepted, drafted = (int(x) for x in line[-1].split("drafts ")[1].split(" ")[0].split("/"))
    assert 0 < accepted <= drafted, line


def test_chat_with_a_draft_model(gemma_path, tmp_path):
    """The model drafting for itself (it shares its own vocabulary): nearly every draft is accepted."""
    text = repeat_prompt(2000)
    p = _chat("--policy", "direct", "--mem-budget", "9M", "--kv-dir", str(tmp_path), "--draft-model",
              str(gemma_path), text=text)
    assert p.returncode == 0, p.stderr
    line = [ln for ln in p.stderr.splitlines() if "drafts" in ln][-1]
    accepted, drafted = (int(x) for x in line.split("drafts ")[1].split(" ")[0].split("/"))
    assert accepted >= 0.8 * drafted > 0, line


@pytest.mark.parametrize("args, word", [
    (["--draft", "lookahead"], "--draft"),
    (["--draft", "lookup:99"], "lookup:N"),
    (["--draft", "lookup", "--draft-model", "x.gguf"], "give one of them"),
    (["--draft-model", "/nonexistent/draft.gguf"], "draft.gguf"),
])
def test_bad_draft_options_are_one_line_errors(args, word):
    from conftest import assert_user_error, run_cli

    for cmd in ("chat", "serve"):
        p = run_cli(cmd, *(["--port", "0"] if cmd == "serve" else []), *args, input="hi\n", timeout=120)
        assert_user_error(p, word)


def test_a_draft_model_of_another_vocabulary_is_refused(tiny_path):
    from conftest import assert_user_error, run_cli

    p = run_cli("chat", "--draft-model", str(tiny_path), input="hi\n", timeout=120)
    assert_user_error(p, "vocabulary")


def test_serve_with_lookup_drafts(tmp_path, gemma_path):
    from test_serve import Server

    s = Server("--policy", "direct", "--mem-budget", "9M", "--draft", "lookup", tmp=tmp_path)
    try:
        r = s.client().completions.create(model=gemma_path.name[:-len(".gguf")], prompt=repeat_prompt(3000),
                                          max_tokens=48, temperature=0, seed=0)
        assert r.choices[0].text.strip() and r.usage.completion_tokens == 48
        status, _, kv = s.request("GET", "/v1/kv")
        assert status == 200 and kv["speculation"]["accepted"] > 0, kv["speculation"]
        # storage bytes per generated token, as kv_stats() gives them
        assert kv["generation"]["tokens"] >= 47 and kv["speculation"]["bytes_read_per_token"] > 0, kv["generation"]
    finally:
        log = s.stop()
    assert "Traceback" not in log, log


def test_bench_with_drafts(tmp_path):
    """bench --draft: both workloads, with and without drafts, per policy; exact against the all-in-RAM run."""
    import json

    from conftest import no_traceback, run_cli

    out = tmp_path / "spec.json"
    p = run_cli("bench", "--draft", "lookup:6", "-c", "2048", "-p", "1200", "-n", "12", "-r", "1", "--budgets",
                "50%", "--policies", "ram,direct", "--kv-dir", str(tmp_path), "--no-cgroup", "--json", str(out),
                timeout=900)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["mode"] == "speculative" and res["workload"]["draft"] == "lookup:6"
    assert {(e["workload"], e["policy"]) for e in res["pairs"]} == {(w, q) for w in ("repeat", "fresh")
                                                                     for q in ("ram", "direct")}
    for e in res["pairs"]:
        assert e["plain_tok_s"] > 0 and e["draft_tok_s"] > 0 and e["mean_accepted_length"] >= 1, e
    direct = [r for r in res["rows"] if r["policy"] == "direct"]
    assert direct and all(r["tokens_equal_ram"] for r in direct), direct
    assert all(r["decode_bytes_read_per_token"] > 0 for r in direct)
    assert "tokens a pass" not in p.stdout and "accepted len" in p.stdout


def test_bench_with_a_draft_model(gemma_path, tmp_path):
    """bench --draft-model: the model drafting for itself, a cell per workload with and without; exact, and its
    drafts mostly accepted (the same model)."""
    import json

    from conftest import no_traceback, run_cli

    out = tmp_path / "spec.json"
    p = run_cli("bench", "--draft-model", str(gemma_path), "-c", "2048", "-p", "1200", "-n", "12", "-r", "1",
                "--budgets", "50%", "--policies", "direct", "--kv-dir", str(tmp_path), "--no-cgroup", "--json",
                str(out), timeout=900)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["workload"]["draft"] == f"model:{gemma_path}"
    direct = [r for r in res["rows"] if r["policy"] == "direct" and r["draft"]]
    assert direct and all(r["tokens_equal_ram"] for r in direct), direct
    assert all(r["mean_accepted_length"] > 2 for r in direct), direct


@pytest.mark.parametrize("args, word", [
    (["--draft", "lookup:0"], "lookup:N"),
    (["--draft", "lookup", "--gpu"], "--gpu"),
    (["--draft", "lookup", "--draft-model", "x.gguf"], "give one of them"),
    (["--draft-model", "/nonexistent/draft.gguf"], "draft.gguf"),
])
def test_bench_bad_draft_options(args, word):
    from conftest import assert_user_error, run_cli

    assert_user_error(run_cli("bench", *args, "--no-cgroup", timeout=120), word)


def test_bench_draft_model_of_another_vocabulary(tiny_path):
    from conftest import assert_user_error, run_cli

    assert_user_error(run_cli("bench", "--draft-model", str(tiny_path), "--no-cgroup", timeout=120), "vocabulary")
