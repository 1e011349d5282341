"""What the commands share: the model and KV options and the loader that checks them and loads the model (chat
and serve), resolving the model argument, the table of saved sessions."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from dualblade.errors import ConfigError, DualbladeError, FlashAttentionWarning, ModelError
from dualblade.gguf_header import GGML_TYPE_IDS, ModelInfo, model_info
from dualblade.models import bundled_model_path, chat_format_for
from dualblade.sizes import format_size


@dataclass
class ChatOptions:
    """`chat`'s options; `serve` takes the model and KV ones as `chat` does (max_tokens: a request's limit)."""
    model: Optional[Path]
    mem_budget: Optional[str]
    ctx_size: int
    max_tokens: int
    temp: float
    seed: int
    threads: Optional[int]
    policy: str
    kv_dir: Optional[str]     # one path, or several separated by commas (KVConfig reads them)
    kv_device: Optional[str]
    force: bool
    cache_type: str
    flash_attn: Optional[bool]
    system: Optional[str]
    stats: Optional[bool]
    verbose: bool
    verify: bool = True
    kv_wipe: bool = False
    n_gpu_layers: int = 0
    vram_budget: Optional[str] = None
    session: Optional[str] = None
    draft: Optional[str] = None          # lookup[:N]: drafts from the context
    draft_model: Optional[Path] = None   # a small GGUF sharing the model's vocabulary


def resolve_model(model: Optional[Path]) -> tuple[Path, ModelInfo]:
    """The model path (bundled one if None) and its header, validated before any weight is read."""
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if model is not None and not path.exists():
        raise ModelError(f"model file {path} does not exist; give the path of a .gguf file "
                         "(or no MODEL for the bundled Gemma-3-270M)")
    return path, model_info(path)


def check_ctx(ctx_size: int, info: ModelInfo) -> None:
    if ctx_size <= 0:
        raise ConfigError(f"context size {ctx_size} is not positive; give a positive --ctx-size such as 4096")
    if info.n_ctx_train and ctx_size > info.n_ctx_train:
        raise ConfigError(f"context size {ctx_size} exceeds the model's training context ({info.n_ctx_train}); "
                          f"give --ctx-size {info.n_ctx_train} or less")


def load(opts: ChatOptions, err: Console, live: bool, cls=None):
    """Validates every option, then loads the model (a dualblade.Llama, or cls); returns (llm, chat_format)."""
    from dualblade import Llama

    Llama = cls or Llama
    from dualblade.config import KVConfig

    if not os.environ.get("DUALBLADE_LLAMA_LOG"):
        _quiet_llama_logs()

    path, info = resolve_model(opts.model)
    check_ctx(opts.ctx_size, info)
    if opts.max_tokens <= 0:
        raise ConfigError(f"--max-tokens {opts.max_tokens} is not positive; give 1 or more")
    if opts.max_tokens >= opts.ctx_size:
        raise ConfigError(f"--max-tokens {opts.max_tokens} leaves no room for the prompt in a {opts.ctx_size}-token "
                          "context; lower --max-tokens or raise --ctx-size")
    if opts.temp < 0:
        raise ConfigError(f"--temp {opts.temp} is negative; give 0 (greedy) or more")
    if opts.threads is not None and opts.threads <= 0:
        raise ConfigError(f"--threads {opts.threads} is not positive; give 1 or more")
    # validated here, before the weights are read, with the same rules the API applies
    _check_flag_conflicts(opts)
    KVConfig.from_args(opts.mem_budget, opts.policy, opts.kv_dir, opts.kv_device, opts.force)

    chat_format, why = chat_format_for(info)
    flash = opts.cache_type != "f16"
    if opts.flash_attn is False and flash:
        raise ConfigError(f"--cache-type {opts.cache_type} needs flash attention; drop --no-flash-attn or use f16")
    if opts.verbose:
        err.print(f"model: {path} ({info.arch}, {info.n_layer} layers)")
        err.print(f"chat format: {chat_format or 'from the model'}: {why}")
        if flash:
            err.print(f"flash attention: on (the {opts.cache_type} V cache requires it)")
    kwargs = dict(n_ctx=opts.ctx_size, n_threads=opts.threads or os.cpu_count() or 1,
                  verbose=bool(os.environ.get("DUALBLADE_LLAMA_LOG")),
                  chat_format=chat_format, type_k=GGML_TYPE_IDS[opts.cache_type],
                  type_v=GGML_TYPE_IDS[opts.cache_type], mem_budget=opts.mem_budget, kv_policy=opts.policy,
                  kv_dir=opts.kv_dir, kv_device=opts.kv_device, kv_force=opts.force,
                  kv_verify=opts.verify, kv_wipe=opts.kv_wipe, n_gpu_layers=opts.n_gpu_layers,
                  vram_budget=opts.vram_budget)
    if flash or opts.flash_attn is not None:
        kwargs["flash_attn"] = flash or bool(opts.flash_attn)
    elif opts.session:
        # a session grows by appending when V is kept by cell (flash attention): a new one gets it, a saved one
        # keeps what it was saved with (its KV geometry must match)
        from dualblade.sessions import resolve, saved_flash_attn

        saved = saved_flash_attn(resolve(opts.session))
        kwargs["flash_attn"] = True if saved is None else saved
        if opts.verbose:
            err.print(f"flash attention: {'on' if kwargs['flash_attn'] else 'off'} "
                      f"({'the new session' if saved is None else 'as the session was saved'})")
    if opts.seed >= 0:
        kwargs["seed"] = opts.seed
    from dualblade.speculative import draft_from_args

    try:
        draft = draft_from_args(opts.draft, str(opts.draft_model) if opts.draft_model else None, info.n_vocab,
                                opts.ctx_size, n_gpu_layers=opts.n_gpu_layers, n_threads=kwargs["n_threads"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if draft is not None:
        kwargs["draft_model"] = draft
        if opts.verbose:
            err.print(f"speculative decoding: drafts from {opts.draft or opts.draft_model}, "
                      f"{draft.num_pred_tokens} at most, fewer where they fail")
    if opts.flash_attn is None:
        # the chat has no stock run to match: it says so in --verbose (below) rather than warn every start
        warnings.filterwarnings("ignore", category=FlashAttentionWarning)
    try:
        if live:
            with err.status(f"loading {path.name} …"):
                llm = Llama(str(path), **kwargs)
        else:
            llm = Llama(str(path), **kwargs)
    except DualbladeError:
        raise
    except ValueError as e:
        raise ModelError(f"llama.cpp could not load {path} ({e}); check that the file is complete and its "
                         "architecture is supported") from None
    if opts.verbose:
        st = llm.kv_stats()
        where = f" on {st['store']['kind']} {st['store']['path']}" if st["store"] else ""
        err.print(f"KV: {format_size(st['kv_bytes_total'])}, {format_size(st['resident_bytes'])} pinned, "
                  f"{format_size(st['offloaded_bytes'])} offloaded{where} (policy {st['policy']})")
        if len(st["store_members"]) > 1:
            err.print(f"KV striped in {format_size(st['store']['stripe_unit'])} stripes: "
                      + "; ".join(describe_member(m) for m in st["store_members"]))
        if st["offloaded_bytes"]:
            err.print("flash attention: on (offloaded KV layers require it)")
    return llm, chat_format


def describe_member(m: dict) -> str:
    """A store member in words: its path, its share of the stripes and its probed read bandwidth."""
    bw = f"{m['read_bps'] / 1e9:.2f} GB/s read" if m.get("read_bps") else "read bandwidth not probed"
    share = f"{m['share']}/{m['n_pattern']} of the stripes" if m.get("share") else "share set when opened"
    return f"{m['path']} ({share}, {bw})"


def _check_flag_conflicts(opts: ChatOptions) -> None:
    """Flags that would silently do nothing together are refused (the API, driven by programs that sweep
    settings, accepts them and warns where it matters)."""
    if opts.policy == "ram":
        idle = [flag for flag, value in (("--mem-budget", opts.mem_budget), ("--kv-dir", opts.kv_dir),
                                         ("--kv-device", opts.kv_device)) if value is not None]
        if idle:
            flags = " and ".join(idle)
            raise ConfigError(f"--policy ram keeps every KV layer in RAM, so {flags} would do nothing; drop "
                              f"{flags}, or choose --policy auto, mmap or direct")


_quiet_cb = None


def _quiet_llama_logs() -> None:
    """llama.cpp logs some warnings whatever llama_cpp's verbose says; DUALBLADE_LLAMA_LOG=1 shows them."""
    global _quiet_cb
    import ctypes

    import llama_cpp

    if _quiet_cb is None:
        _quiet_cb = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    llama_cpp.llama_log_set(_quiet_cb, ctypes.c_void_p(0))


def print_sessions(console: Console) -> None:
    """The saved sessions under the sessions directory: name, model, tokens, size, last used."""
    from dualblade.sessions import list_sessions

    rows = list_sessions()
    if not rows:
        console.print("no saved sessions", markup=False)
        return
    t = Table(title="sessions")
    for c in ("name", "model", "tokens", "size", "last used"):
        t.add_column(c, justify="right" if c in ("tokens", "size") else "left")
    for r in rows:
        if "error" in r:
            t.add_row(r["name"], f"({r['error']})", "", "", "")
            continue
        t.add_row(r["name"], str(r["model"]), str(r["tokens"]), format_size(r["size"]),
                  time.strftime("%Y-%m-%d %H:%M", time.localtime(r["last_used"])))
    console.print(t)
