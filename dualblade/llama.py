"""`dualblade.Llama`: llama_cpp.Llama with the KV cache under dualblade's residency module."""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import llama_cpp

from . import _native
from .config import KVConfig
from .errors import PolicyNotAvailableError

# storage paths land with the residency engine; until then only "ram" is honoured
_AVAILABLE_POLICIES = ("ram",)


class Llama(llama_cpp.Llama):
    """A drop-in for ``llama_cpp.Llama``: same arguments and methods, plus

    mem_budget: bytes (int) or a size string ("2G", "1.5GiB", "512M", "64MiB") that pinned KV and
        staging memory may use; None for no budget.
    kv_policy: "ram" | "mmap" | "direct" | "auto": where KV layers that do not fit the budget go.
    kv_dir: directory for the KV file; kv_device: a raw block device or partition instead.
    """

    def __init__(self, model_path: str, *args, mem_budget: int | str | None = None, kv_policy: str = "ram",
                 kv_dir: Optional[str] = None, kv_device: Optional[str] = None, **kwargs):
        # validate before anything heavy is loaded
        self._kv_config = KVConfig.from_args(mem_budget, kv_policy, kv_dir, kv_device)
        if self._kv_config.policy not in _AVAILABLE_POLICIES:
            raise PolicyNotAvailableError(
                f"KV policy {self._kv_config.policy!r} is not available in this build yet "
                f"(storage residency lands with the next release); use kv_policy='ram' (CLI: --policy ram)")
        self._kv_session = _native.Session(self._kv_config.policy, self._kv_config.budget_bytes,
                                           self._kv_config.kv_dir, self._kv_config.kv_device)
        self.eval_progress: Optional[Callable[[int, int], None]] = None
        self._counters = {"eval_tokens": 0, "eval_s": 0.0, "sampled": 0}
        with self._kv_session.bound():
            super().__init__(model_path, *args, **kwargs)

    def kv_stats(self) -> dict:
        """Placement and I/O counters of the KV cache, as the C module reports them."""
        st = self._kv_session.stats()
        st["kv_dir"] = self._kv_config.kv_dir
        st["kv_device"] = self._kv_config.kv_device
        return st

    def counters(self) -> dict:
        """Tokens evaluated and sampled so far, and the time spent evaluating (for status lines)."""
        return dict(self._counters)

    def eval(self, tokens: Sequence[int]):
        # evaluated batch by batch so that a long prompt can report progress; same result as one call
        total = len(tokens)
        start = time.perf_counter()
        done = 0
        while done < total or total == 0:
            batch = tokens[done:done + self.n_batch]
            super().eval(batch)
            done += len(batch)
            if self.eval_progress is not None and total > 1:
                self.eval_progress(done, total)
            if total == 0:
                break
        self._counters["eval_tokens"] += total
        self._counters["eval_s"] += time.perf_counter() - start

    def sample(self, *args, **kwargs):
        token = super().sample(*args, **kwargs)
        self._counters["sampled"] += 1
        return token

    def close(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may have stopped before the parent set up
            super().close()
        session = getattr(self, "_kv_session", None)
        if session is not None:
            session.release()
