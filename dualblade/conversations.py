"""Saved conversations of `dualblade serve`: one session file (dualblade/sessions.py) per conversation, in a
directory the server owns, named by the SHA-256 of the conversation's tokens; kept under a disk quota, least
recently used first out.

A request is matched against the saved conversations by its prompt's tokens (the longest common prefix), never
by anything the client names: a client that resumes a conversation has sent every token of it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sessions import SEC_APP, SEC_TOKENS, SUFFIX

_NAME = re.compile(r"^[0-9a-f]{64}$")


def token_key(tokens) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int32) != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


@dataclass
class Saved:
    key: str
    tokens: np.ndarray  # int32: the conversation as evaluated (prompt and reply)
    prompt_len: int     # the tokens of the prompt it answered: a request that shares them continues it
    size: int           # bytes on disk
    last_used: float


class ConversationStore:
    """The saved conversations of one model and KV geometry, in `directory` (created 0700)."""

    def __init__(self, directory: str | os.PathLike, quota_bytes: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.quota = int(quota_bytes)
        self.lock = threading.Lock()
        self.entries: dict[str, Saved] = {}
        self.evicted = 0
        self._scan()

    def path(self, key: str) -> Path:
        assert _NAME.match(key)
        return self.dir / (key + SUFFIX)

    def _scan(self) -> None:
        """The conversations a previous run left (a file that is not an intact session of ours goes)."""
        from . import _native

        for p in self.dir.iterdir():
            name = p.name[: -len(SUFFIX)] if p.name.endswith(SUFFIX) else ""
            if not _NAME.match(name) or p.is_symlink() or not p.is_file():
                continue
            try:
                with _native.SessionFile(str(p)) as f:
                    raw = f.section(SEC_TOKENS) or b""
                    app = json.loads(f.section(SEC_APP) or b"{}")
                tokens = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int32).copy()
                st = p.stat()
                self.entries[name] = Saved(name, tokens, int(app.get("prompt_tokens", len(tokens))),
                                           st.st_blocks * 512, max(st.st_atime, st.st_mtime))
            except (_native.SessionFileError, ValueError, OSError, AttributeError):
                self._unlink(p)
        self.evict()

    def best(self, tokens) -> tuple[Saved | None, int]:
        """The saved conversation that tokens continue (they start with its whole prompt) sharing the longest
        prefix with them, and that length."""
        best, n = None, 0
        with self.lock:
            for e in self.entries.values():
                c = common_prefix(e.tokens, tokens)
                if c >= e.prompt_len and (c > n or (c == n and best is not None and e.last_used > best.last_used)):
                    best, n = e, c
        return best, n

    def touch(self, key: str) -> None:
        with self.lock:
            e = self.entries.get(key)
            if e is not None:
                e.last_used = time.time()

    def forget(self, key: str) -> None:
        with self.lock:
            e = self.entries.pop(key, None)
        if e is not None:
            self._unlink(self.path(key))

    def save(self, llm, prompt_len: int) -> str | None:
        """Saves llm's context as a conversation whose prompt was its first prompt_len tokens; returns its key
        (None when the quota is 0). Conversations it continues (same prompt, a reply after it) are superseded and
        removed; then the least recently used go until the quota holds."""
        if self.quota <= 0 or llm.n_tokens == 0:
            return None
        tokens = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32).copy()
        key = token_key(tokens)
        path = self.path(key)
        with self.lock:
            old = [k for k, e in self.entries.items()
                   if k != key and e.prompt_len <= prompt_len and common_prefix(e.tokens, tokens) >= e.prompt_len]
        # The file of the conversation this one continues becomes this one's (the same inode under the new name):
        # where the context last saved or loaded it, the save appends the reply's rows instead of writing it all.
        moved = None
        for k in old if not path.exists() else ():
            try:
                os.rename(self.path(k), path)
                moved = k
                break
            except OSError:
                continue
        try:
            llm.save_session(path, app=json.dumps({"prompt_tokens": int(prompt_len)}).encode())
        except BaseException:
            if moved is not None:  # a failed save leaves the last commit: the conversation it was, under its name
                os.replace(path, self.path(moved))
            raise
        size = path.stat().st_blocks * 512
        with self.lock:
            self.entries[key] = Saved(key, tokens, int(prompt_len), size, time.time())
        for k in old:
            self.forget(k)
        self.evict()
        return key if key in self.entries else None

    def evict(self) -> None:
        while True:
            with self.lock:
                if self.used_bytes() <= self.quota or not self.entries:
                    return
                victim = min(self.entries.values(), key=lambda e: e.last_used)
                del self.entries[victim.key]
                self.evicted += 1
            self._unlink(self.path(victim.key))

    def used_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def stats(self) -> dict:
        with self.lock:
            return {"conversations": len(self.entries), "bytes": self.used_bytes(), "quota_bytes": self.quota,
                    "evicted": self.evicted}

    @staticmethod
    def _unlink(p: Path) -> None:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def store_dir(base: str | os.PathLike, llm) -> Path:
    """The directory of llm's model and KV geometry under base: a conversation saved with another model or
    geometry is never offered to this one."""
    from .gguf_header import header_digest
    from .sessions import geometry

    ident = json.dumps({"model": header_digest(llm.model_path), "geometry": geometry(llm)}, sort_keys=True)
    return Path(base) / hashlib.sha256(ident.encode()).hexdigest()[:24]


def default_base() -> Path:
    """~/.cache/dualblade/serve (0700)."""
    from .models import cache_dir

    d = cache_dir() / "serve"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


__all__ = ["ConversationStore", "common_prefix", "default_base", "store_dir", "token_key"]
