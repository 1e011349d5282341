"""The placement plan across the tiers: VRAM (GPU builds), pinned RAM, page cache, direct.

`place` is the one place it is made (dualblade.Llama and `dualblade info` ask it): the VRAM plan below picks
which GPU layers keep their KV in VRAM and which are streamed, then the C module's host plan
(`_native.plan`) places every layer VRAM does not keep.

A streamed layer's KV lives on its host path (pinned RAM, page cache or direct) and is copied into one
of a few VRAM slots before the layer computes (native/src/vram.c). Slots cost what resident layers cost,
and a resident layer costs no copy at all, so VRAM goes to residency first: the largest layers that fit
the budget once the slots are reserved.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

from . import _native
from .sizes import format_size

GRANULARITY = 2 << 20  # CUDA VMM's allocation granularity on current GPUs (the C module asks the driver)
SLOTS = 2              # DBLADE_VRAM_SLOTS: a layer computes in one while the next one's copy waits


def slots_wanted(n_streamed: int) -> int:
    """Slots the plan reserves, as the C module counts them by default. (DUALBLADE_VRAM_SLOTS, a debug
    setting the C module reads, may give the layers more, beyond the budget: 0 is one per layer, the
    oracle for ordering bugs.)"""
    return min(SLOTS, n_streamed)


DEVICE_PAD = 4096  # room for the padding a GPU buffer adds after quantized rows (vram.c)


def _span(k: int, v: int, quantized: bool) -> int:
    """VRAM of one slot for a layer of K and V bytes, as vram.c maps it."""
    pad = DEVICE_PAD if quantized else 0
    up = lambda x: -(-(x + pad) // GRANULARITY) * GRANULARITY  # noqa: E731
    return up(k) + up(v)


def gpu_layers(n_layer: int, n_gpu_layers: int, offload_kqv: bool, gpu_offload: bool) -> set[int]:
    """The layers whose KV llama.cpp puts on the GPU: the last n_gpu_layers (llama_model::dev_layer)."""
    if not gpu_offload or not offload_kqv or n_gpu_layers == 0:
        return set()
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    start = max(n_layer + 1 - ngl, 0)
    return {il for il in range(n_layer) if il >= start}


def all_weights_on_gpu(n_layer: int, n_gpu_layers: int, gpu_offload: bool) -> bool:
    """Every layer and the output matrix on the GPU (n_gpu_layers counts the output layer too)."""
    return gpu_offload and (n_gpu_layers < 0 or n_gpu_layers > n_layer)


def cpu_layers_warning(n_layer: int, n_gpu_layers: int) -> str | None:
    """With a vram_budget: what to say when n_gpu_layers leaves layers on the CPU (None when none is left)."""
    on_gpu = n_layer + 1 if n_gpu_layers < 0 else min(n_gpu_layers, n_layer + 1)
    left = n_layer - max(on_gpu - 1, 0)  # n_gpu_layers counts the output layer first
    if left <= 0:
        return None
    return (f"n_gpu_layers={n_gpu_layers} leaves {left} of {n_layer} layers on the CPU: vram_budget applies to the "
            f"GPU's layers only, and those {left} keep their KV in the host tiers (mem_budget), their attention on "
            "the CPU; pass n_gpu_layers=-1 to put every layer on the GPU")


@dataclass(frozen=True)
class VramPlan:
    resident: frozenset   # layers in VRAM as stock
    streamed: frozenset   # layers copied into a slot per pass
    slots: int
    slot_bytes: int
    vram_bytes: int       # resident KV + slots: what the budget holds
    minimum: int          # the smallest budget that runs (every GPU layer streamed)


def plan(kv: dict[int, tuple[int, int]], gpu: set[int], vram_budget: int | None,
         quantized: bool = False) -> VramPlan:
    """kv: {layer: (K bytes, V bytes)}; quantized: a block-quantized K or V type (q8_0, q4_0: GPU buffers
    pad their rows). No budget: every GPU layer resident (stock)."""
    layers = sorted(gpu, key=lambda il: (-(kv[il][0] + kv[il][1]), il))
    spans = {il: _span(*kv[il], quantized) for il in layers}
    size = {il: kv[il][0] + kv[il][1] for il in layers}
    everything = sum(size.values())

    def need(resident: list[int]) -> int:  # VRAM of a plan: resident layers and the others' slots
        rest = [x for x in layers if x not in resident]
        return sum(size[x] for x in resident) + slots_wanted(len(rest)) * max((spans[x] for x in rest), default=0)

    # the k largest layers resident shrink the slots to the (k+1)-th's size: the smallest need is the minimum
    needs = [need(layers[:k]) for k in range(len(layers) + 1)]
    minimum = min(needs)
    if vram_budget is None or everything <= vram_budget:
        return VramPlan(frozenset(layers), frozenset(), 0, 0, everything, minimum)
    # the most bytes resident among the prefixes that fit, then any smaller layer that still fits
    fits = [k for k in range(len(layers)) if needs[k] <= vram_budget]
    resident = list(layers[:max(fits, key=lambda k: (sum(size[x] for x in layers[:k]), -k))]) if fits else []
    for il in layers[len(resident):]:
        if fits and need(resident + [il]) <= vram_budget:
            resident.append(il)
    streamed = [x for x in layers if x not in resident]
    n_slots = slots_wanted(len(streamed))
    slot_bytes = max((spans[x] for x in streamed), default=0)
    return VramPlan(frozenset(resident), frozenset(streamed), n_slots, slot_bytes, need(resident), minimum)


class VramTooSmall(ValueError):
    """vram_budget is below the minimum (args[0]) this model needs at this context."""


@dataclass(frozen=True)
class Placement:
    layout: list          # [(layer, path, K bytes, V bytes, streamed)]; path "vram": in VRAM as stock
    vram: VramPlan
    staging_bytes: int    # what the direct path stages (the host plan's)


def place(kv: list[tuple[int, int, int]], policy: str, budget: int | None, gpu: set[int] = frozenset(),
          vram_budget: int | None = None, quantized: bool = False) -> Placement:
    """kv: [(layer, K bytes, V bytes)]; gpu: the layers llama.cpp puts on a GPU (gpu_layers).
    Raises VramTooSmall(minimum), and MemoryError(minimum) / ValueError from the host plan (_native.plan)."""
    by_il = {il: (k, v) for il, k, v in kv}
    vplan = plan(by_il, {il for il in gpu if il in by_il}, vram_budget, quantized)
    if vram_budget is not None and vplan.vram_bytes > vram_budget:
        raise VramTooSmall(vplan.minimum)
    # the host plan places every layer VRAM does not keep: CPU layers and the streamed ones' host copies
    host = [(il, k, v) for il, k, v in kv if il not in vplan.resident]
    if budget is None:  # no host budget: every host copy pinned
        policy = "ram"
    paths, staging = _native.plan(policy, budget, [k + v for _, k, v in host])
    where = {il: p for (il, _, _), p in zip(host, paths)}
    return Placement([(il, where.get(il, "vram"), k, v, il in vplan.streamed) for il, k, v in kv], vplan, staging)


# --- VRAM as it is: the free memory of the GPUs, the weights that go there, and what a budget may take ---

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
