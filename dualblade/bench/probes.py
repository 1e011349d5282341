"""What a bench run measures of the machine before its cells: what it is (CPU, GPU, the KV location), and the
bandwidths every figure is set against (O_DIRECT reads of the KV location, host-to-device copies)."""
from __future__ import annotations

import json
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from ..config import mem_total

MiB = 1 << 20
GiB = 1 << 30


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem_total() or 0, "kernel": platform.release(),
            "python": platform.python_version()}


def describe_location(kv_dir: Optional[str], kv_device: Optional[str]) -> dict:
    path = kv_device or kv_dir
    desc = {"path": path, "kind": "device" if kv_device else "file"}
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", path], capture_output=True,
                             text=True, timeout=5).stdout.split()
        if out and not kv_device:
            desc["device"], desc["fs"] = out[0], out[1] if len(out) > 1 else "?"
    except (OSError, subprocess.SubprocessError):
        pass
    dev = kv_device or desc.get("device")
    if dev and dev.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(dev))
        base = name.rstrip("0123456789") if not name.startswith("nvme") else name.split("p")[0]
        for key, f in (("rotational", "queue/rotational"), ("read_ahead_kb", "queue/read_ahead_kb")):
            try:
                desc[key] = int(Path(f"/sys/block/{base}/{f}").read_text())
            except (OSError, ValueError):
                pass
    return desc


# request size and requests in flight tried by the read probe: the best is the storage bandwidth a bound is set
# against (what the device gives O_DIRECT at its best), the direct path's own (4 MiB, 16) among them
READ_PROBE_SHAPES = ((1 * MiB, 4), (4 * MiB, 4), (4 * MiB, 16), (16 * MiB, 8))


def _read_all(fd: int, base: int, nbytes: int, chunk: int, depth: int) -> float:
    """Seconds to read [base, base + nbytes) with O_DIRECT, `chunk` bytes a request, `depth` in flight."""
    offsets = list(range(base, base + nbytes, chunk))
    lock = threading.Lock()
    errors: list[Exception] = []

    def worker():
        b = mmap.mmap(-1, chunk)
        while True:
            with lock:
                if not offsets:
                    return
                off = offsets.pop(0)
            try:
                os.preadv(fd, [b], off)
            except OSError as e:
                errors.append(e)
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def probe_read_bandwidth(kv_dir: Optional[str], kv_device: Optional[str], nbytes: int) -> dict:
    """O_DIRECT sequential read bandwidth of the KV location, the best over READ_PROBE_SHAPES (each shape's figure
    kept). A file is written first (O_DIRECT too) and deleted after."""
    chunk = max(c for c, _ in READ_PROBE_SHAPES)
    nbytes = max(chunk * 8, nbytes // chunk * chunk)
    if kv_device:
        fd = os.open(kv_device, os.O_RDONLY | os.O_DIRECT)
        size = os.lseek(fd, 0, os.SEEK_END)
        nbytes = min(nbytes, (size - MiB) // chunk * chunk)
        base, write_gib_s, tmp = MiB, None, None
    else:
        fd, tmp = tempfile.mkstemp(dir=kv_dir, prefix=".dualblade-probe-")
        os.close(fd)
        fd = os.open(tmp, os.O_RDWR | os.O_DIRECT)
        os.unlink(tmp)
        buf = mmap.mmap(-1, chunk)
        buf.write(os.urandom(1 << 16) * (chunk >> 16))
        t0 = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        write_gib_s = nbytes / (time.perf_counter() - t0) / GiB
        base = 0
    shapes = {}
    try:
        for req, depth in READ_PROBE_SHAPES:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            shapes[f"{req // MiB} MiB x{depth}"] = nbytes / _read_all(fd, base, nbytes, req, depth) / GiB
    except OSError as e:
        raise OSError(f"probing {kv_device or kv_dir} with O_DIRECT failed: {e}") from None
    finally:
        os.close(fd)
    best = max(shapes, key=shapes.get)
    req, depth = next((r, d) for r, d in READ_PROBE_SHAPES if f"{r // MiB} MiB x{d}" == best)
    return {"read_gib_s": shapes[best], "write_gib_s": write_gib_s, "bytes": nbytes, "request_bytes": req,
            "in_flight": depth, "shapes_gib_s": shapes}


_COPY_PROBE = r"""
import json, statistics, sys, time
try:
    import torch
except ImportError:
    print(json.dumps({"h2d_gib_s": None, "why": "torch is not installed"})); sys.exit()
if not torch.cuda.is_available():
    print(json.dumps({"h2d_gib_s": None, "why": "torch sees no GPU"})); sys.exit()
n = int(sys.argv[1])
h = torch.empty(n, dtype=torch.uint8, pin_memory=True); h.fill_(1)
d = torch.empty(n, dtype=torch.uint8, device="cuda")
def timed(dst, src):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    return time.perf_counter() - t0
timed(d, h); timed(h, d)
up = [timed(d, h) for _ in range(5)]
down = [timed(h, d) for _ in range(5)]
print(json.dumps({"h2d_gib_s": n / statistics.median(up) / 2**30, "d2h_gib_s": n / statistics.median(down) / 2**30,
                  "h2d_best_gib_s": n / min(up) / 2**30, "bytes": n, "runs": 5, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__}))
"""


def probe_copy_bandwidth(nbytes: int) -> dict:
    """Host-to-device (and back) copy bandwidth from pinned memory, measured with torch in a subprocess (median
    of 5 copies of nbytes). h2d_gib_s None, with why, where torch or its GPU is missing: the bound then lacks
    its copy term."""
    try:
        p = subprocess.run([sys.executable, "-c", _COPY_PROBE, str(nbytes)], capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        return {"h2d_gib_s": None, "why": "the copy probe did not finish in 300 s"}
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    tail = " ".join(p.stderr.strip().splitlines()[-2:])[-300:]
    return {"h2d_gib_s": None, "why": f"the copy probe failed: exit {p.returncode}: {tail}"}


def gpu_machine() -> dict:
    """The GPU the numbers were measured on (nvidia-smi; empty without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
        name, total, driver = [x.strip() for x in out.splitlines()[0].split(",")]
        return {"name": name, "memory_total_bytes": int(float(total)) << 20, "driver": driver}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}

