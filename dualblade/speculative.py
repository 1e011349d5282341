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

# where drafts keep failing: after this many tokens without drafts, two are tried again; each probe that fails
# doubles the wait, up to PROBE_MAX
PROBE_MIN, PROBE_MAX = 8, 128


class Speculation(LlamaDraftModel):
    """The caller's draft model, asked for k drafts, k adapting to how many were accepted lately."""

    def __init__(self, draft: LlamaDraftModel, k_max: int):
        self.draft = draft
        self.k_max = max(1, k_max)
        self.k = self.k_max
        self.wait = 0  # tokens left before a probe, while k == 0
        self.probe = PROBE_MIN
        self.last_k: Optional[int] = None  # drafts handed out for the batch about to be evaluated
        self.pending: Optional[tuple[int, int]] = None  # (position of the token before them, how many)
        self.passes = self.drafted = self.accepted = self.plain = 0

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        # generate asks for the next drafts as soon as it knows how far the last batch held: the context up to
        # the token just sampled, which goes first in the next batch
        self._settle_at(len(input_ids) - 1)
        if self.k == 0:
            self.wait -= 1
            if self.wait > 0:
                self.last_k = None
                return np.array([], dtype=np.intc)
            self.k = 2  # a probe
        drafts = np.asarray(self.draft(input_ids, **kwargs), dtype=np.intc)[:self.k]
        self.last_k = len(drafts) or None
        return drafts

    def begin(self, n_past: int, n_tokens: int) -> None:
        """An evaluation of n_tokens at n_past starts: settles the last verification batch (how far generate kept
        it: n_past is where it goes on from), and notes whether this one is one."""
        self._settle_at(n_past)
        if self.last_k is not None and n_tokens == self.last_k + 1:
            self.pending = (n_past, self.last_k)
        elif n_tokens == 1:
            self.plain += 1
        self.last_k = None

    def _settle_at(self, n_past: int) -> None:
        """The last verification batch (at p, k drafts) was kept up to n_past: p + 1 + the drafts accepted."""
        if self.pending is not None:
            p, k = self.pending
            self.pending = None
            if n_past >= p + 1:  # else the context was reset or rewound: not a verdict on the drafts
                self._settle(min(k, n_past - p - 1), k)

    def _settle(self, accepted: int, k: int) -> None:
        self.passes += 1
        self.drafted += k
        self.accepted += accepted
        if accepted == k:
            self.k = min(self.k_max, max(self.k, 2 * k))  # all right: as many again, up to the most
            self.probe = PROBE_MIN
        elif accepted == 0:
            self.k //= 2
            if self.k == 0:
                self.wait = self.probe
                self.probe = min(PROBE_MAX, 2 * self.probe)
        else:
            self.k = max(1, min(self.k_max, accepted + 1))
            self.probe = PROBE_MIN

    def stats(self) -> dict:
        """drafted, accepted, passes (verification batches), mean_accepted_length (tokens a pass produced: the
        accepted drafts and the token sampled after them), k (drafts asked for now)."""
        return {"drafted": self.drafted, "accepted": self.accepted, "passes": self.passes,
                "mean_accepted_length": (self.accepted + self.passes) / self.passes if self.passes else None,
                "acceptance": self.accepted / self.drafted if self.drafted else None, "k": self.k,
                "k_max": self.k_max}


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


def lookup(spec: str) -> PromptLookup:
    """`lookup` or `lookup:N`: drafts from the context (PromptLookup), N tokens at most (default 10). ValueError
    with the fix otherwise."""
    name, sep, n = spec.partition(":")
    if name != "lookup" or (sep and not (n.isdigit() and 1 <= int(n) <= 63)):
        raise ValueError(f"--draft {spec!r}: use lookup or lookup:N with N from 1 to 63 drafted tokens")
    return PromptLookup(num_pred_tokens=int(n) if n else 10)


# --- workloads (the bench and the tests): real text, where drafts from the context win, and where they fail ---

_DOCUMENTS = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/GPL-3")


def document() -> str:
    """A long real document that ships with the system: a license text (Debian's common-licenses, else Python's
    own LICENSE.txt). FileNotFoundError naming where it looked if none is there."""
    import os
    import sys

    py = os.path.join(sys.base_prefix, "lib", "python%d.%d" % sys.version_info[:2], "LICENSE.txt")
    for path in (*_DOCUMENTS, py):
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
    raise FileNotFoundError(f"no license text to use as a document in {', '.join((*_DOCUMENTS, py))}")


def repeat_prompt(n_chars: int = 6000) -> str:
    """'repeat': a document, then the start of one of its passages to go on copying (the case drafts from the
    context win: the continuation repeats the passage)."""
    doc = document()[:n_chars]
    # the passage: a line in the middle of the document, long enough to be unambiguous
    lines = [ln for ln in doc.splitlines() if len(ln.strip()) > 40]
    start = lines[len(lines) // 2].strip()
    return f"{doc}\n\nThe passage above that begins \"{start[:30]}\", quoted word for word:\n\n{start}"


FRESH_TEXT = ("Notes from a walk along the northern coast, written the same evening. The tide was out when we "
              "left the harbour, and the sand flats reached almost to the lighthouse. A heron stood in the shallows "
              "near the old pier, and two boys were digging for bait where the channel bends. By noon the wind had "
              "turned, the sky over the hills went grey, and we sheltered in a barn that smelled of hay and diesel. ")


def fresh_prompt(n_chars: int = 6000) -> str:
    """'fresh': a document, then unrelated prose to continue (drafts from the context mostly fail)."""
    return document()[:n_chars] + "\n\n" + FRESH_TEXT
