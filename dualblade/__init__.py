"""dualblade: long-context llama.cpp chat past the RAM limit (DUAL-BLADE, arXiv:2604.26557).

    from dualblade import Llama            # a drop-in for llama_cpp.Llama
    llm = Llama("model.gguf", n_ctx=32768, mem_budget="2G", kv_policy="auto")
    llm.kv_stats()
"""
import os as _os

# ggml's compute threads meet at an OpenMP barrier after every operation; libgomp's default lets a
# thread that arrives early spin ~300,000 rounds before it sleeps. When another thread of the process
# (the direct path's I/O worker) takes a core for a moment, its partner spins that whole time: on a
# 2-core machine 5-15% of the CPU per decoded token of an I/O-bound run, for nothing. 10,000 rounds
# still cover an operation's imbalance (decode time unchanged). Read when libgomp loads (llama_cpp's
# import, below); a value the user set wins.
_os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def _one_cxx_runtime() -> None:
    """The system's libstdc++ in the global symbol scope before llama_cpp loads ggml (issue 21, item 6).

    A CUDA build whose ggml libraries link libstdc++ statically (the GPU image's: libggml-cuda.so exports about
    6,900 std:: symbols and needs no libstdc++.so.6) lends that private copy to libllama's references to
    libstdc++ whenever ggml reaches the global scope first. That is what happens after `import numpy`, which
    loads libstdc++ privately (for its OpenBLAS): llama_model::print_info then writes through the copy's
    never-initialized locale and the process dies with SIGSEGV (docs/gpu-runs/storage-pipeline-run5/
    numpy-first.log). With libstdc++ global first, every library binds to the one runtime."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("stdc++") or "libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
    except OSError:  # no shared libstdc++ at all: nothing can interpose
        pass


_one_cxx_runtime()

from . import chat_formats  # noqa: E402,F401  (registers the formats)
from .errors import (BudgetError, ConfigError, DualbladeError, EvalAborted,  # noqa: E402
                     FlashAttentionWarning, ModelError, PinnedMemoryWarning, StoreError)
from .llama import KVIOError, Llama  # noqa: E402
from .sizes import format_size, parse_size  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Llama", "KVIOError", "parse_size", "format_size", "DualbladeError", "ConfigError", "ModelError", "BudgetError",
           "StoreError", "EvalAborted", "FlashAttentionWarning", "PinnedMemoryWarning", "__version__"]
