"""Run a command under a memory limit in a child cgroup (v2 or v1, whichever the machine has).

The limit counts page cache charged to the group, as the kernel does: that is the honest measure
for a KV cache on storage. Used by the memory tests and the benchmark.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


class CgroupUnavailable(RuntimeError):
    pass


@dataclass
class CgroupResult:
    returncode: int
    stdout: str
    stderr: str
    peak_bytes: int        # peak of memory charged to the group: RSS + page cache
    oom_killed: bool
    limit_bytes: int
    version: int


V2_ROOT, V1_MEMORY_ROOT = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")


def _memberships(pid: int | str = "self") -> list[tuple[list[str], str]]:
    """/proc/PID/cgroup: (controllers, path) per hierarchy; v2's unified one has no controllers."""
    out = []
    for line in open(f"/proc/{pid}/cgroup"):
        parts = line.rstrip("\n").split(":", 2)
        if len(parts) == 3:
            out.append(([c for c in parts[1].split(",") if c], parts[2]))
    return out


def _v1_memory_path(pid: int | str = "self") -> Path | None:
    return next((V1_MEMORY_ROOT / path.lstrip("/") for ctrls, path in _memberships(pid) if "memory" in ctrls), None)


def _v2_path(pid: int | str = "self") -> Path | None:
    return next((V2_ROOT / path.lstrip("/") for ctrls, path in _memberships(pid) if not ctrls), None)


def current(pid: int | str = "self") -> Path | None:
    """The directory of the memory cgroup process pid is in: the v1 memory controller's, else the v2
    group's; None if it is in neither."""
    return _v1_memory_path(pid) or _v2_path(pid)


def _v2_delegating(base: Path, root: Path = V2_ROOT) -> Path | None:
    """The group under which a v2 child may get a memory limit: the nearest of base and its ancestors (up to
    root) that delegates "memory" to its children (its cgroup.subtree_control) and that we may write. A group
    holding processes cannot delegate ("no internal processes"), so where a command's processes were moved
    into a leaf, the children go beside that leaf."""
    for g in (base, *base.parents):
        sc = g / "cgroup.subtree_control"
        if sc.exists() and "memory" in sc.read_text().split() and os.access(g, os.W_OK):
            return g
        if g == root or root not in g.parents:
            break
    return None


def _v2_root() -> Path | None:
    if (V2_ROOT / "cgroup.controllers").exists():
        base = _v2_path()
        if base is None:
            return None
        delegating = _v2_delegating(base)
        if delegating is not None:
            return delegating
        # a v2 process may only be moved into a leaf of a subtree whose parent delegates "memory"
        if "memory" in (V2_ROOT / "cgroup.controllers").read_text().split():
            return base if os.access(base, os.W_OK) else None
    return None


def _v1_root() -> Path | None:
    base = _v1_memory_path()
    if base is None:
        return None
    if base.exists() and os.access(base, os.W_OK):
        return base
    return V1_MEMORY_ROOT if os.access(V1_MEMORY_ROOT, os.W_OK) else None


def members(group: Path) -> list[int]:
    """The processes in group (its cgroup.procs)."""
    return [int(p) for p in (group / "cgroup.procs").read_text().split()]


def available() -> str | None:
    """None if a memory-limited child cgroup can be made here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "making cgroups needs root"
    if _v2_root() is None and _v1_root() is None:
        return "no writable cgroup v1 or v2 memory controller"
    return None


def drop_caches() -> None:
    """So that pages already cached are charged to the next group that reads them."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


@contextlib.contextmanager
def child(limit_bytes: int) -> Iterator[tuple[Path, int]]:
    """A fresh child memory cgroup limited to limit_bytes (no swap on v2): yields (its directory, the cgroup
    version); removed afterwards once empty (the caller may remove it first)."""
    reason = available()
    if reason:
        raise CgroupUnavailable(reason)
    v2 = _v2_root()
    name = f"dualblade-{uuid.uuid4().hex[:12]}"
    group, version = (v2 / name, 2) if v2 is not None else (_v1_root() / name, 1)
    group.mkdir()
    try:
        if version == 2:
            (group / "memory.max").write_text(str(limit_bytes))
            (group / "memory.swap.max").exists() and (group / "memory.swap.max").write_text("0")
        else:
            (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        yield group, version
    finally:
        for _ in range(100):  # a killed process may take a moment to leave
            if not group.exists():
                break
            try:
                group.rmdir()
            except OSError:
                time.sleep(0.1)


def joined(group: Path, cmd: list[str]) -> list[str]:
    """cmd, made to join group before it execs: everything it maps (and its io_uring workers) is charged there."""
    return ["sh", "-c", f'echo $$ > "{group / "cgroup.procs"}" && exec "$@"', "sh", *cmd]


def run_limited(cmd: list[str], limit_bytes: int, timeout: float = 600, env: dict | None = None,
                cold: bool = True) -> CgroupResult:
    """Runs cmd in a fresh child cgroup limited to limit_bytes; returns its result and peak memory."""
    with child(limit_bytes) as (group, version):
        if cold:
            drop_caches()
        p = subprocess.run(joined(group, cmd), capture_output=True, text=True, timeout=timeout, env=env)
        if version == 2:
            peak_file = group / "memory.peak"
            peak = int(peak_file.read_text()) if peak_file.exists() else 0
            events = dict(l.split() for l in (group / "memory.events").read_text().splitlines())
            oom = int(events.get("oom_kill", 0)) > 0
        else:
            peak = int((group / "memory.max_usage_in_bytes").read_text())
            oom_ctl = dict(l.split() for l in (group / "memory.oom_control").read_text().splitlines())
            oom = int(oom_ctl.get("oom_kill", 0)) > 0 or p.returncode == -9
        return CgroupResult(p.returncode, p.stdout, p.stderr, peak, oom, limit_bytes, version)
