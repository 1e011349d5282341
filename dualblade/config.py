"""Validation of the KV options shared by the Python API and the CLI: one place for each rule."""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from ._native import MEMBER_PATH_MAX, POLICIES, STRIPE_MEMBERS_MAX
from .errors import ConfigError, ModelError, StoreError
from .sizes import format_size, parse_size


@dataclass(frozen=True)
class KVConfig:
    """The checked KV options. kv_dir and kv_device hold the store's members, a tuple of paths (one, or several that
    the KV is striped over), or None; at most one of them is set."""
    policy: str
    budget_bytes: int | None
    kv_dir: tuple[str, ...] | None
    kv_device: tuple[str, ...] | None

    @property
    def members(self) -> tuple[str, ...]:
        """The store's members, whichever kind they are (empty: none given)."""
        return self.kv_device or self.kv_dir or ()

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
        kv_dir = members_arg(kv_dir, "kv_dir")
        kv_device = members_arg(kv_device, "kv_device")
        if kv_dir is not None and kv_device is not None:
            raise ConfigError("kv_dir and kv_device were both given; the KV lives in one place, give only one")
        if kv_force and kv_device is None:
            raise ConfigError("kv_force takes over a kv_device, and no kv_device was given; give kv_device, or "
                              "drop kv_force")
        for d in kv_dir or ():
            _check_kv_dir(d)
        for d in kv_device or ():
            _check_kv_device(d)
        _check_distinct(kv_dir or kv_device or ())
        return cls(policy, budget, kv_dir, kv_device)


def members_arg(value, name: str) -> tuple[str, ...] | None:
    """kv_dir or kv_device as the store's members: a path (str, bytes or os.PathLike), a list or tuple of them, or
    one string of several separated by commas (split only when the whole string is no existing path). ConfigError
    naming `name` for a value that is no path, an empty one, more members than a store takes, or one given twice."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            raise ConfigError(f"{name} is an empty list; give one path or several, or leave it out")
        items = [_one_path(v, f"{name}[{i}]", name) for i, v in enumerate(value)]
    else:
        one = _one_path(value, name, name)
        if "," in one and not os.path.exists(one):
            items = [p.strip() for p in one.split(",")]
            if not all(items):
                raise ConfigError(f"{name} {one!r} has an empty entry between its commas; give paths separated by "
                                  "commas, e.g. '/mnt/a/kv,/mnt/b/kv'")
            items = [os.path.expanduser(p) for p in items]
        else:
            items = [one]
    if len(items) > STRIPE_MEMBERS_MAX:
        raise ConfigError(f"{name} names {len(items)} paths; the KV is striped over at most {STRIPE_MEMBERS_MAX} "
                          "members, give fewer")
    for p in items:
        if "\n" in p:
            raise ConfigError(f"{name} {p!r} contains a line break, which no KV member's path may; give several paths "
                              f"as a list or separated by commas")
        if len(os.fsencode(p)) > MEMBER_PATH_MAX:
            raise ConfigError(f"{name} {p[:40]}... is longer than {MEMBER_PATH_MAX} bytes; give a shorter path "
                              "(a symlink to it)")
    seen = {}
    for p in items:
        key = os.path.normpath(os.path.abspath(p))
        if key in seen:
            also = "" if seen[key] == p else f" (as {seen[key]} and as {p})"
            raise ConfigError(f"{key} is given twice as a KV member{also}; give each once")
        seen[key] = p
    return tuple(items)


def _one_path(value, what: str, name: str) -> str:
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (str or os.PathLike), not {type(value).__name__}; give e.g. "
                          f"{name}='/mnt/nvme/kv', or several: {name}=['/mnt/a/kv', '/mnt/b/kv']")
    value = os.fspath(value)
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not value:
        raise ConfigError(f"{what} is empty; give a path, or leave it out")
    return os.path.expanduser(value)


def _check_distinct(members: tuple[str, ...]) -> None:
    """The same directory or device under two names (a symlink, /dev/disk/by-id) is still given twice."""
    seen = {}
    for p in members:
        st = os.stat(p)
        key = ("dev", st.st_rdev) if stat.S_ISBLK(st.st_mode) else ("dir", st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigError(f"{p} and {seen[key]} are the same {'device' if key[0] == 'dev' else 'directory'}, "
                              "given twice as KV members; give each once")
        seen[key] = p


def size_arg(value, name: str) -> int:
    """A size argument (bytes or a size string) in bytes; ConfigError naming `name` for a bad one."""
    try:
        return parse_size(value, name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


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


def _check_kv_device(kv_device: str) -> None:
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
