"""`dualblade bench --gpu` without a GPU: its refusals, and the pure parts of the GPU matrix (the ngl rule, the
host limits, issue 12's ratios, the table) on synthetic cell results. The GPU runs themselves are in docs/gpu.md."""
import io

import llama_cpp
import pytest
from rich.console import Console

from dualblade.bench import cell, gpu, matrix
from conftest import assert_user_error, run_cli

GiB = 1 << 30
MiB = 1 << 20
no_gpu = pytest.mark.skipif(bool(llama_cpp.llama_supports_gpu_offload()), reason="a GPU build on a GPU")


@no_gpu
def test_gpu_refused_without_a_gpu(tmp_path):
    assert_user_error(run_cli("bench", "--synthetic", "tiny", "--gpu", "--kv-dir", str(tmp_path), "--no-cgroup",
                              timeout=120), "--gpu needs a GPU build")


@pytest.mark.parametrize("args, words", [
    (["--gpu", "--host-budget", "150%"], "--host-budget: budget '150%' must be between 0% and 100%"),
    (["--gpu", "--host-budget", "lots"], "--host-budget"),
    (["--host-budget", "1G"], "add --gpu"),
    (["--gpu", "--policies", "stock"], "unknown policy 'stock' for the --gpu benchmark"),
])
def test_bad_gpu_input_is_one_line(args, words, tmp_path):
    """Refused before the GPU is asked for: the same on machines with and without one."""
    assert_user_error(run_cli("bench", "--synthetic", "tiny", *args, "--kv-dir", str(tmp_path), "--no-cgroup",
                              timeout=120), words)


def test_ngl_rule():
    # 4 layers of 100 MB weights, 50 MB KV each; output layer 30 MB
    blocks, kv = [100 * MiB] * 4, [50 * MiB] * 4
    # the whole KV fits: everything on the GPU (n_layer + 1)
    assert gpu.ngl_fit(blocks, kv, 30 * MiB, 200 * MiB) == 5
    # 25% of the KV (50 MB): 4 layers' KV does not fit; 3 layers cost 3 x 150 <= 400 + 50: n = 1 + 3
    assert gpu.ngl_fit(blocks, kv, 30 * MiB, 50 * MiB) == 4
    # no VRAM for KV at all: 2 layers on the GPU still fit (the other two's weights pay for their KV)
    assert gpu.ngl_fit(blocks, kv, 30 * MiB, 0) == 3
    # KV far heavier than the weights: fewer layers
    assert gpu.ngl_fit([10 * MiB] * 4, [100 * MiB] * 4, 5 * MiB, 100 * MiB) == 2  # output + 1 layer
    assert gpu.ngl_fit([10 * MiB] * 4, [100 * MiB] * 4, 5 * MiB, 50 * MiB) == 1   # output only
    assert gpu.ngl_fit([], [], 0, 0) == 1


def test_ngl_from_the_gguf_table(tiny_path):
    from dualblade.gguf_header import model_info

    info = model_info(tiny_path)
    kv_total = sum(info.layer_bytes(2048))
    n_layer = len(info.layers)
    assert gpu.ngl_for_budget(info, 2048, kv_total) == n_layer + 1
    assert 1 <= gpu.ngl_for_budget(info, 2048, kv_total // 4) <= n_layer
    assert gpu.host_weights(info, 10**12) == info.tensor_bytes["token_embd.weight"]


def test_host_limits():
    w, hw, kv, host, ov = 1300 * MiB, 280 * MiB, GiB, 256 * MiB, 900 * MiB
    for p in ("mmap", "direct", "auto"):
        assert gpu.gpu_cell_limit(p, w, hw, kv, host, ov) == hw + host + ov
    for p in ("vram", "nkvo", "nkvo-fa", "ngl", "ram"):
        assert gpu.gpu_cell_limit(p, w, hw, kv, host, ov) == w + kv + ov


def test_policies_agree_between_the_bench_and_its_cells():
    assert set(matrix.GPU_STOCK) == set(cell.GPU_STOCK)
    assert set(gpu.GPU_REFERENCE) <= set(matrix.GPU_STOCK) <= set(matrix.GPU_POLICIES)


def _row(policy, budget, **kw):
    r = {"policy": policy, "budget": budget, "budget_bytes": None if budget == gpu.REF_LABEL else 256 * MiB,
         "status": "ok", "ok_runs": 1, "runs": 1, "limit_bytes": None}
    r.update(kw)
    return r


GEN = 32
ROWS = [
    _row("vram", "-", ttft_s=0.5, decode_ms=2.0),
    _row("nkvo-fa", "-", ttft_s=10.0, decode_ms=150.0),
    _row("nkvo", "-", ttft_s=60.0, decode_ms=40.0),
    _row("ngl", "25%", ttft_s=1.0, decode_ms=20.0, n_gpu_layers=9),
    # ram: 0.25 GiB host-to-device per token
    _row("ram", "25%", ttft_s=0.6, decode_ms=6.0, decode_h2d_bytes=GEN * GiB // 4),
    _row("mmap", "25%", ttft_s=8.0, decode_ms=900.0),
    # auto: 0.25 GiB per token read from storage (the kernel's count is the larger), 0.25 GiB copied
    _row("auto", "25%", ttft_s=4.0, decode_ms=300.0, decode_bytes_read=GEN * GiB // 8,
         decode_proc_read_bytes=GEN * GiB // 4, decode_h2d_bytes=GEN * GiB // 4),
]


def test_gpu_ratios():
    (e,) = gpu.gpu_ratios(ROWS, ["25%"], read_gib_s=1.0, h2d_gib_s=50.0, gen_tokens=GEN)
    assert e["auto_vs_mmap_decode"] == pytest.approx(3.0)
    assert e["auto_vs_mmap_prefill"] == pytest.approx(2.0)
    assert e["auto_io_bound_ms"] == pytest.approx(250.0)  # 0.25 GiB at 1 GiB/s
    assert e["auto_copy_bound_ms"] == pytest.approx(5.0)  # 0.25 GiB at 50 GiB/s
    assert e["auto_bound_ms"] == pytest.approx(250.0) and e["auto_bound_complete"]
    assert e["auto_vs_bound"] == pytest.approx(1.2)
    assert e["ram_bound_ms"] == pytest.approx(5.0)
    assert e["ram_vs_bound"] == pytest.approx(1.2)
    assert e["ram_vs_vram_prefill"] == pytest.approx(1.2)
    assert e["ram_vs_nkvo_decode"] == pytest.approx(40.0 / 6.0) and e["nkvo_fastest"] == "nkvo"
    assert e["ngl_n_gpu_layers"] == 9
    # auto against the faster of mmap and direct (no direct cell here: mmap), the page cache against pinned RAM
    assert e["auto_vs_best_decode"] == pytest.approx(3.0) and e["auto_vs_best_prefill"] == pytest.approx(2.0)
    assert e["mmap_vs_ram_decode"] == pytest.approx(150.0)
    assert "prefill_read_vs_written" not in e  # no cell counted its prefill's bytes
    with_direct = ROWS + [_row("direct", "25%", ttft_s=3.0, decode_ms=250.0)]
    (e,) = gpu.gpu_ratios(with_direct, ["25%"], read_gib_s=1.0, h2d_gib_s=50.0, gen_tokens=GEN)
    assert e["auto_vs_best_decode"] == pytest.approx(250.0 / 300.0) and e["auto_vs_best_prefill"] == pytest.approx(0.75)
    counted = [dict(r, prefill_read_vs_written=0.5) if r["policy"] == "auto" else r for r in ROWS]
    (e,) = gpu.gpu_ratios(counted, ["25%"], read_gib_s=1.0, h2d_gib_s=50.0, gen_tokens=GEN)
    assert e["prefill_read_vs_written"] == {"auto": 0.5}


def test_gpu_ratios_storage_bandwidth_is_the_best_seen():
    # a cell read at 2 GiB/s while decoding: a 1 GiB/s probe undershot, and the bound uses the 2 GiB/s
    rows = ROWS + [_row("direct", "25%", ttft_s=9.0, decode_ms=200.0, read_gib_s=2.0)]
    (e,) = gpu.gpu_ratios(rows, ["25%"], read_gib_s=1.0, h2d_gib_s=50.0, gen_tokens=GEN)
    assert e["storage_gib_s"] == 2.0 and e["storage_gib_s_from"] == "the fastest cell"
    assert e["auto_io_bound_ms"] == pytest.approx(125.0) and e["auto_vs_bound"] == pytest.approx(2.4)
    failed = [dict(r, status="timeout") if r["policy"] == "direct" else r for r in rows]
    (e,) = gpu.gpu_ratios(failed, ["25%"], read_gib_s=1.0, h2d_gib_s=50.0, gen_tokens=GEN)
    assert e["storage_gib_s"] == 1.0 and e["storage_gib_s_from"] == "probe"


def test_gpu_ratios_without_copy_probe_or_cells():
    (e,) = gpu.gpu_ratios(ROWS, ["25%"], read_gib_s=1.0, h2d_gib_s=None, gen_tokens=GEN)
    assert e["auto_copy_bound_ms"] is None and not e["auto_bound_complete"]
    assert e["ram_bound_ms"] == pytest.approx(2.0) and not e["ram_bound_complete"]  # compute term only
    failed = [dict(r, status="OOM-killed") if r["policy"] == "mmap" else r for r in ROWS]
    (e,) = gpu.gpu_ratios(failed, ["25%"], 1.0, 50.0, GEN)
    assert "auto_vs_mmap_decode" not in e and "auto_vs_bound" in e
    (e,) = gpu.gpu_ratios([], ["25%"], 1.0, 50.0, GEN)
    assert e == {"budget": "25%", "vram_decode_ms": None, "vram_ttft_s": None}


def _gpu_result():

    rows = [dict(r, peak_bytes=GiB, peak_vram_bytes=3 * GiB, decode_ms_range=None, decode_tok_s=1e3 / r["decode_ms"],
                 tokens_equal_vram=True) for r in ROWS]
    for r in rows:
        if r.get("decode_h2d_bytes"):
            r["h2d_bytes_per_token"] = r["decode_h2d_bytes"] / GEN
            r["copy_wait_ms_per_token"] = 0.5
            r["vram_layers"] = {"resident": 4, "streamed": 12}
    rows.append(_row("direct", "25%", status="timeout: not done after 120 s (thrashing)", ttft_s=None,
                     decode_ms=None, peak_bytes=None))
    res = {"mode": "gpu", "model": {"label": "synthetic llama-1b", "path": "x", "kv_bytes_total": GiB,
                                    "weights_bytes": 1300 * MiB, "host_weights_bytes": 280 * MiB},
           "workload": {"n_ctx": 32768, "prompt_tokens": 16384, "gen_tokens": GEN, "reps": 1},
           "machine": {"gpu": {"name": "NVIDIA H200"}}, "host_budget": {"label": "25%", "bytes": 256 * MiB},
           "probe": {"read_gib_s": 1.5}, "copy_probe": {"h2d_gib_s": 50.0, "d2h_gib_s": 45.0},
           "location": {"path": "/tmp"}, "memory_enforced": True, "overhead_bytes": 900 * MiB,
           "ratios": gpu.gpu_ratios(ROWS, ["25%"], 1.5, 50.0, GEN)}
    res["rows"] = rows
    return res


def test_gpu_table_renders():
    from dualblade.cli.bench import render_gpu

    res = _gpu_result()
    out = io.StringIO()
    render_gpu(res, Console(file=out, width=250))
    text = out.getvalue()
    for word in ("nkvo-fa", "peak VRAM", "3.00 GiB", "0.250", "auto vs mmap: decode 3.00x", "ram decode",
                 "timeout", "NVIDIA H200"):
        assert word in text, word
    res["copy_probe"] = {"h2d_gib_s": None, "why": "torch is not installed"}
    out = io.StringIO()
    render_gpu(res, Console(file=out, width=250))
    assert "lack their copy term" in out.getvalue()


def test_gpu_plot_draws_every_cell(tmp_path):
    pytest.importorskip("matplotlib")
    from dualblade.cli.bench import plot

    res = _gpu_result()
    fig = plot(res, tmp_path / "gpu.png")
    png = (tmp_path / "gpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the bars are the cells that decoded (the timed-out one is left out), in order, with their budgets
    import matplotlib.pyplot as plt

    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["vram", "nkvo-fa", "nkvo", "ngl\n25%", "ram\n25%", "mmap\n25%", "auto\n25%"]
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == [r["decode_ms"] for r in ROWS]
    plt.close(fig)


def test_draft_cells_on_the_gpu(tiny_path, monkeypatch):
    """bench --draft --gpu, its cell plan and pairs on faked cells (no GPU here): the reference is the drop-in with
    every layer in VRAM (stock llama_cpp cannot run draft_model=), the budgets are VRAM budgets, the host tiers get
    the host budget and the GPU cells' host limit, and exactness is against the reference."""
    from dualblade.bench import speculative

    calls = []

    def fake_cell(opts, policy, budget, limit, prompt, gen, n_ctx, timeout, extra):
        calls.append((policy, budget, limit, extra))
        fast = extra["draft"] is not None and extra["workload"] == "repeat"
        return {"ok": True, "ttft_s": 1.0, "decode_ms": 10.0, "decode_tok_s": 20.0 if fast else 8.0,
                "decode_bytes_read_per_token": 0 if policy == "vram" else (MiB if fast else 3 * MiB),
                "decode_io_wait_share": 0.0 if policy == "vram" else 0.7, "tokens": [1, 2, 3],
                "speculation": {"mean_accepted_length": 2.5, "acceptance": 0.6} if extra["draft"] else None}

    from dualblade.gguf_header import model_info

    info = model_info(tiny_path)
    monkeypatch.setattr(speculative, "check_options", lambda opts: (info, [("25%", 8 * MiB)]))
    monkeypatch.setattr(speculative, "prepare", lambda opts, log: {"read_gib_s": 2.0})
    monkeypatch.setattr(speculative, "memory_overhead", lambda opts, w, log: 900 * MiB)
    monkeypatch.setattr(speculative, "run_cell", fake_cell)
    monkeypatch.setattr(speculative, "gpu_machine", lambda: {"name": "a test GPU"})
    monkeypatch.setattr(speculative, "describe_location", lambda d, v: {"path": "/kv"})
    opts = matrix.BenchOptions(model=tiny_path, policies=["ram", "direct", "auto"], budgets=["25%"], n_ctx=2048,
                               prompt_tokens=1024, gen_tokens=16, gpu=True, host_budget="16M")
    res = speculative.run_bench_speculative(opts, "lookup")
    assert res["reference"] == "vram" and res["gpu"] and res["host_budget"]["bytes"] == 16 * MiB
    refs = [c for c in calls if c[0] == "vram"]
    assert len(refs) == 4 and all(c[3]["dropin"] and c[3]["vram_budget"] is None and c[1] is None for c in refs)
    for policy, budget, limit, extra in calls:
        assert extra["gpu"]
        if policy != "vram":
            assert extra["vram_budget"] == 8 * MiB
            assert budget == (16 * MiB if policy in ("direct", "auto") else None)  # ram: every host copy pinned
        if policy in ("direct", "auto"):
            assert limit == gpu.host_weights(info, tiny_path.stat().st_size) + 16 * MiB + 900 * MiB
    pairs = {(e["workload"], e["policy"]): e for e in res["pairs"]}
    assert pairs[("repeat", "direct")]["draft_vs_plain"] == 2.5 and pairs[("fresh", "direct")]["draft_vs_plain"] == 1
    assert all(r["tokens_equal_ram"] for r in res["rows"])
    out = io.StringIO()
    from dualblade.cli.bench import render_speculative

    render_speculative(res, Console(file=out, width=200))
    assert "all-in-VRAM" in out.getvalue() and "a test GPU" in out.getvalue()
