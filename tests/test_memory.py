"""Under a real cgroup memory limit (RSS + page cache): the direct path completes a context whose KV
is 4x the budget; the all-in-RAM run at the same limit is killed."""
import json
import os
import sys
from pathlib import Path

import pytest

from dualblade.bench import cgroup
from dualblade.gguf_header import model_info

pytestmark = pytest.mark.skipif(cgroup.available() is not None, reason=f"no memory cgroup: {cgroup.available()}")

# kv-heavy: 16 layers x 2 x 512 x f16 = 32 KiB of KV per token: 512 MiB at 16384 tokens, 32 MiB per layer. At 8192
# (256 MiB) the all-in-RAM run's KV beyond the budget (about 190 MiB) was barely more than the 48 MiB slack plus the
# 119 MiB of weights the kernel can evict and read again: on some days it completed at the limit, thrashing its
# weights, instead of being killed. At 16384 it is 200 MiB more than that.
N_CTX, N_TOKENS = 16384, 16000
MiB = 1 << 20
PROBE = str(Path(__file__).parent / "memory_probe.py")


def _run(model, policy, budget, n_ctx, n_tokens, kv_dir, limit):
    # the weights' pages leave the page cache first: cached, they stay charged to the cgroup that read them
    # (this one, which wrote the file), and the limited run would not pay for them (cgroup v1 and v2 alike)
    fd = os.open(model, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    args = [sys.executable, PROBE, str(model), policy, str(budget), str(n_ctx), str(n_tokens), str(kv_dir)]
    return cgroup.run_limited(args, limit, timeout=900)


@pytest.fixture(scope="module")
def limits(heavy_path, tmp_path_factory):
    """The limit of the tests: weights + a quarter of the KV + the measured overhead."""
    kv_total = sum(model_info(heavy_path).layer_bytes(N_CTX))
    budget = kv_total // 4
    weights = os.path.getsize(heavy_path)
    base = _run(heavy_path, "ram", "none", 256, 200, tmp_path_factory.mktemp("base"), 8 << 30)
    assert base.returncode == 0, base.stderr
    overhead = base.peak_bytes - weights + 48 * MiB  # + compute buffers that grow with the context
    return {"kv_total": kv_total, "budget": budget, "weights": weights, "overhead": overhead,
            "limit": weights + budget + overhead}


def test_auto_moves_to_the_direct_path_under_the_limit(heavy_path, limits, tmp_path):
    """At the same limit, auto sees that the page cache cannot hold the offloaded layers next to the
    weights: it puts them on the direct path (and says why), completes, stays under the limit."""
    r = _run(heavy_path, "auto", limits["budget"], N_CTX, N_TOKENS, tmp_path, limits["limit"])
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n_tokens"] == N_TOKENS + 8
    assert r.peak_bytes <= limits["limit"]
    assert res["paths"]["direct"] >= res["paths"]["mmap"], res
    assert res["memory"]["limit_bytes"] == limits["limit"]
    reasons = [s["reason"] for s in res["switches"]]
    assert reasons and reasons[0].startswith("start"), reasons
    print(f"\nauto under {limits['limit'] / MiB:.0f} MiB: paths {res['paths']}, peak {r.peak_bytes / MiB:.0f} MiB, "
          f"switches: {reasons}")


def test_auto_keeps_the_page_cache_when_memory_is_ample(heavy_path, limits, tmp_path):
    r = _run(heavy_path, "auto", limits["budget"], N_CTX, 2000, tmp_path, 8 << 30)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["paths"]["direct"] == 0 and res["paths"]["mmap"] > 0, res
    assert len(res["switches"]) == 1 and res["switches"][0]["to"] == "mmap"


def test_direct_completes_where_ram_is_killed(heavy_path, limits, tmp_path):
    kv_total, budget, weights, overhead, limit = (limits[k] for k in ("kv_total", "budget", "weights", "overhead",
                                                                       "limit"))

    direct = _run(heavy_path, "direct", budget, N_CTX, N_TOKENS, tmp_path, limit)
    assert direct.returncode == 0, direct.stderr[-2000:]
    res = json.loads(direct.stdout.strip().splitlines()[-1])
    assert res["kv_bytes_total"] == kv_total >= 4 * budget
    assert res["n_tokens"] == N_TOKENS + 8 and res["bytes_read"] > 0
    assert direct.peak_bytes <= limit

    ram = _run(heavy_path, "ram", "none", N_CTX, N_TOKENS, tmp_path, limit)
    assert ram.returncode != 0 and (ram.oom_killed or ram.returncode < 0 or "alloc" in ram.stderr.lower())
    print(f"\nlimit {limit / MiB:.0f} MiB (weights {weights / MiB:.0f} + budget {budget / MiB:.0f} + overhead "
          f"{overhead / MiB:.0f}); KV {kv_total / MiB:.0f} MiB; direct peak {direct.peak_bytes / MiB:.0f} MiB "
          f"(RSS + page cache, cgroup v{direct.version}), ram: rc {ram.returncode}, oom {ram.oom_killed}")
