"""Speculative decoding over offloaded KV (issue 22): a verification batch of k drafted tokens reads each layer's KV
once for all k, so where decode is storage-bound the bytes per generated token fall by the mean accepted length.

llama-cpp-python's `Llama.generate` drives it: it asks `draft_model(input_ids)` for drafts, evaluates the last
sampled token with them in one batch, samples each position and, at the first mismatch, drops the rest
(`kv_cache_seq_rm`: the cells go empty in every tier, and the next rows overwrite them). `Speculation` wraps the
caller's draft model: it asks for as many drafts as have lately been worth it, backs off to none where they keep
failing (probing again now and then), and counts what was drafted and accepted. dualblade.Llama's eval asks
llama.cpp for the logits of a verification batch's positions only, never for a prompt's every token (patch 0005's
cap, OUTPUTS_MAX), and copies none of them through Python."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from llama_cpp.llama_speculative import LlamaDraftModel, LlamaPromptLookupDecoding

# where drafting does not pay: after this many tokens without drafts, two are tried again (to see whether the drafts
# got better); each probe that does not pay doubles the wait, up to PROBE_MAX
PROBE_MIN, PROBE_MAX = 8, 128
EMA = 0.2  # weight of the newest sample in the running estimates
# What a draft adds to a step, as a share of a one-token step. Fixed, not measured: k then depends on the tokens
# alone, so that every tier and the all-in-RAM run draft alike and give the same tokens (batched and single-token
# evaluation round differently). Measured (kv_stats: step_s, draft_s): 0.01-0.02 on the CPU where decode reads the
# weights once per step and the output row is small; 0.29 for Gemma-3-270M all in RAM (55 ms a step, 16 ms a draft:
# each drafted position computes a 262,144-token output row), which is why drafts cost it 0.57-0.86x all in VRAM on
# the GPU (docs/benchmarks.md). Storage-bound steps make it small: there a verification batch's bytes dominate.
DRAFT_COST = 0.1


class Speculation(LlamaDraftModel):
    """The caller's draft model, asked for k drafts, k chosen to maximize the expected tokens per step: with a the
    share of drafts accepted lately, a pass of k drafts yields 1 + a + ... + a^k tokens on average and costs
    1 + k * DRAFT_COST steps. Where decode waits for storage a verification batch reads the KV once for all its
    tokens, so drafting pays even when few drafts hold; where none pays (drafts that keep failing): no drafts,
    and two tried now and then. The step times are measured for the stats (step_s, draft_s), not used."""

    def __init__(self, draft: LlamaDraftModel, k_max: int):
        self.draft = draft
        self.k_max = max(1, k_max)
        self.k = self.k_max
        self.wait = 0  # tokens left before a probe, while k == 0
        self.probe = PROBE_MIN
        self.rate = 0.5  # drafts accepted / drafted, running
        self.t1: Optional[float] = None  # seconds of a one-token step, running
        self.dt: Optional[float] = None  # seconds a draft adds to a step, running
        self.last_k: Optional[int] = None  # drafts handed out for the batch about to be evaluated
        self.pending: Optional[tuple[int, int]] = None  # (position of the token before them, how many)
        self.passes = self.drafted = self.accepted = 0

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        # generate asks for the next drafts as soon as it knows how far the last batch held: the context up to
        # the token just sampled, which goes first in the next batch
        self._settle_at(len(input_ids) - 1)
        if self.k == 0:
            self.wait -= 1
            if self.wait > 0:
                self.last_k = None
                return np.array([], dtype=np.intc)
            self.k = min(2, self.k_max)  # a probe
        drafts = np.asarray(self.draft(input_ids, **kwargs), dtype=np.intc)[:self.k]
        self.last_k = len(drafts) or None
        return drafts

    def begin(self, n_past: int, n_tokens: int) -> None:
        """An evaluation of n_tokens at n_past starts: settles the last verification batch (how far generate kept
        it: n_past is where it goes on from), and notes whether this one is one."""
        self._settle_at(n_past)
        if self.last_k is not None and n_tokens == self.last_k + 1:
            self.pending = (n_past, self.last_k)
        self.last_k = None

    def timed(self, n_tokens: int, seconds: float) -> None:
        """A generation step of n_tokens (1: plain; more: the sampled token and its drafts) took seconds."""
        if n_tokens == 1:
            self.t1 = seconds if self.t1 is None else (1 - EMA) * self.t1 + EMA * seconds
        elif self.t1 is not None:
            per = max(0.0, seconds - self.t1) / (n_tokens - 1)
            self.dt = per if self.dt is None else (1 - EMA) * self.dt + EMA * per

    def _settle_at(self, n_past: int) -> None:
        """The last verification batch (at p, k drafts) was kept up to n_past: p + 1 + the drafts accepted."""
        if self.pending is not None:
            p, k = self.pending
            self.pending = None
            if n_past >= p + 1:  # else the context was reset or rewound: not a verdict on the drafts
                self._settle(min(k, n_past - p - 1), k)

    def _best_k(self) -> int:
        """The k of the most tokens per step (0: drafting does not pay)."""
        best, best_rate, tokens = 0, 1.0, 1.0
        for k in range(1, self.k_max + 1):
            tokens += self.rate ** k
            r = tokens / (1 + k * DRAFT_COST)
            if r > best_rate * 1.02:  # a clear gain only
                best, best_rate = k, r
        return best

    def _settle(self, accepted: int, k: int) -> None:
        self.passes += 1
        self.drafted += k
        self.accepted += accepted
        # acceptance of a draft, iid: the first rejection ends a pass, so a pass of k that kept j says j/(j+1)
        # of the drafts it looked at held (all k, if none failed)
        seen = min(k, accepted + 1)
        w = 1 - (1 - EMA / 2) ** seen  # each draft looked at moves the estimate
        self.rate = min(0.98, max(0.02, (1 - w) * self.rate + w * accepted / seen))
        self.k = self._best_k()
        if self.k == 0:
            self.wait = self.probe
            self.probe = min(PROBE_MAX, 2 * self.probe)
        else:
            self.probe = PROBE_MIN

    def stats(self) -> dict:
        """drafted, accepted, passes (verification batches), mean_accepted_length (tokens a pass produced: the
        accepted drafts and the token sampled after them), k (drafts asked for now)."""
        return {"drafted": self.drafted, "accepted": self.accepted, "passes": self.passes,
                "mean_accepted_length": (self.accepted + self.passes) / self.passes if self.passes else None,
                "acceptance": self.accepted / self.drafted if self.drafted else None, "k": self.k,
                "k_max": self.k_max, "step_s": self.t1, "draft_s": self.dt, "rate": self.rate}


class PromptLookup(LlamaPromptLookupDecoding):
    """Drafts from the context itself: the tokens that followed the latest earlier occurrence of the longest suffix
    (up to max_ngram_size tokens) of what has been generated. llama-cpp-python's LlamaPromptLookupDecoding takes
    the *first* occurrence of at most a bigram, which in a document that repeats its phrases is often the wrong
    one; the latest, of a longer n-gram, is the one a copy is most likely going on from."""

    def __init__(self, max_ngram_size: int = 6, num_pred_tokens: int = 10):
        super().__init__(max_ngram_size=max_ngram_size, num_pred_tokens=num_pred_tokens)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        ids = np.asarray(input_ids)
        n_ids = len(ids)
        # candidates: every earlier position whose token equals the last one, narrowed as the suffix grows
        cand = np.nonzero(ids[:-1] == ids[-1])[0] if n_ids > 1 else np.array([], dtype=np.intp)
        best = None
        for n in range(1, min(self.max_ngram_size, n_ids - 1) + 1):
            if n > 1:
                cand = cand[cand >= n - 1]
                cand = cand[ids[cand - (n - 1)] == ids[n_ids - n]]
            if len(cand) == 0:
                break
            best = cand[-1]  # the latest occurrence of the longest suffix so far
        if best is None:
            return np.array([], dtype=np.intc)
        return ids[best + 1:best + 1 + self.num_pred_tokens].astype(np.intc)


class ModelDraft(LlamaDraftModel):
    """Drafts from a small model that shares the target's vocabulary: its greedy continuation, num_pred_tokens
    tokens. Its own KV (small) stays where stock llama.cpp puts it (RAM, or VRAM with n_gpu_layers); its context
    follows the target's by prefix: what generate rejected is removed from it too before it drafts again."""

    def __init__(self, model_path: str, num_pred_tokens: int = 8, n_ctx: int = 4096, **kwargs: Any):
        import llama_cpp

        self.num_pred_tokens = num_pred_tokens
        self.llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, verbose=False, **kwargs)

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        llm = self.llm
        ids = np.asarray(input_ids, dtype=np.intc)
        k = min(self.num_pred_tokens, llm.n_ctx() - len(ids))
        if k <= 0 or len(ids) == 0:
            return np.array([], dtype=np.intc)
        # the prefix its KV already holds (at most all but the last token: that one is evaluated for its logits)
        have = llm.input_ids[:min(llm.n_tokens, len(ids) - 1)]
        diff = np.nonzero(have != ids[:len(have)])[0]
        llm.n_tokens = int(diff[0]) if len(diff) else len(have)
        llm.eval(ids[llm.n_tokens:].tolist())  # removes the cells above n_tokens first
        out = []
        for i in range(k):
            t = llm.sample(temp=0.0, top_k=1)
            out.append(t)
            if i + 1 < k:
                llm.eval([t])
        return np.array(out, dtype=np.intc)

    def close(self) -> None:
        self.llm.close()


def draft_from_args(draft: Optional[str], draft_model: Optional[str], target_vocab: int, n_ctx: int,
                    **kwargs: Any) -> Optional[LlamaDraftModel]:
    """The draft model the commands' --draft / --draft-model ask for (None: none). The draft model's file is
    checked before its weights are read: a GGUF whose vocabulary is the target's. ValueError naming the fix."""
    if draft is not None and draft_model is not None:
        raise ValueError("--draft and --draft-model both choose where drafts come from; give one of them")
    if draft is not None:
        return lookup(draft)
    if draft_model is None:
        return None
    check_draft_model(draft_model, target_vocab)
    return ModelDraft(str(draft_model), n_ctx=n_ctx, **kwargs)


def check_draft_model(draft_model: str, target_vocab: int) -> None:
    """A draft model's file, read no further than its header: a GGUF whose vocabulary is the target's (0: not
    checked). ValueError naming the fix."""
    from .config import check_model_file
    from .gguf_header import model_info

    check_model_file(str(draft_model))
    n_vocab = model_info(draft_model).n_vocab
    if target_vocab and n_vocab != target_vocab:
        raise ValueError(f"--draft-model {draft_model} has a vocabulary of {n_vocab} tokens, the model "
                         f"{target_vocab}: a draft model must share the model's tokenizer (a smaller model of the "
                         "same family)")


def lookup(spec: str) -> PromptLookup:
    """`lookup` or `lookup:N`: drafts from the context (PromptLookup), N tokens at most (default 10). ValueError
    with the fix otherwise."""
    name, sep, n = spec.partition(":")
    if name != "lookup" or (sep and not (n.isdigit() and 1 <= int(n) <= 63)):
        raise ValueError(f"--draft {spec!r}: use lookup or lookup:N with N from 1 to 63 drafted tokens")
    return PromptLookup(num_pred_tokens=int(n) if n else 10)


# --- workloads (the bench and the tests): real text, where drafts from the context win, and where they fail ---

_DOCUMENTS = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/GPL-3",
              "/usr/share/common-licenses/MPL-2.0", "/usr/share/common-licenses/LGPL-3")


def document() -> str:
    """A long real document that ships with the system: license texts (Debian's common-licenses, else Python's
    own LICENSE.txt), one after the other. FileNotFoundError naming where it looked if none is there."""
    import os
    import sys

    py = os.path.join(sys.base_prefix, "lib", "python%d.%d" % sys.version_info[:2], "LICENSE.txt")
    texts = []
    for path in (*_DOCUMENTS, py):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    if not texts:
        raise FileNotFoundError(f"no license text to use as a document in {', '.join((*_DOCUMENTS, py))}")
    return "\n\n".join(texts)


def repeat_prompt(n_chars: int = 6000) -> str:
    """'repeat': a document, then the start of one of its passages to go on copying (the case drafts from the
    context win: the continuation repeats the passage): three lines from late in it."""
    doc = document()[:n_chars]
    lines = doc.splitlines()
    at = next((i for i in range(max(2, int(len(lines) * 0.8)), len(lines)) if len(lines[i].strip()) > 40),
              len(lines) - 1)
    return doc + "\n\nQuoted from the text above:\n\n" + "\n".join(lines[max(0, at - 2):at + 1])


FRESH_TEXT = ("Notes from a walk along the northern coast, written the same evening. The tide was out when we "
              "left the harbour, and the sand flats reached almost to the lighthouse. A heron stood in the shallows "
              "near the old pier, and two boys were digging for bait where the channel bends. By noon the wind had "
              "turned, the sky over the hills went grey, and we sheltered in a barn that smelled of hay and diesel. ")


def fresh_prompt(n_chars: int = 6000) -> str:
    """'fresh': a document, then unrelated prose to continue (drafts from the context mostly fail)."""
    return document()[:n_chars] + "\n\n" + FRESH_TEXT


WORKLOADS = ("repeat", "fresh")


def workload_tokens(llm, workload: str, n_tokens: int) -> list[int]:
    """A prompt of exactly n_tokens for llm's tokenizer: the document (again from its start where it is too short),
    then the workload's tail ('repeat': the start of a passage of the document's part in the prompt, to quote;
    'fresh': unrelated prose)."""
    doc = document().encode()
    toks = llm.tokenize(doc)
    while len(toks) < n_tokens:
        toks += llm.tokenize(doc, add_bos=False)
    if workload == "repeat":
        # three lines from late in the prompt's part of the document: what a small model copies on from best
        body = llm.detokenize(toks[1:max(2, n_tokens - 160)]).decode(errors="ignore")
        lines = body.splitlines()
        at = next((i for i in range(max(2, int(len(lines) * 0.8)), len(lines)) if len(lines[i].strip()) > 40),
                  len(lines) - 1)
        tail = "\n\nQuoted from the text above:\n\n" + "\n".join(lines[max(0, at - 2):at + 1])
    elif workload == "fresh":
        tail = "\n\n" + FRESH_TEXT
    else:
        raise ValueError(f"workload {workload!r}: use one of {', '.join(WORKLOADS)}")
    tail_toks = llm.tokenize(tail.encode(), add_bos=False)
    return toks[:max(1, n_tokens - len(tail_toks))] + tail_toks
