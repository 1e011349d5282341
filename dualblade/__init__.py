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

from . import chat_formats  # noqa: E402,F401  (registers the formats)
from .errors import (BudgetError, ConfigError, DualbladeError, FlashAttentionWarning, ModelError,  # noqa: E402
                     PinnedMemoryWarning, StoreError)
from .llama import KVIOError, Llama  # noqa: E402
from .sizes import format_size, parse_size  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Llama", "KVIOError", "parse_size", "format_size", "DualbladeError", "ConfigError", "ModelError", "BudgetError",
           "StoreError", "FlashAttentionWarning", "PinnedMemoryWarning", "__version__"]
