"""VRAM as it is: the free memory of the GPUs (through ggml's device registry), the weights llama.cpp puts
there, and the KV budget that leaves (vram_budget="auto", or a size checked against it). Where the budget goes
is dualblade/placement.py's plan.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from .sizes import format_size

AUTO = "auto"  # vram_budget="auto": what the GPU has free once the weights and compute buffers are placed


@dataclass(frozen=True)
class Gpu:
    name: str
    free: int
    total: int


@functools.lru_cache(maxsize=None)
def _registry():
    """ggml's device registry functions, their signatures declared once; None without ggml."""
    try:
        from llama_cpp._ggml import libggml as g
    except (ImportError, OSError):
        return None
    g.ggml_backend_dev_count.restype = ctypes.c_size_t
    g.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    g.ggml_backend_dev_get.restype = ctypes.c_void_p
    g.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_type.restype = ctypes.c_int
    g.ggml_backend_dev_name.argtypes = [ctypes.c_void_p]
    g.ggml_backend_dev_name.restype = ctypes.c_char_p
    g.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                          ctypes.POINTER(ctypes.c_size_t)]
    return g


def gpus(main_gpu: int = 0, split_mode: int = 1) -> list[Gpu]:
    """The GPUs llama.cpp puts layers on, with their free and total memory now, through ggml's device
    registry (the same figures llama.cpp logs at load). split_mode 0 (none): main_gpu alone."""
    g = _registry()
    if g is None:
        return []
    found = []
    for i in range(g.ggml_backend_dev_count()):
        dev = g.ggml_backend_dev_get(i)
        if g.ggml_backend_dev_type(dev) != 1:  # GGML_BACKEND_DEVICE_TYPE_GPU
            continue
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        g.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        found.append(Gpu(g.ggml_backend_dev_name(dev).decode(errors="replace"), free.value, total.value))
    if split_mode == 0 and found:
        return [found[min(max(main_gpu, 0), len(found) - 1)]]
    return found


def layer_weight_bytes(info) -> tuple[list[int], int]:
    """Weights of each repeating layer (blk.<il>.*) and of the output layer (output.weight, or the tied
    token_embd, and output_norm), from the GGUF tensor table."""
    tb = info.tensor_bytes
    n_layer = info.n_layer
    blocks = [0] * n_layer
    for name, b in tb.items():
        if name.startswith("blk."):
            il = name.split(".")[1]
            if il.isdigit() and int(il) < n_layer:
                blocks[int(il)] += b
    out = tb.get("output.weight", tb.get("token_embd.weight", 0)) + tb.get("output_norm.weight", 0)
    return blocks, out


def gpu_weight_bytes(info, n_gpu_layers: int) -> int:
    """Weights llama.cpp puts in VRAM for n_gpu_layers (llama_model::load_tensors: n >= 1 is the output
    layer and the last n - 1 repeating layers)."""
    blocks, out = layer_weight_bytes(info)
    n = len(blocks)
    ngl = n + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n + 1)
    return sum(blocks[max(n + 1 - ngl, 0):]) + (out if ngl >= 1 else 0)


def compute_reserve(info, n_ubatch: int = 512) -> int:
    """VRAM beside weights and KV that llama.cpp's compute buffers and CUDA's pools take, estimated (llama.cpp
    sizes them only at load): 512 MiB, a ubatch's logits and 16 rows of activations per token."""
    return (512 << 20) + n_ubatch * (info.n_vocab + 16 * info.n_embd) * 4


class VramExceedsFree(ValueError):
    """The KV budget asked for, with the weights, is more than the GPUs have free (args[0]: the message)."""


def budget_from_free(vram_budget: int | str, info, n_gpu_layers: int, n_ubatch: int = 512,
                     found: list[Gpu] | None = None) -> tuple[int, str | None]:
    """The VRAM budget in bytes for vram_budget (bytes, or AUTO) against the free VRAM now, and a warning
    (or None). AUTO: the free VRAM less the weights on the GPU and compute_reserve. Raises VramExceedsFree
    when the budget and the weights cannot fit at all."""
    found = gpus() if found is None else found
    free = sum(g.free for g in found)
    weights = gpu_weight_bytes(info, n_gpu_layers)
    reserve = compute_reserve(info, n_ubatch)
    where = ", ".join(f"{g.name} {format_size(g.free)} of {format_size(g.total)}" for g in found) or "no GPU"
    if vram_budget == AUTO:
        budget = free - weights - reserve
        if budget <= 0:
            raise VramExceedsFree(f"vram_budget='auto' finds no VRAM for the KV: {where} free, the weights on the "
                                  f"GPU take {format_size(weights)} and compute buffers about {format_size(reserve)}; "
                                  "free VRAM (other processes), or lower n_gpu_layers")
        return budget, None
    if vram_budget + weights > free:
        fit = max(free - weights - reserve, 0)
        raise VramExceedsFree(f"vram_budget {format_size(vram_budget)} and the {format_size(weights)} of weights on "
                              f"the GPU are more than the free VRAM ({where}); give vram_budget='{fit >> 20}M' or "
                              "less, or vram_budget='auto'")
    if vram_budget + weights + reserve > free:
        return vram_budget, (f"vram_budget {format_size(vram_budget)} leaves "
                             f"{format_size(max(free - weights - vram_budget, 0))} of free VRAM for llama.cpp's compute "
                             f"buffers, which may need about {format_size(reserve)}; if loading fails for VRAM, give "
                             "a smaller vram_budget or vram_budget='auto'")
    return vram_budget, None
