"""llama.cpp's own words when it refuses a model or a context, turned into one precise exception.

llama_cpp raises a bare ``ValueError("Failed to load model from file: ...")``; the reason (an unknown
architecture, a missing tensor) only goes to llama.cpp's log. While a model loads, `errors()` keeps the
error lines of that log (every line still reaches the callback installed before), and `load_error` names
the problem and the fix from them.
"""
from __future__ import annotations

import contextlib
import ctypes
import re

import llama_cpp

from .errors import ConfigError, DualbladeError, ModelError

_LEVEL_ERROR, _LEVEL_CONT = 4, 5  # ggml_log_level


class LoadLog(list):
    """llama.cpp's error lines (the list), and the size of each model buffer it allocated, by the buffer's
    name ("CPU_Mapped": weights used from the mapped file, "CPU_REPACK": weights copied and rearranged), and of
    each compute buffer ("CPU", "CUDA0", "CUDA_Host": page-locked host memory, resident from its allocation)."""

    def __init__(self):
        super().__init__()
        self.buffers: dict[str, int] = {}
        self.compute: dict[str, int] = {}

    def note(self, text: str) -> None:
        """Records the buffer size a log line reports, if it reports one."""
        m = _BUFFER_LINE.search(text)
        if m:
            sizes = self.buffers if m[2] == "model" else self.compute
            sizes[m[1]] = sizes.get(m[1], 0) + round(float(m[3]) * 2**20)

    def pinned_compute_bytes(self) -> int:
        """Of the compute buffers, those in page-locked host memory (a GPU backend's "<name>_Host" type)."""
        return sum(n for name, n in self.compute.items() if name.endswith("_Host"))


_BUFFER_LINE = re.compile(r"(\S+) (model|compute) buffer size =\s*([0-9.]+) MiB")


@contextlib.contextmanager
def errors():
    """Yields a LoadLog that collects llama.cpp's error log lines (and its buffers' sizes) while the block runs."""
    lines = LoadLog()
    prev_cb = llama_cpp.llama_log_callback()
    prev_ud = ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(prev_cb), ctypes.byref(prev_ud))
    last = [0]

    def collect(level: int, text: bytes, user_data) -> None:
        if level != _LEVEL_CONT:
            last[0] = level
        if last[0] == _LEVEL_ERROR and text:
            lines.append(text.decode(errors="replace"))
        elif text and b" buffer size" in text:
            lines.note(text.decode(errors="replace"))
        if prev_cb:
            prev_cb(level, text, prev_ud)

    cb = llama_cpp.llama_log_callback(collect)
    llama_cpp.llama_log_set(cb, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(prev_cb, prev_ud)


def load_error(e: ValueError, model_path, lines: list[str]) -> DualbladeError:
    """The exception to raise for llama_cpp's ValueError `e`, given the error lines llama.cpp logged."""
    m = re.search(r"unknown model architecture: '([^']*)'", "".join(lines))
    if m:
        return ModelError(f"{model_path} is a model of architecture '{m[1]}', which this llama.cpp does not "
                          "support; give a model of a supported architecture (llama, gemma3, qwen2, ...)")
    # the first reason given: llama.cpp prefixes each line with the function that logged it
    reasons = []
    for line in "".join(lines).splitlines():
        r = re.sub(r"^(\w+: )?(error loading model: )?", "", line.strip()).strip(" .")
        if r and not r.startswith("failed to load model"):
            reasons.append(" ".join(r.split()))
    reason = reasons[0] if reasons else None
    if "Failed to create llama_context" in str(e):
        return ConfigError(f"llama.cpp cannot create the context for {model_path}"
                           f"{f' ({reason})' if reason else ''}; lower n_ctx or check type_k/type_v and flash_attn")
    return ModelError(f"llama.cpp cannot load {model_path}{f' ({reason})' if reason else ''}; check that the file "
                      "is complete and of an architecture llama.cpp supports")
