"""Persistent sessions: a context saved to one file in one process, resumed exactly in another.

The file (native/src/sessionfile/) holds the KV rows of every layer, llama.cpp's metadata-only state
(the cells at their indices, the head), the token history, and a description of the model and the KV
geometry (CONTEXT, JSON) that a loader must match. save and load are Llama.save_session and load_session;
they use a Llama's public attributes and the few internals it lends for it (Llama._kv_handle and its
neighbours).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import time
from pathlib import Path

import llama_cpp
import numpy as np

from . import _native, llama_log
from .errors import SessionError

# section kinds of the embedding program (the module's own are below 16)
SEC_LLAMA, SEC_TOKENS, SEC_CONTEXT, SEC_SCORES, SEC_APP = 16, 17, 18, 19, 20
FORMAT = 1
SUFFIX = ".dbkv"


def sessions_dir() -> Path:
    """Where named sessions live: ~/.cache/dualblade/sessions (0700)."""
    from .models import cache_dir

    d = cache_dir() / "sessions"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A name (no "/" and no suffix) is a session under sessions_dir(); anything else is a path."""
    s = os.fspath(name_or_path)
    if not s or s in (".", ".."):
        raise SessionError(f"{s!r} is not a session name; give a name such as 'notes' or a file path")
    if "/" in s or s.endswith(SUFFIX):
        return Path(s).expanduser()
    return sessions_dir() / (s + SUFFIX)


def save(llm, path: str | os.PathLike, app: bytes | None = None, whole: bool = False) -> dict:
    """Llama.save_session (its docstring says what the file holds and how it is written)."""
    path = os.fspath(path)
    kv = llm._kv_handle(flush=True)  # every row in the store, tails too
    with _state_mode(kv, _native.STATE_SAVE_META):  # llama.cpp's state without the rows: they go by the store
        size = llama_cpp.llama_state_get_size(llm.ctx)
        blob = (ctypes.c_uint8 * int(size))()
        n = llama_cpp.llama_state_get_data(llm.ctx, blob, size)
    if not 0 < int(n) <= int(size):
        raise SessionError(f"saving {path}: llama.cpp gave no state")
    desc = describe(llm)
    sections = {SEC_LLAMA: bytes(blob)[: int(n)], SEC_TOKENS: token_bytes(llm),
                SEC_CONTEXT: json.dumps(desc).encode()}
    if desc["logits_all"]:
        sections[SEC_SCORES] = scores_bytes(llm)
    if app is not None:
        sections[SEC_APP] = bytes(app)
    with _file_errors():
        # the token history grows in place: room for a full context
        stats = _native.sessionfile_save(kv, path, sections, room={SEC_TOKENS: 4 * llm.n_ctx()}, whole=whole)
    llm._kv_check()
    return stats


def load(llm, path: str | os.PathLike, verify: bool = False) -> dict:
    """Llama.load_session (its docstring says what must match and what is checked when)."""
    path = os.fspath(path)
    with _file_errors():
        f = _native.SessionFile(path)
    with f:
        try:
            saved = json.loads(f.section(SEC_CONTEXT) or b"")
            if not isinstance(saved, dict) or not isinstance(saved.get("geometry"), dict):
                raise ValueError
        except ValueError:
            raise SessionError(f"{path} is damaged (no context description)") from None
        check(path, saved, llm)
        if verify:
            with _file_errors():
                f.verify()
        logits_all = llm._saved_settings()["logits_all"]
        blob = f.section(SEC_LLAMA) or b""
        raw = f.section(SEC_TOKENS) or b""
        scores = f.section(SEC_SCORES)
        tokens = np.frombuffer(raw[: len(raw) // 4 * 4], dtype=np.int32)
        if (len(raw) % 4 or len(tokens) != saved.get("n_tokens") or len(tokens) > llm.n_ctx() or not blob
                or (scores is not None and logits_all and len(scores) != len(tokens) * llm.n_vocab() * 4)):
            raise SessionError(f"{path} is damaged (token history)")
        kv = llm._kv_handle()
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        with _state_mode(kv, _native.STATE_LOAD_META), llama_log.errors() as restore_log:
            rc = llama_cpp.llama_state_set_data(llm.ctx, buf, len(blob))
        try:
            if rc != len(blob):
                why = "".join(restore_log).strip().splitlines()
                raise SessionError(f"{path} does not fit this context: llama.cpp refused its state"
                                   f"{': ' + why[-1].strip() if why else ''}")
            with _file_errors():
                stats = f.restore(kv)
        except SessionError:
            llm._clear_context()
            raise
        app = f.section(SEC_APP)
    llm._restore_history(tokens, np.frombuffer(scores, dtype=np.float32).reshape(len(tokens), -1)
                         if scores is not None and logits_all else None, saved.get("seed"))
    stats["app"] = app
    return stats


@contextlib.contextmanager
def _state_mode(kv, mode: int):
    """llama.cpp's state calls in the block see the KV module in `mode` (_native.STATE_*), stock after."""
    with _file_errors():
        _native.kv_state_mode(kv, mode)
    try:
        yield
    finally:
        _native.kv_state_mode(kv, _native.STATE_STOCK)


@contextlib.contextmanager
def _file_errors():
    """The C module's session file errors, as SessionError."""
    try:
        yield
    except _native.SessionFileError as e:
        raise SessionError(str(e)) from None


def geometry(llm) -> dict:
    """What a saved KV depends on besides the model: the loader must have the same."""
    cp = llm.context_params
    return {
        "n_ctx": int(llm.n_ctx()),
        "type_k": int(cp.type_k),
        "type_v": int(cp.type_v),
        "flash_attn": cp.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "swa_full": bool(cp.swa_full),
        "n_ubatch": int(cp.n_ubatch),
        "n_seq_max": int(cp.n_seq_max),
        "kv_unified": bool(cp.kv_unified),
        # RoPE is applied before K is stored, and an adapter changes K and V: saved rows hold only with the same
        "rope_freq_base": float(cp.rope_freq_base),
        "rope_freq_scale": float(cp.rope_freq_scale),
        "rope_scaling_type": int(cp.rope_scaling_type),
        "yarn_ext_factor": float(cp.yarn_ext_factor),
        "lora": f"{llm.lora_path}:{llm.lora_scale}" if getattr(llm, "lora_path", None) else None,
    }


def describe(llm) -> dict:
    from .gguf_header import header_digest, read_metadata

    name = read_metadata(llm.model_path).get("general.name")
    settings = llm._saved_settings()
    return {
        "format": FORMAT,
        "model": header_digest(llm.model_path),
        "model_name": name if isinstance(name, str) else Path(llm.model_path).name,
        "model_file": Path(llm.model_path).name,
        "geometry": geometry(llm),
        "n_tokens": int(llm.n_tokens),
        "seed": int(settings["seed"]) if settings["seed"] is not None else None,
        "logits_all": settings["logits_all"],
        "saved": time.time(),
    }


_GEOMETRY_NAMES = {"n_ctx": "n_ctx", "type_k": "type_k", "type_v": "type_v", "flash_attn": "flash_attn",
                   "swa_full": "swa_full", "n_ubatch": "n_ubatch", "n_seq_max": "n_seq_max",
                   "kv_unified": "kv_unified", "rope_freq_base": "rope_freq_base",
                   "rope_freq_scale": "rope_freq_scale", "rope_scaling_type": "rope_scaling_type",
                   "yarn_ext_factor": "yarn_ext_factor", "lora": "lora_path:lora_scale"}


def _ubatch_sizes_kv(llm, saved: dict) -> bool:
    """Whether n_ubatch sizes the KV: an iSWA model's sliding-window cache holds n_swa + n_ubatch cells unless
    it is full-size (swa_full)."""
    from .gguf_header import model_info

    return not saved.get("geometry", {}).get("swa_full", True) and model_info(llm.model_path).n_swa > 0


def check(path, saved: dict, llm) -> None:
    """SessionError unless the session at path was saved with this model and KV geometry."""
    if saved.get("format", 0) > FORMAT:
        raise SessionError(f"{path} was saved by a newer dualblade (session format {saved['format']}); upgrade "
                           "dualblade")
    from .gguf_header import header_digest

    mine = header_digest(llm.model_path)
    if saved.get("model") != mine:
        raise SessionError(f"{path} was saved with another model ({saved.get('model_file')}, sha256 "
                           f"{str(saved.get('model'))[:12]}); this Llama has {Path(llm.model_path).name} (sha256 "
                           f"{mine[:12]}); load it with the model it was saved with")
    from .gguf_header import GGML_TYPE_NAMES

    have = geometry(llm)
    for key, label in _GEOMETRY_NAMES.items():
        want = saved.get("geometry", {}).get(key)
        if key == "n_ubatch" and not _ubatch_sizes_kv(llm, saved):
            continue  # the prompt's ubatch (which dualblade makes large for offloaded KV) changes no cell
        if want != have[key]:
            show = (lambda v: GGML_TYPE_NAMES.get(v, v)) if key in ("type_k", "type_v") else (lambda v: v)
            raise SessionError(f"{path} was saved with {label}={show(want)}, this Llama has {label}="
                               f"{show(have[key])}; create it with {label}={show(want)}")
    # a draft_model context (whose logits_all is llama_cpp's own) skips the logits of a file saved with them
    if saved.get("logits_all") and not llm._saved_settings()["logits_all"] and not llm._logits_all:
        raise SessionError(f"{path} was saved with logits_all=True; create the Llama with logits_all=True")


def token_bytes(llm) -> bytes:
    return np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32).tobytes()


def scores_bytes(llm) -> bytes:
    return np.ascontiguousarray(llm.scores[: llm.n_tokens], dtype=np.float32).tobytes()


def info(path) -> dict:
    """Name, model, tokens, size, last used of the session file at path (header and sections only);
    SessionError for a file that is not a usable session."""
    saved = _saved_context(path)
    st = os.stat(path)
    return {
        "name": Path(path).name[: -len(SUFFIX)] if str(path).endswith(SUFFIX) else Path(path).name,
        "path": str(path),
        "model": saved.get("model_name"),
        "tokens": saved.get("n_tokens"),
        "size": st.st_blocks * 512,
        "last_used": max(st.st_atime, st.st_mtime),
        "saved": saved.get("saved"),
    }


def _saved_context(path) -> dict:
    """The CONTEXT section of the session file at path (header and sections only); SessionError where it is not a
    usable session."""
    try:
        with _native.SessionFile(os.fspath(path)) as f:
            saved = json.loads(f.section(SEC_CONTEXT) or b"{}")
    except _native.SessionFileError as e:
        raise SessionError(str(e)) from None
    except ValueError:
        raise SessionError(f"{path} is damaged (no context description)") from None
    return saved if isinstance(saved, dict) else {}


def saved_flash_attn(path) -> bool | None:
    """Whether the session at path was saved with flash attention; None where there is no readable session."""
    try:
        geometry = _saved_context(path).get("geometry") or {}
    except SessionError:
        return None
    fa = geometry.get("flash_attn") if isinstance(geometry, dict) else None
    return fa if isinstance(fa, bool) else None


def list_sessions(directory: str | os.PathLike | None = None) -> list[dict]:
    """info() of every session file in directory (default sessions_dir()), by name; a file that is not a usable
    session is listed with its error."""
    d = Path(directory) if directory else sessions_dir()
    rows = []
    for p in sorted(d.glob("*" + SUFFIX)):
        if p.is_symlink() or not p.is_file():
            continue
        try:
            rows.append(info(p))
        except SessionError as e:
            rows.append({"name": p.name[: -len(SUFFIX)], "path": str(p), "error": str(e)})
    return rows


def remove(name_or_path, wipe: bool = False) -> Path:
    """Removes a saved session; with wipe, overwrites it with zeros (and syncs) first. Refuses a file that is
    not a session, and a symlink."""
    path = resolve(name_or_path)
    if path.is_symlink():
        raise SessionError(f"{path} is a symlink; give the file itself")
    if not path.exists():
        raise SessionError(f"no session {os.fspath(name_or_path)!r} ({path}); 'dualblade sessions' lists them")
    info(path)  # a session file, intact enough to be ours
    if wipe:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            size = os.fstat(fd).st_size
            zeros = bytes(1 << 20)
            done = 0
            while done < size:
                done += os.pwrite(fd, zeros[: min(len(zeros), size - done)], done)
            os.fsync(fd)
        finally:
            os.close(fd)
    path.unlink()
    return path


def verify(name_or_path) -> dict:
    """Reads every KV block of a saved session once and checks its CRC-32C; SessionError names a bad one."""
    path = resolve(name_or_path)
    try:
        with _native.SessionFile(os.fspath(path)) as f:
            st = f.verify()
    except _native.SessionFileError as e:
        raise SessionError(str(e)) from None
    return {**info(path), "checked_bytes": st["checked_bytes"]}
