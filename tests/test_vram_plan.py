"""The VRAM tier's plan (dualblade/placement.py): which GPU layers stay in VRAM and which are streamed; the
VRAM a budget may take (dualblade/vram.py).

Pure arithmetic, checked on every machine; the GPU itself is exercised by tests/test_gpu.py."""
from __future__ import annotations

import pytest

from dualblade import placement, vram

MiB = 1 << 20


def test_gpu_layers_follow_llama_cpp():
    # llama_model::dev_layer: the last n_gpu_layers layers, the input layer counted (n_layer + 1)
    assert placement.gpu_layers(8, -1, True, True) == set(range(8))
    assert placement.gpu_layers(8, 99, True, True) == set(range(8))
    assert placement.gpu_layers(8, 9, True, True) == set(range(8))
    assert placement.gpu_layers(8, 4, True, True) == {5, 6, 7}
    assert placement.gpu_layers(8, 1, True, True) == set()
    assert placement.gpu_layers(8, 0, True, True) == set()
    assert placement.gpu_layers(8, -1, False, True) == set()  # offload_kqv=False: the KV stays on the host
    assert placement.gpu_layers(8, -1, True, False) == set()  # no GPU


def test_layers_left_on_the_cpu_are_said():
    assert placement.cpu_layers_warning(8, -1) is None
    assert placement.cpu_layers_warning(8, 99) is None
    assert placement.cpu_layers_warning(8, 9) is None  # 8 layers + the output layer
    assert placement.cpu_layers_warning(8, 8).startswith("n_gpu_layers=8 leaves 1 of 8 layers on the CPU")
    assert "leaves 5 of 8 layers" in placement.cpu_layers_warning(8, 4)  # the output layer and the last 3
    assert "leaves 8 of 8 layers" in placement.cpu_layers_warning(8, 1)


def test_no_budget_or_room_for_everything_is_stock():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    for budget in (None, 128 * MiB, 10**12):
        p = placement.plan_vram(kv, set(kv), budget)
        assert p.resident == frozenset(kv) and not p.streamed and p.slots == 0 and p.vram_bytes == 128 * MiB


def test_a_tight_budget_streams_and_holds():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    for budget in (32 * MiB, 48 * MiB, 64 * MiB, 100 * MiB, 127 * MiB):
        p = placement.plan_vram(kv, set(kv), budget)
        assert p.vram_bytes <= budget, (budget, p)
        assert p.resident | p.streamed == frozenset(kv) and not p.resident & p.streamed
        assert p.slots == 2 and p.slot_bytes == 16 * MiB and p.minimum == 32 * MiB
        # every byte not in a slot holds a resident layer: as many as fit
        assert len(p.resident) == (budget - 2 * 16 * MiB) // (16 * MiB)


def test_largest_layers_stay_resident():
    # iSWA-like: two global layers of 64 MiB, six windowed layers of 4 MiB
    kv = {i: ((32 if i in (2, 5) else 2) * MiB,) * 2 for i in range(8)}
    p = placement.plan_vram(kv, set(kv), 136 * MiB)  # both global layers resident: the slots shrink to a small layer's
    assert p.resident == {2, 5} and p.slot_bytes == 4 * MiB and p.vram_bytes == 136 * MiB
    p = placement.plan_vram(kv, set(kv), 140 * MiB)  # and one small layer more
    assert {2, 5} < p.resident and len(p.streamed) == 5 and p.vram_bytes == 140 * MiB
    p = placement.plan_vram(kv, set(kv), 130 * MiB)  # one global layer resident would need slots of the other's size
    assert p.resident == set() and p.slot_bytes == 64 * MiB and p.vram_bytes == 128 * MiB
    assert p.minimum == 128 * MiB
    assert placement.plan_vram(kv, set(kv), 100 * MiB).vram_bytes > 100 * MiB  # below it: Llama raises BudgetError


def test_below_the_minimum_cannot_hold():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    p = placement.plan_vram(kv, set(kv), 31 * MiB)
    assert p.vram_bytes > 31 * MiB and p.minimum == 32 * MiB  # Llama raises BudgetError naming 32M


@pytest.mark.parametrize("quantized,span", [(False, 16 * MiB), (True, 20 * MiB)])
def test_slots_leave_room_for_padded_rows(quantized, span):
    # a GPU buffer pads quantized rows past the tensor's end: vram/slots.c maps a granule more when exactly full
    kv = {i: (8 * MiB, 8 * MiB) for i in range(4)}
    assert placement.plan_vram(kv, set(kv), 40 * MiB, quantized=quantized).slot_bytes == span


# --- the budget against the free VRAM (the GPUs are given: the arithmetic, on the real model's tensor table) ---

@pytest.fixture(scope="module")
def gemma_info(gemma_path):
    from dualblade.gguf_header import model_info

    return model_info(gemma_path)


def test_gpu_weights_follow_llama_cpp(gemma_info):
    blocks, out = vram.layer_weight_bytes(gemma_info)
    assert len(blocks) == gemma_info.n_layer == 18 and all(b > 0 for b in blocks)
    assert out > 0  # Gemma-3 ties its output matrix to token_embd
    total = sum(blocks) + out
    assert vram.gpu_weight_bytes(gemma_info, -1) == total
    assert vram.gpu_weight_bytes(gemma_info, 99) == total
    assert vram.gpu_weight_bytes(gemma_info, 19) == total
    assert vram.gpu_weight_bytes(gemma_info, 1) == out  # n >= 1: the output layer first
    assert vram.gpu_weight_bytes(gemma_info, 4) == out + sum(blocks[-3:])
    assert vram.gpu_weight_bytes(gemma_info, 0) == 0
    # every tensor but token_embd (which stays with the input on the host) is counted once
    tb = gemma_info.tensor_bytes
    assert sum(blocks) + tb["output_norm.weight"] == sum(b for n, b in tb.items() if n != "token_embd.weight")


def test_auto_takes_what_is_free(gemma_info):
    gpu = [vram.Gpu("CUDA0", 8 << 30, 16 << 30)]
    budget, warning = vram.budget_from_free(vram.AUTO, gemma_info, -1, 512, gpu)
    weights = vram.gpu_weight_bytes(gemma_info, -1)
    reserve = vram.compute_reserve(gemma_info, 512)
    assert budget == (8 << 30) - weights - reserve and warning is None
    assert reserve > 512 * gemma_info.n_vocab * 4 > 0  # a ubatch's logits at least
    two = [vram.Gpu("CUDA0", 4 << 30, 8 << 30), vram.Gpu("CUDA1", 4 << 30, 8 << 30)]
    assert vram.budget_from_free(vram.AUTO, gemma_info, -1, 512, two)[0] == budget  # layers split over both
    with pytest.raises(vram.VramExceedsFree, match="finds no VRAM for the KV.*CUDA0"):
        vram.budget_from_free(vram.AUTO, gemma_info, -1, 512, [vram.Gpu("CUDA0", weights + reserve, 1 << 30)])
    with pytest.raises(vram.VramExceedsFree, match="no GPU"):
        vram.budget_from_free(vram.AUTO, gemma_info, -1, 512, [])


def test_a_budget_beyond_the_free_vram(gemma_info):
    weights = vram.gpu_weight_bytes(gemma_info, -1)
    reserve = vram.compute_reserve(gemma_info, 512)
    gpu = [vram.Gpu("CUDA0", 2 << 30, 16 << 30)]
    assert vram.budget_from_free(256 << 20, gemma_info, -1, 512, gpu) == (256 << 20, None)
    # fits next to the weights, not next to the compute buffers too: a warning
    tight = (2 << 30) - weights - reserve // 2
    budget, warning = vram.budget_from_free(tight, gemma_info, -1, 512, gpu)
    assert budget == tight and "compute buffers" in warning
    # more than is free: refused, with what would fit
    with pytest.raises(vram.VramExceedsFree, match=r"more than the free VRAM \(CUDA0 2.00 GiB of 16.0 GiB\); give "
                                                  rf"vram_budget='{((2 << 30) - weights - reserve) >> 20}M'"):
        vram.budget_from_free((2 << 30) - weights + 1, gemma_info, -1, 512, gpu)


def test_no_gpu_here_means_none_found():
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this build has a GPU: tests/test_gpu.py checks what it finds")
    assert vram.gpus() == []  # the CPU build's registry has its CPU device only


def test_stats_line_for_the_vram_tier():
    from dualblade.cli.chat import vram_line

    GiB = 1 << 30
    assert vram_line({"vram": {"resident_layers": 0, "streamed_layers": 0}}) is None  # CPU builds, stock GPU
    assert vram_line({}) is None
    stock = vram_line({"vram": {"resident_layers": 16, "resident_bytes": GiB, "streamed_layers": 0}})
    assert stock == "VRAM: 16 layers resident (1.00 GiB)"
    line = vram_line({"vram": {"resident_layers": 2, "resident_bytes": 128 * MiB, "streamed_layers": 14, "slots": 2,
                               "slot_bytes": 128 * MiB, "h2d_bytes": 3 * GiB, "h2d_pinned_bytes": GiB,
                               "d2h_bytes": 5 * MiB, "copy_wait_s": 0.25}})
    assert line == ("VRAM: 2 layers resident (128.0 MiB), 14 streamed through 2 slots of 128.0 MiB; copied host->VRAM "
                    "3.00 GiB (1.00 GiB page-locked), back 5.00 MiB, copy stall 0.250 s")


def test_streamed_page_cache_layers_leave_room_for_the_ring():
    # 8 GPU layers of 16 MiB, VRAM for 2 slots: every layer streamed from its host copy. Under "mmap" the host
    # plan keeps the direct path's staging free (kv.c's ring_share gives it to the page-locked ring) and pins
    # only what fits beside it; the rest is on the page cache, never on the direct path.
    kv = [(i, 8 * MiB, 8 * MiB) for i in range(8)]
    gpu = set(range(8))
    budget = 64 * MiB
    plain = placement.place(kv, "mmap", budget)  # no GPU: the page-cache plan pins what the budget holds
    assert [e[1] for e in plain.layout].count("ram") == 4
    p = placement.place(kv, "mmap", budget, gpu, vram_budget=32 * MiB)
    paths = [e[1] for e in p.layout]
    assert all(e[4] for e in p.layout) and set(paths) <= {"ram", "mmap"} and "mmap" in paths
    assert paths.count("ram") < 4 and p.staging_bytes > 0
    assert paths.count("ram") * 16 * MiB + p.staging_bytes <= budget
    # the direct path's own plan is the same apart from the path's name
    d = placement.place(kv, "direct", budget, gpu, vram_budget=32 * MiB)
    assert [e[1] for e in d.layout] == ["direct" if x == "mmap" else x for x in paths]
    # a budget below the direct path's minimum: the page-cache plan as it is
    tiny = placement.place(kv, "mmap", 1 * MiB, gpu, vram_budget=32 * MiB)
    assert {e[1] for e in tiny.layout} == {"mmap"}
