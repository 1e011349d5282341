"""Validation of the KV options shared by the Python API and the CLI: one place for each rule."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ._native import POLICIES
from .errors import ConfigError, ModelError, StoreError
from .sizes import format_size, parse_size


@dataclass(frozen=True)
class KVConfig:
    policy: str
    budget_bytes: int | None
    kv_dir: str | None
    kv_device: str | None

    @classmethod
    def from_args(cls, mem_budget=None, kv_policy="ram", kv_dir=None, kv_device=None,
                  kv_force=False) -> "KVConfig":
        if kv_policy is None:
            kv_policy = "ram"
        if not isinstance(kv_policy, str):
            raise ConfigError(f"kv_policy must be a string, not {type(kv_policy).__name__}; choose one of "
                              f"{', '.join(repr(p) for p in POLICIES)}")
        if kv_policy.lower() not in POLICIES:
            raise ConfigError(f"unknown KV policy {kv_policy!r}; choose one of {', '.join(POLICIES)}")
        policy = kv_policy.lower()
        try:
            budget = None if mem_budget is None else parse_size(mem_budget, "memory budget")
        except ValueError as e:
            raise ConfigError(str(e).replace("memory budget must", "mem_budget must")) from None
        if budget is not None:
            total = mem_total()
            if total and budget > total:
                raise ConfigError(f"memory budget {format_size(budget)} is more than this machine's memory "
                                  f"({total / 2**30:.1f} GiB); give a smaller mem_budget")
        if not isinstance(kv_force, bool):
            raise ConfigError(f"kv_force must be True or False, not {type(kv_force).__name__}; pass kv_force=True to "
                              "take over a kv_device that holds something else")
        kv_dir = _path_arg(kv_dir, "kv_dir")
        kv_device = _path_arg(kv_device, "kv_device")
        if kv_dir is not None and kv_device is not None:
            raise ConfigError("kv_dir and kv_device were both given; the KV lives in one place, give only one")
        if kv_force and kv_device is None:
            raise ConfigError("kv_force takes over a kv_device, and no kv_device was given; give kv_device, or "
                              "drop kv_force")
        if kv_dir is not None:
            _check_kv_dir(kv_dir)
        if kv_device is not None:
            try:
                st = os.stat(kv_device)
            except FileNotFoundError:
                raise StoreError(f"KV device {kv_device} does not exist; give a block device such as "
                                 "/dev/nvme0n1p3 for kv_device") from None
            except OSError as e:
                raise StoreError(f"cannot look at KV device {kv_device}: {e.strerror}; give another "
                                 "kv_device") from None
            if not stat.S_ISBLK(st.st_mode):
                raise StoreError(f"KV device {kv_device} is not a block device; give a raw device or partition "
                                 "for kv_device (or a directory as kv_dir for a file)")
        return cls(policy, budget, kv_dir, kv_device)


def size_arg(value, name: str) -> int:
    """A size argument (bytes or a size string) in bytes; ConfigError naming `name` for a bad one."""
    try:
        return parse_size(value, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _path_arg(value, name: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{name} must be a path (str or os.PathLike), not {type(value).__name__}; give e.g. "
                          f"{name}='/mnt/nvme/kv'")
    value = os.fspath(value)
    if not value:
        raise ConfigError(f"{name} is empty; give a path, or leave it out")
    return os.path.expanduser(value)


def _check_kv_dir(kv_dir: str) -> None:
    if not os.path.exists(kv_dir):
        raise StoreError(f"KV directory {kv_dir} does not exist; create it or give another kv_dir")
    if not os.path.isdir(kv_dir):
        raise StoreError(f"KV directory {kv_dir} is not a directory; give a directory for kv_dir")
    try:
        read_only = bool(os.statvfs(kv_dir).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise StoreError(f"KV directory {kv_dir} is on a read-only file system; give a writable kv_dir")
    if not os.access(kv_dir, os.W_OK | os.X_OK):
        raise StoreError(f"KV directory {kv_dir} is not writable by this user; give a writable kv_dir "
                         "(or change its permissions)")


def mem_total() -> int | None:
    """MemTotal in bytes, or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# llama.cpp's rope-scaling arguments: with any of them a context beyond the training one is intended
_ROPE_ARGS = ("rope_scaling_type", "rope_freq_scale", "yarn_orig_ctx")


def check_model_file(model_path) -> dict:
    """The GGUF metadata of model_path; ModelError when it is missing, a directory, not GGUF or truncated."""
    from .gguf_header import read_metadata

    if not isinstance(model_path, (str, os.PathLike)):
        raise ModelError(f"model_path must be a path (str or os.PathLike), not {type(model_path).__name__}; give "
                         "the path of a .gguf file")
    return read_metadata(model_path)


def check_context_args(meta: dict, kwargs: dict) -> None:
    """ConfigError for an n_ctx of the wrong type, negative, or beyond the model's training context."""
    n_ctx = kwargs.get("n_ctx", 512)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
        raise ConfigError(f"n_ctx must be a whole number of tokens, not {type(n_ctx).__name__}; give e.g. "
                          "n_ctx=4096")
    if n_ctx < 0:
        raise ConfigError(f"n_ctx={n_ctx} is negative; give a positive n_ctx such as 4096 (or 0 for the "
                          "model's training context)")
    n_train = meta.get(f"{meta.get('general.architecture')}.context_length")
    scaled = any(kwargs.get(k) not in (None, 0, 0.0, -1) for k in _ROPE_ARGS)
    if isinstance(n_train, int) and n_train > 0 and n_ctx > n_train and not scaled:
        raise ConfigError(f"n_ctx={n_ctx} exceeds the model's training context ({n_train}); give n_ctx={n_train} "
                          "or less (or extend it on purpose with rope_scaling_type/rope_freq_scale)")


def check_cache_type_args(kwargs: dict) -> None:
    """ConfigError for a type_k/type_v that is no ggml type, or a quantized V cache with flash_attn=False
    (llama.cpp keeps a quantized V untransposed, which only flash attention reads); with flash_attn left
    out, a quantized V cache switches it on, as the CLI does."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for key in ("type_k", "type_v"):
        t = kwargs.get(key)
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, int) or t not in GGML_QUANT_SIZES:
            raise ConfigError(f"{key}={t!r} is not a ggml type number; use 1 (f16), 8 (q8_0) or 2 (q4_0)")
    t = kwargs.get("type_v")
    if t is not None and GGML_QUANT_SIZES[t][0] > 1:  # blocks of several values: quantized
        name = GGMLQuantizationType(t).name.lower()
        if kwargs.get("flash_attn") is False:
            raise ConfigError(f"type_v={t} ({name}) is a quantized V cache, which needs flash attention; pass "
                              "flash_attn=True (or leave it out), or use type_v=1 (f16)")
        kwargs["flash_attn"] = True
