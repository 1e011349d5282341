"""The VRAM tier's plan (dualblade/vram.py): which GPU layers stay in VRAM and which are streamed.

Pure arithmetic, checked on every machine; the GPU itself is exercised by tests/test_gpu.py."""
from __future__ import annotations

import pytest

from dualblade import vram

MiB = 1 << 20


def test_gpu_layers_follow_llama_cpp():
    # llama_model::dev_layer: the last n_gpu_layers layers, the input layer counted (n_layer + 1)
    assert vram.gpu_layers(8, -1, True, True) == set(range(8))
    assert vram.gpu_layers(8, 99, True, True) == set(range(8))
    assert vram.gpu_layers(8, 9, True, True) == set(range(8))
    assert vram.gpu_layers(8, 4, True, True) == {5, 6, 7}
    assert vram.gpu_layers(8, 1, True, True) == set()
    assert vram.gpu_layers(8, 0, True, True) == set()
    assert vram.gpu_layers(8, -1, False, True) == set()  # offload_kqv=False: the KV stays on the host
    assert vram.gpu_layers(8, -1, True, False) == set()  # no GPU


def test_no_budget_or_room_for_everything_is_stock():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    for budget in (None, 128 * MiB, 10**12):
        p = vram.plan(kv, set(kv), budget)
        assert p.resident == frozenset(kv) and not p.streamed and p.slots == 0 and p.vram_bytes == 128 * MiB


def test_a_tight_budget_streams_and_holds():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    for budget in (32 * MiB, 48 * MiB, 64 * MiB, 100 * MiB, 127 * MiB):
        p = vram.plan(kv, set(kv), budget)
        assert p.vram_bytes <= budget, (budget, p)
        assert p.resident | p.streamed == frozenset(kv) and not p.resident & p.streamed
        assert p.slots == 2 and p.slot_bytes == 16 * MiB and p.minimum == 32 * MiB
        # every byte not in a slot holds a resident layer: as many as fit
        assert len(p.resident) == (budget - 2 * 16 * MiB) // (16 * MiB)


def test_largest_layers_stay_resident():
    # iSWA-like: two global layers of 64 MiB, six windowed layers of 4 MiB
    kv = {i: ((32 if i in (2, 5) else 2) * MiB,) * 2 for i in range(8)}
    p = vram.plan(kv, set(kv), 136 * MiB)  # both global layers resident: the slots shrink to a small layer's
    assert p.resident == {2, 5} and p.slot_bytes == 4 * MiB and p.vram_bytes == 136 * MiB
    p = vram.plan(kv, set(kv), 140 * MiB)  # and one small layer more
    assert {2, 5} < p.resident and len(p.streamed) == 5 and p.vram_bytes == 140 * MiB
    p = vram.plan(kv, set(kv), 130 * MiB)  # one global layer resident would need slots of the other's size
    assert p.resident == set() and p.slot_bytes == 64 * MiB and p.vram_bytes == 128 * MiB
    assert p.minimum == 128 * MiB
    assert vram.plan(kv, set(kv), 100 * MiB).vram_bytes > 100 * MiB  # below it: Llama raises BudgetError


def test_below_the_minimum_cannot_hold():
    kv = {i: (8 * MiB, 8 * MiB) for i in range(8)}
    p = vram.plan(kv, set(kv), 31 * MiB)
    assert p.vram_bytes > 31 * MiB and p.minimum == 32 * MiB  # Llama raises BudgetError naming 32M


@pytest.mark.parametrize("quantized,span", [(False, 16 * MiB), (True, 20 * MiB)])
def test_slots_leave_room_for_padded_rows(quantized, span):
    # a GPU buffer pads quantized rows past the tensor's end: vram.c maps a granule more when exactly full
    kv = {i: (8 * MiB, 8 * MiB) for i in range(4)}
    assert vram.plan(kv, set(kv), 40 * MiB, quantized=quantized).slot_bytes == span
