"""The `dualblade` command: flags in, the same objects the Python API takes, rich output out.

Every error a user can cause ends as one line on stderr, `dualblade: error: <problem>; <fix>`,
and a non-zero exit; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

# typer >= 0.2x carries its own copy of click; older ones use the click package
try:
    from typer import _click as click
except ImportError:  # pragma: no cover - older typer
    import click

_ABORT = getattr(click.exceptions, "Abort", KeyboardInterrupt)

app = typer.Typer(
    name="dualblade",
    help="Long-context LLM chat past the RAM limit: the KV cache in RAM, page cache or O_DIRECT storage.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Policy(str, Enum):
    auto = "auto"
    ram = "ram"
    mmap = "mmap"
    direct = "direct"


class CacheType(str, Enum):
    f16 = "f16"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show a traceback on errors.")):
    """dualblade: llama.cpp chat whose KV cache may exceed RAM (DUAL-BLADE, arXiv:2604.26557)."""


ModelArg = typer.Argument(None, help="GGUF model file (default: the bundled Gemma-3-270M Q4_K_M).",
                          show_default=False)

# options the commands share (one definition each)
MemBudgetOpt = typer.Option(None, "--mem-budget", "-m", help="Memory for pinned KV + staging, e.g. 2G, 512MiB.")
CtxSizeOpt = typer.Option(4096, "--ctx-size", "-c", help="Context size in tokens.")
PolicyOpt = typer.Option(Policy.auto, "--policy", help="Where KV that exceeds the budget goes.")
KvDirOpt = typer.Option(None, "--kv-dir", help="Directory for the KV file; several, comma-separated (A,B): the KV "
                                               "striped over a file in each (at most 8).")
VerifyOpt = typer.Option(True, "--verify/--no-verify", help="Check a CRC-32C of every block read back from the direct path.")
CacheTypeOpt = typer.Option(CacheType.f16, "--cache-type", help="KV cache element type.")
KvDeviceOpt = typer.Option(None, "--kv-device", help="Raw block device for the KV; several, comma-separated "
                                                     "(A,B): the KV striped over them (at most 8).")
ForceOpt = typer.Option(False, "--force", help="Take over a --kv-device that holds something else (destroys what is "
                                               "there).")
FlashAttnOpt = typer.Option(None, "--flash-attn/--no-flash-attn",
                            help="Flash attention (default: on when the cache type or offloaded layers need it).")
ThreadsOpt = typer.Option(None, "--threads", "-t", help="CPU threads (default: all cores).")
GpuLayersOpt = typer.Option(0, "--n-gpu-layers", "-ngl", help="GPU builds: layers on the GPU (-1 or 99: all).")
VramBudgetOpt = typer.Option(None, "--vram-budget",
                             help="GPU builds: VRAM the KV may take, e.g. 2G, or auto (what the GPU has free); the "
                                  "other GPU layers' KV is streamed in from the host tiers.")
DraftOpt = typer.Option(None, "--draft", help="Speculative decoding with drafts from the conversation itself: lookup "
                        "or lookup:N (N drafted tokens at most, default 10); fewer where they fail.")
DraftModelOpt = typer.Option(None, "--draft-model", help="Speculative decoding with drafts from a small model that "
                             "shares the model's vocabulary (its KV stays in RAM, or VRAM with -ngl).")


@app.command()
def chat(
    model: Optional[Path] = ModelArg,
    mem_budget: Optional[str] = MemBudgetOpt,
    ctx_size: int = CtxSizeOpt,
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per reply."),
    temp: float = typer.Option(0.7, "--temp", help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(-1, "--seed", help="RNG seed (-1 = random)."),
    threads: Optional[int] = ThreadsOpt,
    policy: Policy = PolicyOpt,
    kv_dir: Optional[str] = KvDirOpt,
    kv_device: Optional[str] = KvDeviceOpt,
    force: bool = ForceOpt,
    verify: bool = VerifyOpt,
    kv_wipe: bool = typer.Option(False, "--kv-wipe", help="At exit, overwrite what the KV store held with zeros "
                                                         "(a device's written range is discarded anyway)."),
    cache_type: CacheType = CacheTypeOpt,
    flash_attn: Optional[bool] = FlashAttnOpt,
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    stats: Optional[bool] = typer.Option(None, "--stats/--no-stats",
                                         help="Status line after each reply (default: on in a terminal)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what was chosen and why (DUALBLADE_LLAMA_LOG=1 adds llama.cpp's logs)."),
    n_gpu_layers: int = GpuLayersOpt,
    vram_budget: Optional[str] = VramBudgetOpt,
    session: Optional[str] = typer.Option(None, "--session", help="Resume this saved session if it exists, "
                                          "and keep it saved (after each reply and at exit): a name under "
                                          "~/.cache/dualblade/sessions or a file path."),
    draft: Optional[str] = DraftOpt,
    draft_model: Optional[Path] = DraftModelOpt,
):
    """Chat with a model; type /help for commands. Reads lines from a pipe too."""
    from .chat import run_chat
    from .common import ChatOptions

    run_chat(ChatOptions(model=model, mem_budget=mem_budget, ctx_size=ctx_size, max_tokens=max_tokens,
                         temp=temp, seed=seed, threads=threads, policy=policy.value, kv_dir=kv_dir,
                         kv_device=kv_device, force=force, verify=verify, kv_wipe=kv_wipe,
                         cache_type=cache_type.value, flash_attn=flash_attn, system=system, stats=stats,
                         verbose=verbose, n_gpu_layers=n_gpu_layers, vram_budget=vram_budget, session=session,
                         draft=draft, draft_model=draft_model))


@app.command()
def serve(
    model: Optional[Path] = ModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; another than loopback needs "
                                                        "--api-key."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port (0: any free port, printed at start)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DUALBLADE_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on /v1 (compared in constant "
                                               "time)."),
    mem_budget: Optional[str] = MemBudgetOpt,
    ctx_size: int = CtxSizeOpt,
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", help="Most tokens a request may generate (and its "
                                                                    "default)."),
    policy: Policy = PolicyOpt,
    kv_dir: Optional[str] = KvDirOpt,
    kv_device: Optional[str] = KvDeviceOpt,
    force: bool = ForceOpt,
    verify: bool = VerifyOpt,
    cache_type: CacheType = CacheTypeOpt,
    flash_attn: Optional[bool] = FlashAttnOpt,
    threads: Optional[int] = ThreadsOpt,
    seed: int = typer.Option(-1, "--seed", help="RNG seed of requests without one (-1 = random)."),
    session_disk: str = typer.Option("20G", "--session-disk", help="Disk the saved conversations may take (least "
                                     "recently used go first; 0: none saved)."),
    session_dir: Optional[Path] = typer.Option(None, "--session-dir", help="Where the server saves conversations "
                                               "(default ~/.cache/dualblade/serve)."),
    queue: int = typer.Option(16, "--queue", help="Requests that may wait for the model (more: 503)."),
    max_body: str = typer.Option("8M", "--max-body", help="Largest request body."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Say what was chosen and why; log requests."),
    n_gpu_layers: int = GpuLayersOpt,
    vram_budget: Optional[str] = VramBudgetOpt,
    draft: Optional[str] = DraftOpt,
    draft_model: Optional[Path] = DraftModelOpt,
):
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /v1/kv, /health); conversations resume from their KV saved on storage."""
    from .common import ChatOptions
    from .serve import ServeOptions, run_serve

    chat_opts = ChatOptions(model=model, mem_budget=mem_budget, ctx_size=ctx_size, max_tokens=max_tokens, temp=0.0,
                            seed=seed, threads=threads, policy=policy.value, kv_dir=kv_dir, kv_device=kv_device,
                            force=force, verify=verify, cache_type=cache_type.value, flash_attn=flash_attn,
                            system=None, stats=False, verbose=verbose, n_gpu_layers=n_gpu_layers,
                            vram_budget=vram_budget, draft=draft, draft_model=draft_model)
    run_serve(ServeOptions(chat=chat_opts, host=host, port=port, api_key=api_key, session_disk=session_disk,
                           session_dir=session_dir, queue=queue, max_body=max_body))


@app.command()
def sessions(
    action: Optional[str] = typer.Argument(None, help="ls (default), rm or verify.", show_default=False),
    name: Optional[str] = typer.Argument(None, help="The session to remove or verify (a name or a file path).",
                                         show_default=False),
    kv_wipe: bool = typer.Option(False, "--kv-wipe", help="rm: overwrite the session file with zeros before "
                                                         "removing it."),
):
    """List the saved chat sessions (name, model, tokens, size, last used), remove one, or verify one (read every
    KV block and check its CRC-32C)."""
    from rich.console import Console

    from dualblade.errors import ConfigError
    from dualblade.sessions import remove, verify

    from .common import print_sessions

    action = action or "ls"
    if action == "ls":
        if name is not None:
            raise ConfigError(f"'sessions ls' takes no name (got {name!r}); use 'dualblade sessions ls'")
        print_sessions(Console(highlight=False))
    elif action == "rm":
        if not name:
            raise ConfigError("'sessions rm' needs a session name: dualblade sessions rm NAME")
        path = remove(name, wipe=kv_wipe)
        print(f"removed {path}")
    elif action == "verify":
        if not name:
            raise ConfigError("'sessions verify' needs a session name: dualblade sessions verify NAME")
        r = verify(name)
        print(f"{r['path']}: intact ({r['tokens']} tokens, {r['checked_bytes']} KV bytes checked)")
    else:
        raise ConfigError(f"unknown sessions action {action!r}; use 'dualblade sessions' (list), "
                          "'dualblade sessions rm NAME' or 'dualblade sessions verify NAME'")


@app.command()
def info(
    model: Optional[Path] = ModelArg,
    ctx_size: Optional[int] = typer.Option(None, "--ctx-size", "-c",
                                           help="Context size (default: the model's training context)."),
    mem_budget: Optional[str] = typer.Option(None, "--mem-budget", "-m", help="Budget to plan for, e.g. 2G."),
    policy: Policy = typer.Option(Policy.auto, "--policy", help="Policy to plan for."),
    cache_type: CacheType = typer.Option(CacheType.f16, "--cache-type", help="KV type of the plan."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", "-ngl", help="Plan for a GPU build with this many "
                                                                         "layers on the GPU (-1 or 99: all)."),
    vram_budget: Optional[str] = typer.Option(None, "--vram-budget", help="Plan for this much VRAM for the KV (auto: this machine's free VRAM)."),
    kv_dir: Optional[str] = typer.Option(None, "--kv-dir", help="Check the store the plan needs in this directory "
                                         "(several, comma-separated: striped), writing nothing, and list its members."),
    kv_device: Optional[str] = typer.Option(None, "--kv-device", help="Check the store the plan needs on this device "
                                            "(several, comma-separated: striped), writing nothing."),
    force: bool = ForceOpt,
    probe: bool = typer.Option(False, "--probe", help="With --kv-dir: open the store as a run does (an unnamed file "
                               "in each directory, gone at exit) to probe each member's O_DIRECT read bandwidth and "
                               "show its share of the stripes."),
):
    """Read a GGUF header (no weights) and show KV geometry, sizes and the placement plan; with --kv-dir or
    --kv-device, the store's members."""
    from .info import run_info

    run_info(model, ctx_size, mem_budget, policy.value, cache_type.value, as_json, n_gpu_layers, vram_budget,
             kv_dir=kv_dir, kv_device=kv_device, force=force, probe=probe)


@app.command()
def bench(
    model: Optional[Path] = ModelArg,
    synthetic: Optional[str] = typer.Option(None, "--synthetic", help="Benchmark a random-weight model of a named "
                                            "shape instead: tiny, kv-heavy, llama-1b, gemma3-tiny, gemma3-1b (written once, cached)."),
    policies: Optional[str] = typer.Option(None, "--policies", help="Comma-separated: stock "
                                 "(llama-cpp-python as is), ram, mmap, direct, auto; direct-noverify measures what the "
                                 "checksums cost (default: stock,ram,mmap,direct,auto). With --gpu: vram, nkvo-fa, nkvo, "
                                 "ngl (stock: all KV in VRAM; KV in RAM with flash attention on, off; the most layers "
                                 "that fit), ram, mmap, direct, auto (default: all)."),
    budgets: Optional[str] = typer.Option(None, "--budgets", help="Comma-separated: % of the KV or sizes (default: "
                                          "100%,50%,25%,10%); with --gpu, VRAM budgets (default: 25%)."),
    ctx_size: int = typer.Option(8192, "--ctx-size", "-c", help="Context size in tokens."),
    prompt_tokens: int = typer.Option(4096, "--prompt-tokens", "-p", help="Prompt length (prefill)."),
    gen_tokens: int = typer.Option(32, "--gen-tokens", "-n", help="Tokens generated greedily (decode)."),
    reps: int = typer.Option(3, "--reps", "-r", help="Repetitions of the whole matrix (median [min, max])."),
    kv_dir: Optional[str] = typer.Option(None, "--kv-dir", help="Directory for the KV file (and the probe); several, "
                                         "comma-separated: the KV striped over them."),
    kv_device: Optional[str] = KvDeviceOpt,
    force: bool = ForceOpt,
    no_cgroup: bool = typer.Option(False, "--no-cgroup", help="Run without a memory limit (numbers are then not "
                                   "memory-enforced)."),
    overhead: Optional[str] = typer.Option(None, "--overhead", help="Memory besides weights and budget in each "
                                           "cell's limit (default: calibrated)."),
    threads: Optional[int] = ThreadsOpt,
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every raw figure to this file."),
    plot_path: Optional[Path] = typer.Option(None, "--plot", help="Write a plot (PNG, needs matplotlib)."),
    probe_size: str = typer.Option("512M", "--probe-size", help="Bytes the device probe reads."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds a cell may run before it counts as "
                                            "thrashing (default: 8x the all-in-RAM run, at least 120)."),
    gpu: bool = typer.Option(False, "--gpu", help="GPU builds: the VRAM tier against stock llama.cpp on the GPU; "
                             "--budgets are then VRAM budgets."),
    host_budget: Optional[str] = typer.Option(None, "--host-budget", help="With --gpu: the memory budget of the "
                                              "dualblade cells' host tier, % of the KV or a size (default: 25%)."),
    ubatch: Optional[int] = typer.Option(None, "--ubatch", help="Every cell's prompt ubatch (n_batch = n_ubatch; "
                                         "default: the one dualblade picks for a context with offloaded KV)."),
    draft: Optional[str] = typer.Option(None, "--draft", help="Speculative decoding against plain: every policy x "
                                        "budget on real text ('repeat': a document's passage quoted; 'fresh'), with "
                                        "drafts lookup[:N] and without (needs a real model, e.g. the bundled one)."),
    sessions: Optional[int] = typer.Option(None, "--sessions", help="Session saves: a --prompt-tokens prompt saved, "
                                           "then N replies of --gen-tokens tokens each saved (appended); bytes per "
                                           "save against the new rows, and the grown file's load against a fresh "
                                           "one (first of --policies, default direct, at the first of --budgets)."),
    draft_model: Optional[Path] = typer.Option(None, "--draft-model", help="As --draft, with drafts from a small "
                                               "model sharing the model's vocabulary (its own KV stays in RAM)."),
    stripes: bool = typer.Option(False, "--stripes", help="Striping: decode with the KV over the first 1, 2, 4, ... "
                                 "of --kv-device (or --kv-dir) A,B,..., each against one device (first storage "
                                 "policy of --policies, default direct, at the first of --budgets, default 25%)."),
):
    """Measure policies x budgets, each in a fresh process under a memory limit, against stock llama.cpp."""
    from .bench import run_bench_cli

    if reps < 1 or gen_tokens < 1 or prompt_tokens < 1 or (ubatch is not None and ubatch < 1):
        raise click.exceptions.BadParameter("--reps, --gen-tokens, --prompt-tokens and --ubatch must be at least 1")
    run_bench_cli(model, synthetic, policies, budgets, ctx_size, prompt_tokens, gen_tokens, reps, kv_dir, kv_device,
                  no_cgroup, overhead, threads, json_path, plot_path, probe_size, timeout, force, gpu, host_budget,
                  ubatch, draft, sessions, stripes, draft_model)


# The library's messages name its keyword arguments; a CLI user should read the flags instead.
_API_TO_FLAGS = [
    (r"mem_budget='([^']*)'", r"--mem-budget \1"),
    (r"\bmem_budget\b", "--mem-budget"),
    (r"kv_policy='([^']*)'", r"--policy \1"),
    (r"\bkv_policy\b", "--policy"),
    (r"vram_budget='([^']*)'", r"--vram-budget \1"),
    (r"\bvram_budget\b", "--vram-budget"),
    (r"\bn_gpu_layers=-1\b", "-ngl 99"),
    (r"\bn_gpu_layers\b", "-ngl"),
    (r"\boffload_kqv=False\b", "offloading no KV"),
    (r"\bkv_dir\b", "--kv-dir"),
    (r"\bkv_device\b", "--kv-device"),
    (r"\bkv_force\b|\(force takes", lambda m: "--force" if m.group(0) == "kv_force" else "(--force takes"),
    (r"\bn_ctx=(\d+)", r"--ctx-size \1"),
    (r"\btype_[kv]=(\w+)", r"--cache-type \1"),
    (r"\bn_ctx\b", "--ctx-size"),
    (r"\ba smaller context\b", "a smaller --ctx-size"),  # the C module's words
]


def _as_cli(msg: str) -> str:
    import re

    for pattern, repl in _API_TO_FLAGS:
        msg = re.sub(pattern, repl, msg)
    return msg


def _fail(msg: str, code: int = 1) -> None:
    msg = " ".join(_as_cli(str(msg)).split())  # one line, in the CLI's words
    print(f"dualblade: error: {msg}", file=sys.stderr)
    sys.exit(code)


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DUALBLADE_DEBUG") == "1"
    if not debug:
        import warnings

        warnings.formatwarning = lambda message, *args, **kwargs: f"dualblade: warning: {message}\n"
    try:
        rc = app(args=argv, prog_name="dualblade", standalone_mode=False)
        sys.exit(rc if isinstance(rc, int) else 0)
    except SystemExit:
        raise
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(0)  # the help was printed
    except click.exceptions.UsageError as e:
        where = f"; see 'dualblade {e.ctx.info_name} --help'" if e.ctx and e.ctx.info_name != "dualblade" \
            else "; see 'dualblade --help'"
        _fail(e.format_message().rstrip(".") + where, 2)
    except (_ABORT, KeyboardInterrupt):
        print(file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug:
            raise
        from dualblade.errors import DualbladeError

        if isinstance(e, (DualbladeError, ValueError, OSError, NotImplementedError, MemoryError, RuntimeError)):
            _fail(str(e) or type(e).__name__)
        _fail(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback and report it)")


if __name__ == "__main__":
    main()
