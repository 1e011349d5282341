#!/usr/bin/env python3
"""What the GPU storage pipeline can reach on this machine, each in one number: host-to-device copies from
pinned and from pageable memory, O_DIRECT reads of a file at a few request sizes and depths, and a copy out of
the page cache. Prints one JSON object.

    python3 tools/gpu/probe_copies.py [DIR]    (DIR: where the test file goes; default /tmp)
"""
import json
import mmap
import os
import sys
import threading
import time

import torch

GiB = 1 << 30
d = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
out = {"device": torch.cuda.get_device_name(0)}

def h2d(pinned: bool, n: int = 1 * GiB) -> float:
    src = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=pinned); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=pinned)
    torch.cuda.synchronize()
    return 3 * n / (time.perf_counter() - t) / GiB

out["h2d_pinned_gib_s"] = h2d(True)
out["h2d_pageable_gib_s"] = h2d(False)

path = os.path.join(d, "probe-copies.bin")
size = 4 * GiB
with open(path, "wb") as f:
    block = os.urandom(64 << 20)
    for _ in range(size // len(block)):
        f.write(block)
    f.flush(); os.fsync(f.fileno())

def direct_read(req: int, depth: int) -> float:
    os.posix_fadvise(os.open(path, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    n_req = size // req
    nxt = [0]
    lock = threading.Lock()

    def worker():
        buf = mmap.mmap(-1, req)
        while True:
            with lock:
                i = nxt[0]; nxt[0] += 1
            if i >= n_req:
                return
            os.preadv(fd, [buf], i * req)

    t = time.perf_counter()
    th = [threading.Thread(target=worker) for _ in range(depth)]
    [x.start() for x in th]; [x.join() for x in th]
    os.close(fd)
    return size / (time.perf_counter() - t) / GiB

out["direct_read_gib_s"] = {f"{req >> 20}MiB x{depth}": round(direct_read(req, depth), 2)
                            for req, depth in ((4 << 20, 4), (4 << 20, 16), (16 << 20, 8))}
# the page cache: read once (cached now), then copy out of the mapping
with open(path, "rb") as f:
    while f.read(64 << 20):
        pass
    m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    buf = bytearray(64 << 20)
    t = time.perf_counter()
    for off in range(0, size, len(buf)):
        buf[:] = m[off:off + len(buf)]
    out["page_cache_copy_gib_s"] = size / (time.perf_counter() - t) / GiB
os.unlink(path)
print(json.dumps({k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}))
