"""`dualblade chat`: a streaming terminal chat, or a line-by-line responder on a pipe."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from dualblade.errors import ConfigError, DualbladeError, EvalAborted, KVIOError
from dualblade.heap import fix_malloc_thresholds
from dualblade.sizes import format_size

from .common import ChatOptions, load, print_sessions

HELP = """commands:
  /stats         KV placement and counters
  /reset         forget the conversation
  /save NAME     save the conversation and its KV as session NAME (or a file path)
  /load NAME     resume session NAME (saved with this model and --ctx-size/--cache-type)
  /sessions      list the saved sessions
  /help          this text
  /exit          quit (or Ctrl-D); Ctrl-C stops a reply"""

# tokens a chat format adds around one message (turn markers); an over-estimate keeps us in context
_TURN_OVERHEAD = 8


class Chat:
    """The conversation: history within the context, one streamed reply at a time."""

    def __init__(self, llm, opts: ChatOptions, chat_format: Optional[str], out, err: Console, status: bool):
        self.llm, self.opts, self.format = llm, opts, chat_format
        self.out, self.err, self.show_status = out, err, status
        self.messages: list[dict] = []
        self._tokens: dict[str, int] = {}
        self.one_line = False
        self.trims_when_idle = False  # interactive: kv_trim before each prompt

    def reset(self) -> None:
        self.messages.clear()
        self.llm.reset()

    def save_session(self, name: str) -> Path:
        """The conversation (messages and KV) to the named session; its path."""
        import json

        from dualblade.sessions import resolve

        path = resolve(name)
        app = json.dumps({"messages": self.messages, "system": self.opts.system}).encode()
        self.llm.save_session(path, app=app)
        return path

    def load_session(self, name: str) -> Path:
        """Resumes the named session: its KV and its messages."""
        import json

        from dualblade.sessions import resolve

        path = resolve(name)
        st = self.llm.load_session(path)
        try:
            app = json.loads(st.get("app") or b"{}")
        except ValueError:
            app = {}
        self.messages = list(app.get("messages") or [])
        return path

    def _count(self, msg: dict) -> int:
        key = msg["content"]
        if key not in self._tokens:
            self._tokens[key] = len(self.llm.tokenize(msg["content"].encode(), add_bos=False, special=False))
        return self._tokens[key] + _TURN_OVERHEAD

    def _request(self) -> list[dict]:
        """The messages to send: the system prompt, then as much recent history as fits."""
        msgs = list(self.messages)
        system = self.opts.system
        if system and self.format == "gemma":
            # Gemma has no system role: its convention is to lead the first user turn with it
            first = {"role": "user", "content": f"{system}\n\n{msgs[0]['content']}"}
            msgs = [first] + msgs[1:] if msgs else msgs
            system = None
        room = self.llm.n_ctx() - self.opts.max_tokens - _TURN_OVERHEAD
        head = [{"role": "system", "content": system}] if system else []
        used = sum(self._count(m) for m in head)
        keep: list[dict] = []
        for m in reversed(msgs):
            c = self._count(m)
            if used + c > room:
                break
            keep.insert(0, m)
            used += c
        if not keep or keep[-1] is not msgs[-1]:
            raise ConfigError(f"the message is too long for the context ({self._count(msgs[-1])} tokens, "
                              f"{max(room, 0)} free after --max-tokens); raise --ctx-size or lower --max-tokens")
        while keep and keep[0]["role"] != "user":  # a conversation restarts on a user turn
            keep.pop(0)
        return head + keep

    def reply(self, text: str, live: bool) -> str:
        """Streams the answer to text; Ctrl-C at any point stops it and keeps what came."""
        self.messages.append({"role": "user", "content": text})
        before = self.llm.counters()
        t0 = time.perf_counter()
        t_first = None
        parts: list[str] = []
        progress = _PromptProgress(self.err) if live else None
        interrupted = False
        try:
            stream = self._stream()
            self.llm.eval_progress = progress.update if progress else None
            with _interrupt_stops_eval(self.llm):
                for delta in stream:
                    if t_first is None:
                        delta = delta.lstrip()
                        if not delta:
                            continue
                        t_first = time.perf_counter()
                        if progress:
                            progress.stop()
                    if self.one_line:  # a pipe: one answer, one line
                        delta = delta.replace("\r", " ").replace("\n", " ")
                    parts.append(delta)
                    self.out.write(delta)
                    self.out.flush()
        except (KeyboardInterrupt, EvalAborted):
            interrupted = True
        except ConfigError:
            self.messages.pop()
            raise
        finally:
            if progress:
                progress.stop()
            self.llm.eval_progress = None
        answer = "".join(parts)
        self.out.write("\n")
        self.out.flush()
        if interrupted:
            self.err.print("[reply stopped]", style="dim", markup=False)
        self.messages.append({"role": "assistant", "content": answer})
        if self.show_status:
            self._status(before, t0, t_first)
        return answer

    def _stream(self):
        """The reply's text pieces. When the formatted conversation does not fit the context, the oldest
        turns are dropped until it does (the turn-marker estimate of _request can be short)."""
        while True:
            request = self._request()
            gen = self.llm.create_chat_completion(messages=request, stream=True, max_tokens=self.opts.max_tokens,
                                                  temperature=self.opts.temp,
                                                  seed=self.opts.seed if self.opts.seed >= 0 else None)
            try:
                first = next(gen, None)
            except ValueError as e:
                if "exceed context window" not in str(e):
                    raise
                if not self._drop_oldest_turn():
                    raise ConfigError(f"the message is too long for the context ({e}); raise --ctx-size or "
                                      "lower --max-tokens") from None
                continue
            break
        try:
            for chunk in ([first] if first is not None else []):
                yield chunk["choices"][0]["delta"].get("content") or ""
            for chunk in gen:
                yield chunk["choices"][0]["delta"].get("content") or ""
        finally:
            gen.close()

    def _drop_oldest_turn(self) -> bool:
        """Forgets the oldest user/assistant exchange; False when only the current message is left."""
        if len(self.messages) <= 1:
            return False
        del self.messages[0]
        while len(self.messages) > 1 and self.messages[0]["role"] != "user":
            del self.messages[0]
        return True

    def _status(self, before: dict, t0: float, t_first: Optional[float]) -> None:
        after = self.llm.counters()
        generated = after["sampled"] - before["sampled"]
        prompt = after["prompt_tokens"] - before["prompt_tokens"]
        t_end = time.perf_counter()
        rate = (generated - 1) / (t_end - t_first) if t_first and generated > 1 and t_end > t_first else 0.0
        first = f"first token {t_first - t0:.2f} s" if t_first else "no token"
        st = self.llm.kv_stats()
        cached = f" + {format_size(st['page_cache_bytes'])} page cache" if st["page_cache_bytes"] else ""
        paths = ""
        if st["offloaded_bytes"]:
            n = st["layers_by_path"]
            paths = f" ({n['mmap']} layers page cache, {n['direct']} direct)" if st["policy"] == "auto" else ""
        spec = st.get("speculation")
        drafts = ""
        if spec and spec["passes"]:
            drafts = (f", drafts {spec['accepted']}/{spec['drafted']} accepted "
                      f"({spec['mean_accepted_length']:.2f} tok a pass)")
        # what this reply's generation read from storage per token it generated (speculation divides it)
        steps = after["step_sampled"] - before["step_sampled"]
        if steps and st["offloaded_bytes"]:
            per = (after["step_bytes_read"] - before["step_bytes_read"]) / steps
            drafts += f", {format_size(per)} read a generated token"
        self.err.print(f"{prompt} prompt tok, {generated} generated, {rate:.1f} tok/s, {first}, "
                       f"KV {format_size(st['resident_bytes'])} resident{cached} / "
                       f"{format_size(st['offloaded_bytes'])} offloaded{paths}{drafts}", style="dim", markup=False,
                       soft_wrap=True)

    def print_stats(self, console: Console) -> None:
        st = self.llm.kv_stats()
        budget = "none" if st["budget_bytes"] is None else format_size(st["budget_bytes"])
        t = Table(title=f"KV cache: policy {st['policy']}, budget {budget}")
        for c in ("layer", "path", "size", "resident", "read", "written", "io wait"):
            t.add_column(c, justify="left" if c == "path" else "right")
        for l in st["layers"]:
            t.add_row(str(l["layer"]), l["path"], format_size(l["bytes"]), format_size(l["resident_bytes"]),
                      format_size(l["bytes_read"]), format_size(l["bytes_written"]), f"{l['io_wait_s']:.3f} s")
        t.add_section()
        t.add_row("all", "", format_size(st["kv_bytes_total"]), format_size(st["resident_bytes"]),
                  format_size(st["bytes_read"]), format_size(st["bytes_written"]), f"{st['io_wait_s']:.3f} s")
        console.print(t)
        if st["io_engine"]:
            console.print(f"I/O: {st['io_engine']} ({st['io_engine_reason']}), pipeline depth {st['pipeline_depth']}, "
                          f"staged {format_size(st['staged_bytes'])} (peak {format_size(st['staged_peak_bytes'])})",
                          markup=False, soft_wrap=True)
            sg = st["staging"]
            how = "reused (moved, not faulted in again)" if sg["reused"] else "faulted in per pass"
            idle = "; given back while the chat waits for you" if self.trims_when_idle and sg["reused"] else ""
            console.print(f"staging: {format_size(sg['pool_bytes'])} pool in {format_size(sg['chunk_bytes'])} chunks, "
                          f"{how}{idle}", markup=False, soft_wrap=True)
            check = (f"CRC-32C per block ({format_size(st['checksum_bytes'])} of checksums)" if st["verify"]
                     else "off (--no-verify)")
            console.print(f"integrity: {check}; I/O errors: {st['io_errors']}", markup=False, soft_wrap=True)
        line = vram_line(st)
        if line:
            console.print(line, markup=False, soft_wrap=True)
        mem = st.get("memory")
        if mem:
            limit = "none" if mem["limit_bytes"] is None else format_size(mem["limit_bytes"])
            room = "unlimited" if mem["page_cache_room_bytes"] is None else format_size(mem["page_cache_room_bytes"])
            console.print(f"memory: limit {limit}, page cache room for KV {room}, "
                          f"page-cache layers hold {format_size(mem['page_cache_need_bytes'])}, weights keep "
                          f"{format_size(mem['weights_reserve_bytes'])}, compute buffers yet to fill "
                          f"{format_size(mem['buffers_reserve_bytes'])}", markup=False, soft_wrap=True)
        if st["switches"]:
            more = st["switch_count"] - len(st["switches"])
            console.print(f"path switches: {st['switch_count']}" + (f" (last {len(st['switches'])})" if more else ""),
                          markup=False)
            for e in st["switches"][-10:]:
                who = "all offloaded layers" if e["layer"] is None else f"layer {e['layer']}"
                console.print(f"  {e['t_s']:8.2f} s  {who}: {e['from']} -> {e['to']}  ({e['reason']})",
                              markup=False, soft_wrap=True)


def vram_line(st: dict) -> Optional[str]:
    """/stats' line for the VRAM tier (GPU builds with a vram_budget); None when it holds nothing."""
    v = st.get("vram") or {}
    resident, streamed = v.get("resident_layers", 0), v.get("streamed_layers", 0)
    if not resident and not streamed:
        return None
    text = f"VRAM: {resident} layers resident ({format_size(v.get('resident_bytes', 0))})"
    if streamed:
        text += (f", {streamed} streamed through {v['slots']} slots of {format_size(v['slot_bytes'])}; copied "
                 f"host->VRAM {format_size(v['h2d_bytes'])} ({format_size(v['h2d_pinned_bytes'])} page-locked), "
                 f"back {format_size(v['d2h_bytes'])}, copy stall {v['copy_wait_s']:.3f} s")
    return text


class _PromptProgress:
    """A progress line on stderr while a long prompt is evaluated (more than one batch)."""

    def __init__(self, err: Console):
        self.err, self._progress, self._task = err, None, None

    def update(self, done: int, total: int) -> None:
        if self._progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(TextColumn("prompt"), BarColumn(), MofNCompleteColumn(),
                                      console=self.err, transient=True)
            self._progress.start()
            self._task = self._progress.add_task("prompt", total=total)
        self._progress.update(self._task, completed=done, total=total)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def run_chat(opts: ChatOptions) -> None:
    interactive = sys.stdin.isatty()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    fix_malloc_thresholds()  # a chat runs for long: a reply's freed buffers go back, and auto sees the room
    llm, chat_format = load(opts, err, live=interactive and err.is_terminal)
    try:
        show = opts.stats if opts.stats is not None else interactive
        chat = Chat(llm, opts, chat_format, sys.stdout, err, show)
        if opts.session:
            from dualblade.sessions import resolve

            if resolve(opts.session).exists():
                chat.load_session(opts.session)
                if opts.verbose or interactive:
                    err.print(f"resumed session {opts.session}: {len(chat.messages)} messages, {llm.n_tokens} "
                              "tokens", style="dim", markup=False)
        try:
            if interactive:
                _interactive(chat, err)
            else:
                _piped(chat, err)
        finally:
            if opts.session and chat.messages:
                chat.save_session(opts.session)  # on exit too (a reply cut short by Ctrl-C included)
    finally:
        llm.close()


def _command(chat: Chat, line: str, console: Console) -> Optional[bool]:
    """Runs a /command; True to quit, False if handled, None if the line is not a command."""
    cmd = line.strip().lower()
    word, _, arg = line.strip().partition(" ")
    arg = arg.strip()
    if word.lower() in ("/save", "/load"):
        if not arg:
            console.print(f"{word.lower()} needs a session name: {word.lower()} NAME", markup=False)
            return False
        if word.lower() == "/save":
            path = chat.save_session(arg)
            console.print(f"saved session {arg} ({path})", markup=False, style="dim")
        else:
            path = chat.load_session(arg)
            console.print(f"resumed session {arg}: {len(chat.messages)} messages, {chat.llm.n_tokens} tokens",
                          markup=False, style="dim")
        return False
    if cmd == "/sessions":
        print_sessions(console)
        return False
    if cmd in ("/exit", "/quit"):
        return True
    if cmd == "/reset":
        chat.reset()
        console.print("[dim]conversation cleared[/dim]")
        return False
    if cmd == "/stats":
        chat.print_stats(console)
        return False
    if cmd == "/help":
        console.print(HELP, highlight=False, markup=False)
        return False
    if cmd.startswith("/") and " " not in cmd:
        console.print(f"unknown command {cmd}; /help lists them", markup=False)
        return False
    return None


def _turn(chat: Chat, line: str, console: Console, live: bool) -> bool:
    """One input line: a /command or a message to answer. True to quit."""
    if not line.strip():
        return False
    r = _command(chat, line, console)
    if r is None:
        chat.reply(line, live=live)
        if chat.opts.session:
            chat.save_session(chat.opts.session)  # kept saved as it goes
    return r is True


_KV_FIX = "check the KV storage (dmesg), or give another --kv-dir or --kv-device"


@contextlib.contextmanager
def _interrupt_stops_eval(llm):
    """Ctrl-C stops an evaluation in llama.cpp too. Python raises KeyboardInterrupt only once the C call returns, and
    on the CPU a long prompt's batch of several ubatches is one llama_decode: a thread woken by the signal's wakeup
    byte asks the evaluation to stop (Llama.abort_eval), then the KeyboardInterrupt comes as usual. Outside the main
    thread (no wakeup fd there) Ctrl-C waits for the batch, as before."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:
        os.close(r)
        os.close(w)
        yield
        return
    done = threading.Event()

    def watch():
        while not done.is_set():
            got = os.read(r, 64)
            if not done.is_set() and signal.SIGINT in got:
                llm.abort_eval()

    watcher = threading.Thread(target=watch, name="dualblade-chat-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old)
        os.write(w, b"\0")  # wakes the watcher to end
        watcher.join()
        os.close(r)
        os.close(w)
        llm.abort_eval(False)  # a stop asked as the reply ended must not stop the next one


def _interactive(chat: Chat, err: Console) -> None:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    # Ctrl-C stops a reply: a chat started from a script's background job inherits SIGINT ignored, and Python then
    # installs no handler of its own; the person at the terminal still needs the key
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = Console(highlight=False)
    out.print(f"[bold]dualblade chat[/bold] — /help for commands, Ctrl-D to quit", highlight=False)
    chat.trims_when_idle = True
    while True:
        try:
            # waiting for the user: the direct path's staging pool goes back to the system (the next reply
            # faults its pages in again: a few huge pages, nothing next to the time it takes)
            chat.llm.kv_trim()
        except KVIOError as e:
            chat.llm.reset()
            err.print(f"error: {e.detail} ({_KV_FIX}); the next message rebuilds the KV cache", style="red",
                      markup=False, highlight=False)
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(Ctrl-D or /exit quits)")
            continue
        try:
            if _turn(chat, line, out, live=err.is_terminal):
                return
        except KeyboardInterrupt:
            # Ctrl-C that lands after Enter but before the reply's own handler is set up: that message is
            # dropped (no half turn stays in the history) and the chat goes on
            if chat.messages and chat.messages[-1]["role"] == "user":
                chat.messages.pop()
            print()
        except KVIOError as e:
            # the conversation's text is kept: the next message rebuilds the cache from it
            chat.llm.reset()
            err.print(f"\nerror: {e.detail}; the reply was cut short there ({_KV_FIX}); the next message "
                      "rebuilds the KV cache", style="red", markup=False, highlight=False)
        except (DualbladeError, ValueError) as e:  # this message failed; the conversation goes on
            err.print(f"error: {e}", style="red", markup=False, highlight=False)


def _piped(chat: Chat, err: Console) -> None:
    chat.one_line = True
    out = err  # command output (/stats, /help) stays out of the answers on stdout
    for line in sys.stdin:
        try:
            if _turn(chat, line.rstrip("\n"), out, live=False):
                return
        except KVIOError as e:
            print(flush=True)  # end the answer that was cut short
            raise DualbladeError(f"{e.detail}; the answer was cut short there; {_KV_FIX}") from None
