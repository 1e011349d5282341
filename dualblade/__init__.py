"""dualblade: long-context llama.cpp chat past the RAM limit (DUAL-BLADE, arXiv:2604.26557).

    from dualblade import Llama            # a drop-in for llama_cpp.Llama
    llm = Llama("model.gguf", n_ctx=32768, mem_budget="2G", kv_policy="auto")
    llm.kv_stats()
"""
from . import chat_formats  # noqa: F401  (registers the formats)
from .errors import BudgetError, ConfigError, DualbladeError, FlashAttentionWarning, ModelError, StoreError
from .llama import KVIOError, Llama
from .sizes import format_size, parse_size

__version__ = "0.1.0"
__all__ = ["Llama", "KVIOError", "parse_size", "format_size", "DualbladeError", "ConfigError", "ModelError", "BudgetError",
           "StoreError", "FlashAttentionWarning", "__version__"]
