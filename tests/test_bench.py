"""`dualblade bench`: a tiny matrix end to end (the CI smoke run), and its errors.

Speed is not asserted (machines here are shared and noisy); every column must be filled and sane.
"""
import json
import shutil

import pytest

from dualblade.bench import cgroup
from conftest import assert_user_error, init_ext4, run_cli

POLICIES = ["stock", "ram", "mmap", "direct", "direct-noverify", "auto"]  # every policy, plotted too


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--synthetic", "tiny", "--ctx-size", "2048", "-p", "1024", "-n", "6", "-r", "1",
            "--budgets", "100%,40%", "--policies", ",".join(POLICIES), "--kv-dir", str(out), "--probe-size", "64M",
            "--json", str(out / "bench.json"), "--plot", str(out / "bench.png")]
    if cgroup.available() is not None:
        args.append("--no-cgroup")
    p = run_cli(*args, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return p, json.loads((out / "bench.json").read_text())


def test_every_cell_ran_and_is_exact(smoke):
    p, res = smoke
    rows = {(r["policy"], r["budget"]): r for r in res["rows"]}
    assert set(rows) == {(pol, b) for pol in POLICIES for b in ("100%", "40%")}
    for (pol, budget), r in rows.items():
        assert r["status"] == "ok", (pol, budget, r["status"])
        assert r["ttft_s"] > 0 and r["decode_ms"] > 0 and r["decode_tok_s"] > 0
        assert r["user_s"] > 0 and r["maxrss_bytes"] > 0
        assert r["tokens_equal_ram"] is True, (pol, budget)  # exact: the all-in-RAM tokens
        if res["memory_enforced"]:
            assert 0 < r["peak_bytes"] <= r["limit_bytes"]
    # offloaded policies at 40% really went to storage
    for pol in ("mmap", "direct", "auto"):
        r = rows[(pol, "40%")]
        assert r["offloaded_bytes"] > 0 and r["layers_by_path"]["ram"] < 8
    assert rows[("direct", "40%")]["bytes_read"] > 0 and rows[("direct", "40%")]["read_gib_s"] > 0
    assert rows[("direct", "40%")]["io_engine"] in ("io_uring", "threads")
    # the module's counters agree with the kernel's: O_DIRECT reads show in /proc/self/io
    d = rows[("direct", "40%")]
    assert d["proc_read_bytes"] >= 0.9 * d["bytes_read"]
    # at 100% nothing is offloaded
    assert rows[("direct", "100%")]["offloaded_bytes"] == 0


def test_report_has_probe_machine_and_ratios(smoke):
    p, res = smoke
    assert res["probe"]["read_gib_s"] > 0 and res["probe"]["bytes"] >= 32 << 20
    assert res["machine"]["cores"] >= 1 and res["machine"]["kernel"]
    assert res["cgroup_version"] in ((1, 2) if res["memory_enforced"] else (None,))
    assert res["ram_reference"]["decode_ms"] > 0
    r40 = next(e for e in res["ratios"] if e["budget"] == "40%")
    assert r40["auto_vs_mmap_decode"] > 0 and r40["auto_vs_mmap_prefill"] > 0 and r40["bound_decode_ms"] > 0
    # the table names every policy, and says when memory was not enforced
    for pol in POLICIES:
        assert f" {pol} " in p.stdout
    assert "device probe" in p.stdout
    if not res["memory_enforced"]:
        assert "NOT memory-enforced" in p.stdout


@pytest.mark.parametrize("args, words", [
    (["--synthetic", "nope"], "unknown synthetic shape"),
    (["/nonexistent.gguf"], "does not exist"),
    (["--synthetic", "tiny", "-p", "5000", "-c", "2048"], "do not fit"),
    (["--synthetic", "tiny", "--budgets", "150%"], "between 0% and 100%"),
    (["--synthetic", "tiny", "--budgets", "lots"], "lots"),
    (["--synthetic", "tiny", "--policies", "fast"], "unknown policy"),
    (["--synthetic", "tiny", "-r", "0"], "at least 1"),
])
def test_bad_input_is_one_line(args, words, tmp_path):
    assert_user_error(run_cli("bench", *args, "--kv-dir", str(tmp_path), "--no-cgroup", timeout=120), words)


@pytest.mark.parametrize("args, words", [
    (["--synthetic", "tiny", "--kv-device", "/etc/hostname"], "not a block device"),
    (["--synthetic", "tiny", "--kv-dir", "/nonexistent/kv"], "does not exist"),
    (["--synthetic", "tiny", "--kv-dir", "/tmp", "--kv-device", "/dev/null"], "only one"),
    (["--synthetic", "tiny", "--force"], "--force takes over a --kv-device"),
])
def test_kv_location_is_checked_before_anything_starts(args, words):
    """--kv-dir and --kv-device get the checks and the words chat gets, before a probe or a cell runs."""
    assert_user_error(run_cli("bench", *args, "--no-cgroup", timeout=120), words)


def test_a_device_holding_a_file_system_is_not_taken(make_loop):
    """What a user keeps on a device is never benchmarked over: refused up front unless --force, as in chat."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is needed")
    dev = make_loop(256 << 20, init_ext4)
    before = open(dev, "rb").read(2 << 20)
    p = run_cli("bench", "--synthetic", "tiny", "-c", "1024", "-p", "64", "-n", "2", "--kv-device", dev,
                "--no-cgroup", "--policies", "direct", "--budgets", "50%", timeout=300)
    assert_user_error(p, "--force")
    assert "file system" in p.stderr
    assert open(dev, "rb").read(2 << 20) == before  # not a byte written


def test_existing_output_is_not_overwritten(tmp_path):
    target = tmp_path / "mine.json"
    target.write_text("precious")
    p = run_cli("bench", "--synthetic", "tiny", "--json", str(target), "--no-cgroup", timeout=120)
    assert p.returncode != 0 and "would be overwritten" in p.stderr
    assert target.read_text() == "precious"
