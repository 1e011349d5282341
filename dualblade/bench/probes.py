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


def describe_location(kv_dir: Optional[tuple[str, ...]], kv_device: Optional[tuple[str, ...]]) -> dict:
    """The KV location: a member's path, kind, file system and device; several members: their paths joined and each
    one's description under "members"."""
    members = kv_device or kv_dir
    descs = [_describe_member(p, bool(kv_device)) for p in members]
    if len(descs) == 1:
        return descs[0]
    return {"path": ", ".join(members), "kind": descs[0]["kind"], "members": descs}


def _describe_member(path: str, device: bool) -> dict:
    desc = {"path": path, "kind": "device" if device else "file"}
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", path], capture_output=True,
                             text=True, timeout=5).stdout.split()
        if out and not device:
            desc["device"], desc["fs"] = out[0], out[1] if len(out) > 1 else "?"
    except (OSError, subprocess.SubprocessError):
        pass
    dev = path if device else desc.get("device")
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

    return _in_threads([worker] * depth, errors)


def _in_threads(fns, errors: list[Exception]) -> float:
    """Seconds to run every fn, each in a thread of its own; the first error any of them recorded raised."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=fn) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _read_members(targets: list[tuple[int, int, int]], chunk: int, depth: int) -> tuple[float, list[float]]:
    """Seconds to read every (fd, base, nbytes) target at once (as a striped store reads its members), and each
    target's own seconds."""
    times: list[Optional[float]] = [None] * len(targets)
    errors: list[Exception] = []

    def one(i: int) -> None:
        fd, base, nbytes = targets[i]
        try:
            times[i] = _read_all(fd, base, nbytes, chunk, depth)
        except OSError as e:
            errors.append(e)

    return _in_threads([lambda i=i: one(i) for i in range(len(targets))], errors), times


def probe_read_bandwidth(kv_dir: Optional[tuple[str, ...]], kv_device: Optional[tuple[str, ...]],
                         nbytes: int) -> dict:
    """O_DIRECT sequential read bandwidth of the KV location, the best over READ_PROBE_SHAPES (each shape's figure
    kept). A file is written first (O_DIRECT too) and deleted after. Several members (a striped store): all read at
    once, each its nbytes; read_gib_s is what they give together, "members" each one's figure in that run."""
    members = kv_device or kv_dir
    chunk = max(c for c, _ in READ_PROBE_SHAPES)
    nbytes = max(chunk * 8, nbytes // chunk * chunk)
    targets, writes, fds = [], [], []
    try:
        for path in members:
            if kv_device:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                fds.append(fd)
                size = os.lseek(fd, 0, os.SEEK_END)
                targets.append((fd, MiB, min(nbytes, (size - MiB) // chunk * chunk)))
                writes.append(None)
            else:
                fd, tmp = tempfile.mkstemp(dir=path, prefix=".dualblade-probe-")
                os.close(fd)
                fd = os.open(tmp, os.O_RDWR | os.O_DIRECT)
                fds.append(fd)
                os.unlink(tmp)
                buf = mmap.mmap(-1, chunk)
                buf.write(os.urandom(1 << 16) * (chunk >> 16))
                t0 = time.perf_counter()
                for off in range(0, nbytes, chunk):
                    os.pwritev(fd, [buf], off)
                os.fsync(fd)
                writes.append(nbytes / (time.perf_counter() - t0) / GiB)
                targets.append((fd, 0, nbytes))
        shapes, each = {}, {}
        for req, depth in READ_PROBE_SHAPES:
            for fd in fds:
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass
            name = f"{req // MiB} MiB x{depth}"
            wall, times = _read_members(targets, req, depth)
            shapes[name] = sum(t[2] for t in targets) / wall / GiB
            each[name] = [t[2] / s / GiB for t, s in zip(targets, times)]
    except OSError as e:
        raise OSError(f"probing {', '.join(members)} with O_DIRECT failed: {e}") from None
    finally:
        for fd in fds:
            os.close(fd)
    best = max(shapes, key=shapes.get)
    req, depth = next((r, d) for r, d in READ_PROBE_SHAPES if f"{r // MiB} MiB x{d}" == best)
    out = {"read_gib_s": shapes[best], "write_gib_s": writes[0] if len(members) == 1 else None,
           "bytes": targets[0][2] if len(members) == 1 else sum(t[2] for t in targets), "request_bytes": req,
           "in_flight": depth, "shapes_gib_s": shapes}
    if len(members) > 1:
        out["members"] = [{"path": p, "read_gib_s": r, "write_gib_s": w, "bytes": t[2]}
                          for p, r, w, t in zip(members, each[best], writes, targets)]
    return out


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

