"""The placement plan across the tiers: VRAM (GPU builds), pinned RAM, page cache, direct.

`place` is the one place it is made (dualblade.Llama and `dualblade info` ask it): the VRAM tier's plan
(`plan_vram`) picks which GPU layers keep their KV in VRAM and which are streamed, then the C module's host
plan (`_native.plan`) places every layer VRAM does not keep.

A streamed layer's KV lives on its host path (pinned RAM, page cache or direct) and is copied into one
of a few VRAM slots before the layer computes (native/src/vram/slots.c). Slots cost what resident layers cost,
and a resident layer costs no copy at all, so VRAM goes to residency first: the largest layers that fit
the budget once the slots are reserved. How much VRAM a budget may take is dualblade/vram.py's question.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import _native

GRANULARITY = 2 << 20  # CUDA VMM's allocation granularity on current GPUs (the C module asks the driver)
VRAM_SLOTS = 2         # DBLADE_VRAM_SLOTS: a layer computes in one while the next one's copy waits


def slots_wanted(n_streamed: int) -> int:
    """Slots the plan reserves, as the C module counts them by default. (DUALBLADE_VRAM_SLOTS, a debug
    setting the C module reads, may give the layers more, beyond the budget: 0 is one per layer, the
    oracle for ordering bugs.)"""
    return min(VRAM_SLOTS, n_streamed)


DEVICE_PAD = 4096  # room for the padding a GPU buffer adds after quantized rows (vram/slots.c)


def _span(k: int, v: int, quantized: bool) -> int:
    """VRAM of one slot for a layer of K and V bytes, as vram/slots.c maps it."""
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


def plan_vram(kv: dict[int, tuple[int, int]], gpu: set[int], vram_budget: int | None,
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
    vplan = plan_vram(by_il, {il for il in gpu if il in by_il}, vram_budget, quantized)
    if vram_budget is not None and vplan.vram_bytes > vram_budget:
        raise VramTooSmall(vplan.minimum)
    # the host plan places every layer VRAM does not keep: CPU layers and the streamed ones' host copies
    host = [(il, k, v) for il, k, v in kv if il not in vplan.resident]
    if budget is None:  # no host budget: every host copy pinned
        policy = "ram"
    sizes = [k + v for _, k, v in host]
    paths, staging = _native.plan(policy, budget, sizes)
    if policy == "mmap" and any(il in vplan.streamed for il, _, _ in host):
        # Streamed layers go through the page-locked ring the direct path's staging would take (ring_share in
        # kv.c): planned as the direct path, the budget keeps that room and pins the layers that fit beside it.
        # Below the direct path's minimum, the page-cache plan as it is (no ring: slower copies, same bytes).
        try:
            direct, staging = _native.plan("direct", budget, sizes)
            paths = ["mmap" if p == "direct" else p for p in direct]
        except MemoryError:
            pass
    where = {il: p for (il, _, _), p in zip(host, paths)}
    return Placement([(il, where.get(il, "vram"), k, v, il in vplan.streamed) for il, k, v in kv], vplan, staging)


# What llama.cpp's compute buffers may take for a context's prompt ubatch (prefill_ubatch), fixed so that the same
# model and n_ctx always get the same ubatch (a saved session resumes with the same n_ubatch): the buffers of the
# device that computes, and the attention masks, which stay in host memory on a GPU too (ggml's scheduler keeps
# inputs there and copies them over).
PREFILL_COMPUTE_HOST = 1 << 30
PREFILL_COMPUTE_GPU = 4 << 30
PREFILL_MASK_HOST = 1 << 30
# A batch of several ubatches is computed layer by layer (patch 0006: each offloaded layer's rows staged once per
# batch, not once per ubatch); between segments of layers its hidden states (4 bytes x n_embd a token) wait on the
# device that computes, in at most this much memory while the batch runs. At most PREFILL_BATCH_UBATCHES ubatches a
# batch: a prompt's progress (chat) and a server's cancellation are seen between batches.
PREFILL_STASH = 256 << 20
PREFILL_BATCH_UBATCHES = 8
# The outputs a ubatch of such a context asks for at most (the prompt's last token, a verification batch's
# drafts): llama.cpp reserves n_vocab floats of compute buffer for each (dblade_kv_set_outputs_max).
OUTPUTS_MAX = 64


def _per_token(info, n_ctx: int) -> tuple[int, int]:
    """Compute-buffer bytes per token of a ubatch at n_ctx: the attention masks (two bytes a cell, one mask, two
    with sliding-window layers), the activations (about 4 x (3 n_ff + 4 n_embd))."""
    masks = 2 if any(layer.swa for layer in info.layers) else 1
    n_ff = info.n_ff or 4 * info.n_embd
    return 2 * masks * (-(-n_ctx // 256) * 256), 4 * (3 * n_ff + 4 * info.n_embd)


def prefill_host_bytes(info, n_ctx: int, ubatch: int, gpu: bool) -> int:
    """The host memory a ubatch's compute buffers take at n_ctx, the context full: masks and activations; on a
    GPU the masks only."""
    mask, activations = _per_token(info, n_ctx)
    return ubatch * (mask + (0 if gpu else activations))


def prefill_batch(info, n_ctx: int, ubatch: int, gpu: bool) -> int:
    """The tokens one llama_decode takes (n_batch) in a context whose KV lives partly off the GPU or RAM: several
    whole prompt ubatches, which llama.cpp computes layer by layer (as many as PREFILL_STASH holds the hidden states
    of, at most PREFILL_BATCH_UBATCHES), up to n_ctx. One ubatch with layers streamed into VRAM, where each graph
    copies the ubatch's attention masks over and layer by layer costs more than it saves (the C module decides:
    _native.prefill_layer_major), and for an iSWA model."""
    if not _native.prefill_layer_major(gpu) or any(layer.swa for layer in info.layers):
        return ubatch  # (an iSWA model keeps llama.cpp's order: a later ubatch reuses the sliding window's cells)
    k = min(PREFILL_BATCH_UBATCHES, max(1, PREFILL_STASH // (4 * info.n_embd * ubatch)))
    return min(n_ctx, k * ubatch)


def prefill_stash_bytes(info, n_batch: int, ubatch: int, gpu: bool) -> int:
    """The host memory a batch of n_batch tokens computed layer by layer keeps its hidden states in while it runs:
    none for a batch of one ubatch, nor on a GPU (they stay in VRAM there)."""
    return 0 if gpu or n_batch <= ubatch else 4 * info.n_embd * n_batch


def prefill_ubatch(info, n_ctx: int, gpu: bool) -> int:
    """The ubatch a context whose KV lives partly off the GPU or RAM processes its prompt in. A streamed or
    offloaded layer's rows below the ubatch are read (from storage, or copied into VRAM) once per ubatch, so a
    P-token prompt in 512-token ubatches reads O(P^2/512) bytes; in ubatches of n_ctx/3 a prompt that fills the
    context reads each layer about once (0 + 1/3 + 2/3 of it), and larger ones would only cost memory. Whole
    contexts of up to 2048 tokens go in one. Bounded by fixed allowances for llama.cpp's compute buffers, which
    grow with the ubatch, by the attention mask (two bytes per context cell, per mask) and the activations (about
    4 x (3 n_ff + 4 n_embd) bytes) of every token (the logits are capped to OUTPUTS_MAX). A multiple of 256, 512 to
    n_ctx."""
    mask, activations = _per_token(info, n_ctx)
    if gpu:
        bound = min(PREFILL_COMPUTE_GPU // (mask + activations), PREFILL_MASK_HOST // mask)
    else:
        bound = PREFILL_COMPUTE_HOST // (mask + activations)
    want = n_ctx if n_ctx <= 2048 else -(-n_ctx // 3)
    ubatch = min(-(-want // 256) * 256, bound // 256 * 256)
    return max(512, min(ubatch, n_ctx))
