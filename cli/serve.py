"""`dualblade serve`: options checked, the address bound and the model loaded, then uvicorn serves
dualblade.server's app until Ctrl-C or SIGTERM."""
from __future__ import annotations

import dataclasses

import ipaddress
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rich.console import Console

from dualblade.errors import ConfigError
from dualblade.sizes import format_size

from .common import ChatOptions, load


@dataclass
class ServeOptions:
    chat: ChatOptions           # the model and KV options, as `chat` takes them (max_tokens: the request limit)
    host: str
    port: int
    api_key: Optional[str]
    session_disk: str
    session_dir: Optional[Path]
    queue: int
    max_body: str


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check(opts: ServeOptions) -> tuple[int, int]:
    """(session quota, body limit) in bytes; ConfigError for anything wrong, before the model is read."""
    from dualblade.config import size_arg

    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"dualblade serve needs the server extra ({e.name} is missing); pip install "
                          "'dualblade[server]'") from None
    if not 0 <= opts.port <= 65535:
        raise ConfigError(f"--port {opts.port} is not a TCP port; give 1 to 65535 (or 0 for any free port)")
    if opts.api_key is not None and not opts.api_key.strip():
        raise ConfigError("--api-key is empty; give a key (or leave --api-key out on 127.0.0.1)")
    if not is_loopback(opts.host) and opts.api_key is None:
        raise ConfigError(f"--host {opts.host} is reachable from other machines, and no --api-key was given; give "
                          "--api-key KEY (or DUALBLADE_API_KEY), or keep --host 127.0.0.1")
    if opts.queue < 1:
        raise ConfigError(f"--queue {opts.queue} is not positive; give the number of requests that may wait, "
                          "such as 16")
    quota = 0 if opts.session_disk.strip() == "0" else size_arg(opts.session_disk, "--session-disk")
    body = size_arg(opts.max_body, "--max-body")
    if body < 1024:
        raise ConfigError(f"--max-body {opts.max_body} is under 1 KiB; give a size such as 8M")
    if opts.session_dir is not None:
        d = Path(opts.session_dir).expanduser()
        if d.exists() and not d.is_dir():
            raise ConfigError(f"--session-dir {d} is not a directory; give a directory")
    return quota, body


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}; give an address such as 127.0.0.1") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}; give another --port (or --host)") from None
    sock.set_inheritable(True)
    return sock


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


def run_serve(opts: ServeOptions) -> None:
    quota, body_limit = _check(opts)  # first: it says so when the server extra is missing
    from dualblade import conversations
    from dualblade.heap import fix_malloc_thresholds
    from dualblade.server import Engine, Limits, ServedLlama, create_app, serve_forever

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    sock = _bind(opts.host, opts.port)
    fix_malloc_thresholds()  # before the model and the worker allocate: memory goes back when requests end
    try:
        if quota > 0 and opts.chat.flash_attn is None:
            # conversations are saved after every reply: with flash attention V is kept by cell, so a save
            # appends the reply's rows (off, V is transposed and a reply touches a piece of every row)
            opts.chat = dataclasses.replace(opts.chat, flash_attn=True)
        llm, _ = load(opts.chat, err, live=False, cls=ServedLlama)
        try:
            store = None
            if quota > 0:
                base = Path(opts.session_dir).expanduser() if opts.session_dir else conversations.default_base()
                store = conversations.ConversationStore(conversations.store_dir(base, llm), quota)
            model_id = Path(llm.model_path).name
            model_id = model_id[: -len(".gguf")] if model_id.endswith(".gguf") else model_id
            engine = Engine(llm, model_id, store, Limits(opts.chat.max_tokens, opts.queue, body_limit))
            app = create_app(engine, opts.api_key)
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            saved = (f"conversations in {store.dir} (up to {format_size(quota)}, {len(store.entries)} saved)"
                     if store else "conversations not saved (--session-disk 0)")
            print(f"dualblade serve: {model_id} on http://{shown}:{port}/v1 (n_ctx {llm.n_ctx()}, "
                  f"{'API key required' if opts.api_key else 'no API key'}); {saved}; Ctrl-C stops",
                  file=sys.stderr, flush=True)
            # uvicorn shuts down on SIGINT/SIGTERM, then raises the signal again: both end here, cleanly
            signal.signal(signal.SIGTERM, _exit_cleanly)
            try:
                serve_forever(app, sock, log_level="info" if opts.chat.verbose else "warning")
            except KeyboardInterrupt:
                pass
            finally:
                engine.stop()
        finally:
            llm.close()
    finally:
        sock.close()
