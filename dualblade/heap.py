"""The process's heap (glibc's malloc), for long-running processes (a server, a chat): fixed malloc thresholds so
that freed blocks go back to the system as they are freed, and what an idle process can give back. A no-op where
the C library is not glibc."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .llama import Llama


def release_idle_memory(llm: Llama | None = None) -> None:
    """What a burst of requests left behind goes back to the system: the staging pool's idle pages (kept
    while requests come, so that staging a layer costs no page faults), the cycles llama-cpp-python's
    samplers form (their C buffers are freed only with them: an idle process never collects), then the free
    pages of every malloc arena (glibc; elsewhere a no-op)."""
    if llm is not None:
        llm.kv_trim()
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# free() gives back the top of a heap above this, and blocks this large come from mmap (freed at once)
MALLOC_THRESHOLD = 256 << 10


@functools.lru_cache(maxsize=None)
def _libc():
    """glibc, looked up once (find_library runs ldconfig); None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 (glibc's: AttributeError elsewhere)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def fix_malloc_thresholds() -> None:
    """For a long-running server: glibc's malloc keeps its thresholds fixed. By default they grow with the
    largest block freed (up to 32 MiB for mmap, 64 MiB for trimming), and malloc_trim does not trim the top of
    a thread's arena (the worker's, where a request's buffers come and go): a burst of requests then left up
    to 11 MiB resident at idle, at random. Fixed at 256 KiB (glibc starts from 128 KiB), free() trims the top of
    every arena as it goes and large blocks go back to the system when freed. A no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD)
