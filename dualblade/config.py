"""Validation of the KV options shared by the Python API and the CLI: one place for each rule."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ._native import POLICIES
from .errors import ConfigError
from .sizes import parse_size


@dataclass(frozen=True)
class KVConfig:
    policy: str
    budget_bytes: int | None
    kv_dir: str | None
    kv_device: str | None

    @classmethod
    def from_args(cls, mem_budget=None, kv_policy="ram", kv_dir=None, kv_device=None) -> "KVConfig":
        if kv_policy is None:
            kv_policy = "ram"
        if not isinstance(kv_policy, str) or kv_policy.lower() not in POLICIES:
            raise ConfigError(f"unknown KV policy {kv_policy!r}; choose one of {', '.join(POLICIES)}")
        policy = kv_policy.lower()
        try:
            budget = None if mem_budget is None else parse_size(mem_budget, "memory budget")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if budget is not None:
            total = _mem_total()
            if total and budget > total:
                raise ConfigError(f"memory budget {mem_budget} is more than this machine's memory "
                                  f"({total / 2**30:.1f} GiB); give a smaller --mem-budget")
        if kv_dir is not None and kv_device is not None:
            raise ConfigError("kv_dir and kv_device were both given; the KV lives in one place, give only one")
        if kv_dir is not None:
            kv_dir = os.fspath(kv_dir)
            if not os.path.exists(kv_dir):
                raise ConfigError(f"KV directory {kv_dir} does not exist; create it or give another --kv-dir")
            if not os.path.isdir(kv_dir):
                raise ConfigError(f"KV directory {kv_dir} is not a directory; give a directory for --kv-dir")
            if not os.access(kv_dir, os.W_OK | os.X_OK):
                raise ConfigError(f"KV directory {kv_dir} is not writable; give a writable --kv-dir")
        if kv_device is not None:
            kv_device = os.fspath(kv_device)
            try:
                st = os.stat(kv_device)
            except FileNotFoundError:
                raise ConfigError(f"KV device {kv_device} does not exist; give a block device such as /dev/nvme0n1p3") from None
            if not stat.S_ISBLK(st.st_mode):
                raise ConfigError(f"KV device {kv_device} is not a block device; give a raw device or partition "
                                  "(or use --kv-dir for a file)")
        return cls(policy, budget, kv_dir, kv_device)


def _mem_total() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
