"""The installed `dualblade` command, run for real on the bundled Gemma-3-270M (and the synthetic tiny model):
pipe chat, terminal chat under a pseudo-terminal, every error a user can cause, `info`, help."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import time

import pexpect
import pytest

from conftest import PROMPT_TEXT, assert_user_error, dualblade_exe, min_budget, placement, run_cli
from conftest import no_traceback as _no_traceback
from dualblade.gguf_header import model_info
from dualblade.sizes import format_size

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
STATUS = re.compile(r"^(\d+) prompt tok, (\d+) generated, (\d+(?:\.\d+)?) tok/s, (?:first token \d+(?:\.\d+)? s|no token), "
                    r"KV (\S+ \S+) resident(?: \+ \S+ \S+ page cache)? / (\S+ \S+) offloaded"
                    r"(?: \((\d+) layers page cache, (\d+) direct\))?"
                    r"(?:, drafts \d+/\d+ accepted \([\d.]+ tok a pass\))?(?:, (\S+ \S+) read a generated token)?$")
# a layer row of the /stats table: "│     0 │ ram  │ 1.00 MiB │ ..."
STATS_ROW = re.compile(r"^│\s+(\d+)\s+│\s+(ram|mmap|direct)\s+│")
# a layer row of `info`'s placement table: "│     5 │ global │ 4.00 MiB │ ram    │"
PLAN_ROW = re.compile(r"^│\s+(\d+)\s+│\s+(window|global)\s+│\s+[\d.]+ \w+\s+│\s+(ram|mmap|direct)\s+│$")

GREEDY = ("-c", "1024", "-n", "24", "--temp", "0", "--seed", "1")
TWO_QUESTIONS = "What is the capital of France?\nAnd of Italy?\n"
# a prompt the base model continues for as long as it is allowed to (counting on)
LONG_REPLY = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,"

N_LAYERS = 18           # Gemma-3-270M
GLOBAL_LAYERS = (5, 11, 17)
MiB = 1 << 20


class _Words(dict):
    """Placeholders of the command lines and expected words below: the bad files, and {MIN_MIB_<N_CTX>}, the
    bundled model's minimum budget at that context under the default policy, in MiB rounded up as the
    messages give it (asked of the placement plan, not restated)."""

    def __missing__(self, key: str) -> str:
        from dualblade.models import bundled_model_path

        assert key.startswith("MIN_MIB_"), key
        return str(-(-min_budget(bundled_model_path(), int(key[8:]), "auto") // MiB))


def _status_lines(stderr: str) -> list[re.Match]:
    lines = stderr.splitlines()
    matches = [STATUS.match(l) for l in lines]
    assert all(matches), f"stderr has lines that are not status lines: {stderr!r}"
    return matches


def _stats_rows(text: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[2]) for m in map(STATS_ROW.match, text.splitlines()) if m]


# --------------------------------------------------------------------------------------------- pipe chat


@pytest.fixture(scope="module")
def greedy_pair():
    """The same greedy pipe chat run twice, with --stats."""
    return [run_cli("chat", *GREEDY, "--stats", input=TWO_QUESTIONS, timeout=180) for _ in range(2)]


def test_pipe_one_answer_line_per_question(greedy_pair):
    p = greedy_pair[0]
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.splitlines()
    assert len(answers) == 2, p.stdout
    assert all(a.strip() for a in answers), p.stdout
    assert p.stdout.endswith("\n")
    assert "Paris" in answers[0]
    assert "\x1b" not in p.stdout and not re.search(r"\[/?(dim|bold|red)\]", p.stdout), repr(p.stdout)


def test_pipe_stats_status_line_per_reply(greedy_pair):
    p = greedy_pair[0]
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stderr
    status = _status_lines(p.stderr)
    assert len(status) == 2, p.stderr
    for m in status:
        line = m[0]
        for word in ("prompt tok", "generated", "tok/s", "resident", "offloaded"):
            assert word in line
        assert int(m[1]) > 0 and 0 < int(m[2]) <= 24
        assert m[4] == "18.0 MiB" and m[5] == "0 B"  # 18 layers x 1 MiB at -c 1024, all pinned


def test_pipe_without_stats_has_empty_stderr():
    p = run_cli("chat", *GREEDY, input=TWO_QUESTIONS, timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    assert len(p.stdout.splitlines()) == 2


def test_pipe_greedy_is_deterministic(greedy_pair):
    a, b = greedy_pair
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.strip()


def test_pipe_commands_stats_help_unknown():
    p = run_cli("chat", *GREEDY, input="What is the capital of France?\n/stats\n/help\n/bogus\n", timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert "\x1b" not in p.stdout and "\x1b" not in p.stderr
    # stdout carries the answers only; what the commands print goes to stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 1 and "Paris" in lines[0], p.stdout
    assert "KV cache: policy" in p.stderr
    rows = _stats_rows(p.stderr)
    assert [l for l, _ in rows] == list(range(N_LAYERS)), p.stderr
    assert {path for _, path in rows} == {"ram"}
    assert re.search(r"^│\s+all\s+│.*18\.0 MiB", p.stderr, re.M), p.stderr
    for cmd in ("/stats", "/reset", "/help", "/exit"):
        assert cmd in p.stderr
    assert "unknown command /bogus" in p.stderr


def test_pipe_reset_forgets_the_conversation():
    follow_up = "And of Italy?"
    p = run_cli("chat", *GREEDY, input=f"What is the capital of France?\n{follow_up}\n/reset\n{follow_up}\n",
                timeout=180)
    fresh = run_cli("chat", *GREEDY, input=f"{follow_up}\n", timeout=180)
    for r in (p, fresh):
        _no_traceback(r)
        assert r.returncode == 0, r.stderr
    lines = p.stdout.splitlines()
    assert len(lines) == 3 and "conversation cleared" in p.stderr, p.stdout
    in_context, after_reset = lines[1], lines[2]
    # after /reset the follow-up is answered exactly as in a fresh process ...
    assert after_reset == fresh.stdout.strip()
    # ... and the conversation did matter before it (so the comparison above can tell)
    assert in_context != after_reset


@pytest.mark.parametrize("cmd", ["/exit", "/quit"])
def test_pipe_exit_stops_before_later_lines(cmd):
    p = run_cli("chat", *GREEDY, "--stats", input=f"Hello\n{cmd}\nWhat is the capital of France?\nMore?\n",
                timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1, p.stdout
    assert "Paris" not in p.stdout
    assert len(_status_lines(p.stderr)) == 1


def test_pipe_multiline_reply_stays_on_one_line():
    """README: 'a pipe: one answer per line'. A reply the model writes over several lines must not turn
    into several stdout lines (a reader pairing questions and answers by line would go out of step)."""
    p = run_cli("chat", *GREEDY[:2], "-n", "64", "--temp", "0", "--seed", "1",
                "--system", "You are a novelist who writes very long stories.",
                input="Write a very long story about a dragon\nWhat is the capital of France?\n", timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 2, f"2 questions, stdout lines: {p.stdout.splitlines()!r}"


@pytest.fixture(scope="module")
def tiny_instruct_path(tmp_path_factory):
    """The synthetic tiny model named as instruction-tuned: it chats in the Llama 3 turn format (not the
    one-line transcript), and its random weights write line breaks into replies."""
    import dataclasses

    from dualblade.synthetic import SHAPES, write_model

    shape = dataclasses.replace(SHAPES["tiny"], name="tiny-instruct")
    return write_model(tmp_path_factory.mktemp("models") / "tiny-instruct.gguf", shape, seed=2)


def test_pipe_reply_with_line_breaks_stays_one_line(tiny_instruct_path):
    """README: 'a pipe: one answer per line'. Whatever the chat format, a reply the model writes over
    several lines must come out as one stdout line per question."""
    questions = ["Hello", "What is the capital of France?", "Tell me a story.", "Write a poem.",
                 "List three colors.", "Why is the sky blue?"]
    p = run_cli("chat", str(tiny_instruct_path), "-c", "2048", "-n", "64", "--temp", "0", "--seed", "1", "-v",
                input="\n".join(questions) + "\n", timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert "Llama 3" in p.stderr  # the chat format this test is about
    lines = p.stdout.splitlines()
    assert len(lines) == len(questions), f"{len(questions)} questions, {len(lines)} stdout lines: {lines!r}"


def test_pipe_long_conversation_keeps_within_the_context(tiny_instruct_path):
    """History that outgrows the context is trimmed from the oldest turn ('as much recent history as
    fits'), whatever the chat format's turn markers cost: the conversation goes on."""
    questions = ["Hello", "What is the capital of France?", "Tell me a story.", "Write a poem.",
                 "List three colors.", "Why is the sky blue?", "Thanks!", "Goodbye"]
    p = run_cli("chat", str(tiny_instruct_path), "-c", "512", "-n", "64", "--temp", "0", "--seed", "1", "--stats",
                input="\n".join(questions) + "\n", timeout=180)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert len(_status_lines(p.stderr)) == len(questions)


def test_pipe_message_too_long_is_a_one_line_error():
    p = run_cli("chat", "-c", "512", "-n", "64", "--temp", "0", input="Hi\n" + "word " * 800 + "\nBye\n",
                timeout=180)
    _no_traceback(p)
    assert p.returncode != 0
    err = p.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("dualblade: error:") and "too long" in err[0], p.stderr
    assert len(p.stdout.splitlines()) == 1  # "Hi" was answered, "Bye" never


# ----------------------------------------------------------------- pipe chat with the KV offloaded


OFFLOAD_QUESTIONS = "What is the capital of France?\nAnd of Italy?\nTell me about Rome.\n" + LONG_REPLY + "\n"
_RAM_REFERENCE: dict = {}


def _offload_run(tmp_path, *args):
    """A 4-turn greedy pipe chat at -c 4096 (72 MiB of f16 KV); with --mem-budget, in a fresh --kv-dir."""
    kv = tmp_path / "kv"
    kv.mkdir(exist_ok=True)
    offload = "--mem-budget" in args
    p = run_cli("chat", "-c", "4096", "-n", "48", "--temp", "0", "--seed", "1", "--stats", *args,
                *(("--kv-dir", str(kv)) if offload else ()), input=OFFLOAD_QUESTIONS, timeout=240)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 4, p.stdout
    status = _status_lines(p.stderr)
    assert len(status) == 4
    if offload:
        assert status[-1][5] != "0 B", status[-1][0]  # something was offloaded
        assert list(kv.iterdir()) == []  # the KV file is unnamed: nothing is left behind
    else:
        assert status[-1][5] == "0 B", status[-1][0]
    return p


def _ram_reference(tmp_path, *args):
    if args not in _RAM_REFERENCE:
        _RAM_REFERENCE[args] = _offload_run(tmp_path, "--policy", "ram", *args)
    return _RAM_REFERENCE[args]


# budgets far above the minimum working set (2-9 MiB at -c 4096) and below the KV (20-72 MiB): some layers
# pinned, the rest offloaded
@pytest.mark.parametrize("cache_type,budget", [("q8_0", "30M"), ("q4_0", "20M")])
@pytest.mark.parametrize("policy", ["direct", "mmap"])
def test_pipe_offloaded_kv_same_answers_as_ram_quantized(tmp_path, policy, cache_type, budget):
    ram = _ram_reference(tmp_path, "--cache-type", cache_type)
    off = _offload_run(tmp_path, "--policy", policy, "--mem-budget", budget, "--cache-type", cache_type)
    assert off.stdout == ram.stdout


@pytest.mark.parametrize("policy", ["direct", "mmap", "auto"])
def test_pipe_offloaded_kv_same_answers_as_ram_f16(tmp_path, policy):
    """README: 'Outputs are exact: token-identical to the all-in-RAM run.' Offloaded layers switch flash
    attention on, so the all-in-RAM reference runs with --flash-attn."""
    ram = _ram_reference(tmp_path, "--flash-attn")
    off = _offload_run(tmp_path, "--policy", policy, "--mem-budget", "40M")  # minimum 8 MiB, KV 72 MiB
    assert off.stdout == ram.stdout
    # each reply's status line says what its generation read from storage per token (the direct path: each token
    # reads the offloaded rows back)
    read = [m[8] for m in _status_lines(off.stderr)]
    assert all(read) and (policy != "direct" or all(r != "0 B" for r in read)), off.stderr


@pytest.mark.parametrize("policy", ["direct", "mmap"])
def test_pipe_storage_policy_without_budget_pins_everything(tmp_path, policy):
    """No --mem-budget: every layer pinned, whatever the policy (README, 'Where the KV goes')."""
    ram = _ram_reference(tmp_path)
    p = _offload_run(tmp_path, "--policy", policy)
    assert p.stdout == ram.stdout
    assert _status_lines(p.stderr)[-1][4] == "72.0 MiB"


# --------------------------------------------------------------------------- terminal chat (pty)

TTY_TIMEOUT = 120


def _spawn(*args: str, sigint_ignored: bool = False):
    # (sigint_ignored: started as a script's background job starts it; the suite itself may run as one)
    child = pexpect.spawn(dualblade_exe(), ["chat", *args], encoding="utf-8", timeout=TTY_TIMEOUT,
                          dimensions=(50, 200), env={**os.environ, "TERM": "xterm-256color"},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored
                                                           else signal.SIG_DFL))
    child.expect(r"\n> ")
    return child


def _finish(child):
    if child.isalive():
        child.terminate(force=True)
    child.close()


def _plain(s: str) -> str:
    return ANSI.sub("", s)


def _stats_table(child) -> str:
    """/stats at the prompt: its output as plain text."""
    child.sendline("/stats")
    child.expect(r"\n> ")
    return _plain(child.before).replace("\r", "")


def _exit_cleanly(child) -> None:
    """/exit at the prompt: the chat ends with status 0."""
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0 and child.signalstatus is None


TTY_STATUS = r"(\d+) prompt tok, (\d+) generated, [\d.]+ tok/s[^\n]*offloaded"


def test_tty_reply_streams_then_status_then_prompt():
    child = _spawn("-c", "1024", "-n", "200", "--temp", "0")
    try:
        assert "dualblade chat" in _plain(child.before)
        child.sendline("What is the capital of France?")
        child.expect("Paris")
        child.expect(TTY_STATUS)
        assert 0 < int(child.match[2]) < 200
        child.expect(r"\n> ")
        assert child.isalive()
        _exit_cleanly(child)
    finally:
        _finish(child)


def test_tty_ctrl_c_stops_a_long_reply():
    child = _spawn("-c", "1024", "-n", "400", "--temp", "0")
    try:
        child.sendline(LONG_REPLY)
        child.expect_exact(LONG_REPLY + "\r\n")  # the terminal's echo of the question
        child.expect(r"5, 6, ")  # the reply is streaming
        child.sendintr()
        child.expect(TTY_STATUS)
        generated = int(child.match[2])
        shown = _plain(child.before)
        child.expect(r"\n> ")
        assert child.isalive()
        assert generated < 400, "the reply ran to --max-tokens: Ctrl-C did not stop it"
        assert "[reply stopped]" in shown, f"no '[reply stopped]' after Ctrl-C; the terminal showed {shown!r}"
        # the conversation goes on
        child.sendline("What is the capital of France?")
        child.expect(TTY_STATUS)
        child.expect(r"\n> ")
        assert child.isalive()
    finally:
        _finish(child)


@pytest.mark.slow
def test_tty_ctrl_c_stops_a_long_prompt_within_its_batch(heavy_path, tmp_path):
    """On the CPU a long prompt is one batch of several ubatches, computed layer by layer in one llama_decode, where
    Python's KeyboardInterrupt waits for the C call: Ctrl-C wakes a thread that stops the evaluation (abort_eval).
    Stopped within the batch, the later layers have written nothing; a batch computed to its end writes every
    layer (about 4 s here for this prompt). The chat goes on."""
    child = _spawn(str(heavy_path), "-c", "4096", "-n", "4", "--temp", "0", "--policy", "direct", "--mem-budget",
                   str(min_budget(heavy_path, 4096, "direct")), "--kv-dir", str(tmp_path))
    try:
        child.sendline((PROMPT_TEXT * 80).strip())  # about 2,900 tokens: one batch
        time.sleep(1.0)
        child.sendintr()
        child.expect(TTY_STATUS)
        child.expect(r"\n> ")
        written = [row.split("│")[6].strip() for row in _stats_table(child).splitlines()
                   if re.match(r"│\s+\d+ │ direct", row)]
        assert len(written) == 16 and written[-1] == "0 B", written
        child.sendline("Hello")
        child.expect(TTY_STATUS)
        child.expect(r"\n> ")
        _exit_cleanly(child)
    finally:
        _finish(child)


def test_tty_ctrl_c_right_after_enter_does_not_quit():
    """Ctrl-C pressed just after Enter, before the first token, stops that reply like any other: the
    chat must not exit (and lose the conversation). Tried a few times: the moment it lands varies."""
    child = _spawn("-c", "1024", "-n", "400", "--temp", "0")
    try:
        for attempt in range(6):
            child.sendline(LONG_REPLY)
            child.expect_exact(LONG_REPLY + "\r\n")
            child.sendintr()
            i = child.expect([r"\n> ", pexpect.EOF])
            assert i == 0, (f"attempt {attempt}: the chat exited on Ctrl-C right after Enter "
                            f"(output {_plain(child.before)!r})")
            assert child.isalive()
        _exit_cleanly(child)
    finally:
        _finish(child)


def test_tty_gives_the_staging_pool_back_while_waiting(tmp_path):
    """At the prompt the chat waits for a person: the direct path's staging pool is given back (kv_trim), and
    the next reply stages into fresh pages; /stats says so."""
    child = _spawn("-c", "2048", "-n", "16", "--temp", "0", "--policy", "direct", "--mem-budget", "24M",
                   "--kv-dir", str(tmp_path))
    try:
        for _ in range(2):
            child.sendline("Tell me about the sea.")
            child.expect(TTY_STATUS)
            child.expect(r"\n> ")
            table = _stats_table(child)
            m = re.search(r"^staging: (\S+ \S+) pool in .* chunks, reused .*; given back while the chat waits for "
                          r"you$", table, re.M)
            assert m and m.group(1) == "0 B", table
            peak = re.search(r"staged 0 B \(peak (\S+ \S+)\)", table)
            assert peak and peak.group(1) != "0 B" and "I/O errors: 0" in table, table  # the reply did stage
        _exit_cleanly(child)
    finally:
        _finish(child)


def test_tty_commands_ctrl_c_at_prompt_and_ctrl_d():
    child = _spawn("-c", "1024", "-n", "200", "--temp", "0")
    try:
        table = _stats_table(child)
        assert "KV cache: policy" in table
        rows = _stats_rows(table)
        assert [l for l, _ in rows] == list(range(N_LAYERS)) and {p for _, p in rows} == {"ram"}, table

        child.sendline("/reset")
        child.expect("conversation cleared")
        child.expect(r"\n> ")

        child.sendline("/help")
        child.expect(r"\n> ")
        helptext = _plain(child.before)
        for cmd in ("/stats", "/reset", "/help", "/exit", "Ctrl-C"):
            assert cmd in helptext

        child.sendintr()  # Ctrl-C at the empty prompt does not quit
        child.expect(r"Ctrl-D or /exit quits")
        child.expect(r"\n> ")
        time.sleep(0.5)
        assert child.isalive()

        child.sendeof()  # Ctrl-D quits, status 0
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0 and child.signalstatus is None
    finally:
        _finish(child)


def test_tty_ctrl_c_works_when_started_with_sigint_ignored():
    """A chat started from a script's background job (`cmd &` in a non-interactive shell) inherits SIGINT ignored;
    at a terminal its Ctrl-C handling is still there (at the prompt: the hint, not an exit; during a reply:
    test_tty_ctrl_c_stops_a_long_reply, the same handler)."""
    child = _spawn("-c", "1024", "-n", "200", "--temp", "0", sigint_ignored=True)
    try:
        child.sendintr()
        child.expect(r"Ctrl-D or /exit quits")
        child.expect(r"\n> ")
        _exit_cleanly(child)
    finally:
        _finish(child)


# --------------------------------------------------------------------------------------- errors


ERROR_CASES = [
    # (command line, a word the message must contain)
    ("chat --mem-budget 2X", "unknown unit"),
    ("chat --mem-budget -1G", "negative"),
    ("chat --mem-budget 0", "zero"),
    ("chat --mem-budget ''", "empty"),
    ("chat --mem-budget 99999T", "absurdly large"),
    ("chat --mem-budget 1000G", "machine's memory"),
    ("chat /nonexistent.gguf", "does not exist"),
    ("chat {TXT}", "not a GGUF"),
    ("chat {DIR}", "directory"),
    ("chat {TRUNC}", "truncated"),
    ("chat -c 0", "not positive"),
    ("chat -c 99999", "training context"),
    ("chat -c abc", "--ctx-size"),
    ("chat -n 0", "--max-tokens"),
    ("chat -n 5000 -c 1024", "--max-tokens"),
    ("chat --temp -1", "--temp"),
    ("chat -t 0", "--threads"),
    ("chat --policy bogus", "bogus"),
    ("chat --cache-type q5_1", "q5_1"),
    ("chat --kv-dir /nonexistent", "does not exist"),
    ("chat --kv-dir {TXT}", "not a directory"),
    ("chat --kv-device /nonexistent", "does not exist"),
    ("chat --kv-device {TXT}", "not a block device"),
    ("chat --kv-device /dev/null", "not a block device"),
    ("chat --kv-dir {KVDIR} --kv-device /dev/null", "both"),
    ("chat --kv-dir /dev/shm --mem-budget 40M -c 4096", "tmpfs"),
    ("chat --mem-budget 1M -c 4096", "minimum"),  # far below the minimum (8 MiB)
    ("info /nonexistent.gguf", "does not exist"),
    ("info {TXT}", "not a GGUF"),
    ("info {TRUNC}", "truncated"),
    ("info -c 0", "not positive"),
    ("info -c 99999", "training context"),
    ("info --mem-budget 1M -c 32768", "{MIN_MIB_32768}M"),
    ("info --mem-budget 2X", "unknown unit"),
    ("info --policy bogus", "bogus"),
    ("chat --frobnicate", "--frobnicate"),
    ("frob", "frob"),
]


@pytest.mark.parametrize("cmdline,word", ERROR_CASES, ids=[c for c, _ in ERROR_CASES])
def test_user_error_is_one_line(bad_files, cmdline, word):
    places = _Words(bad_files)
    args = [a.format_map(places) for a in shlex.split(cmdline)]
    assert_user_error(run_cli(*args, input="", timeout=120), word.format_map(places))


CLI_WORDING_CASES = [
    ("chat --mem-budget 1M -c 4096", "--mem-budget {MIN_MIB_4096}M"),
    ("chat --kv-dir /dev/shm --mem-budget 40M -c 4096", "--kv-dir"),
    ("chat --kv-dir {KVDIR} --kv-device /dev/null", "--kv-dir"),
]


@pytest.mark.parametrize("cmdline,flag", CLI_WORDING_CASES, ids=[c for c, _ in CLI_WORDING_CASES])
def test_chat_errors_speak_in_cli_flags(bad_files, cmdline, flag):
    """The fix a CLI error names must be a flag the user can type, not a Python API argument."""
    places = _Words(bad_files)
    args = [a.format_map(places) for a in shlex.split(cmdline)]
    p = run_cli(*args, input="", timeout=120)
    assert p.returncode != 0
    msg = p.stderr.strip()
    assert flag.format_map(places) in msg, msg
    for api in ("mem_budget=", "n_ctx", "kv_dir", "kv_device"):
        assert api not in msg, msg


def test_debug_shows_the_traceback():
    p = run_cli("--debug", "chat", "--mem-budget", "2X", input="", timeout=120)
    assert p.returncode != 0
    assert "Traceback" in p.stderr and "ConfigError" in p.stderr
    p = run_cli("info", "/nonexistent.gguf", env={"DUALBLADE_DEBUG": "1"}, timeout=120)
    assert p.returncode != 0 and "Traceback" in p.stderr and "ModelError" in p.stderr


# ------------------------------------------------------------------------------------------- info


@pytest.fixture(scope="module")
def info_4096():
    p = run_cli("info", "--json", "-c", "4096", timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_info_json_geometry(info_4096, gemma_path):
    r = info_4096
    assert r["model"] == str(gemma_path)
    assert r["architecture"] == "gemma3"
    assert r["n_layer"] == N_LAYERS and r["n_kv_layers"] == N_LAYERS
    assert r["n_head_kv"] == [1]
    assert r["head_dim_k"] == 256 and r["head_dim_v"] == 256
    assert r["n_ctx_train"] == 32768 and r["n_ctx"] == 4096
    assert len(r["swa_layers"]) == 15
    assert sorted(set(range(N_LAYERS)) - set(r["swa_layers"])) == list(GLOBAL_LAYERS)
    assert [l["layer"] for l in r["plan"]["layers"]] == list(range(N_LAYERS))
    assert [l["layer"] for l in r["plan"]["layers"] if not l["swa"]] == list(GLOBAL_LAYERS)


def test_info_json_kv_sizes(info_4096):
    ct = info_4096["cache_types"]
    assert ct["f16"]["kv_bytes_per_token"] == 18 * 2 * 256 * 2 == 18432
    assert ct["q8_0"]["kv_bytes_per_token"] == 18 * 2 * (256 // 32 * 34)
    assert ct["q4_0"]["kv_bytes_per_token"] == 18 * 2 * (256 // 32 * 18)
    for t, v in ct.items():
        assert v["kv_bytes_total"] == v["kv_bytes_per_token"] * 4096, t
    plan = info_4096["plan"]
    assert plan["budget_bytes"] is None
    assert {l["path"] for l in plan["layers"]} == {"ram"}
    assert plan["resident_bytes"] == ct["f16"]["kv_bytes_total"] and plan["offloaded_bytes"] == 0


def test_info_json_plan_under_budget():
    p = run_cli("info", "--json", "--mem-budget", "40M", "-c", "4096", "--policy", "direct", timeout=120)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["plan"]
    paths = [l["path"] for l in plan["layers"]]
    assert "ram" in paths and "direct" in paths and set(paths) == {"ram", "direct"}
    assert plan["policy"] == "direct" and plan["budget_bytes"] == 40 * 2**20
    assert plan["resident_bytes"] + plan["staging_bytes"] <= 40 * 2**20
    assert plan["staging_bytes"] > 0
    assert plan["resident_bytes"] == sum(l["bytes"] for l in plan["layers"] if l["path"] == "ram")
    assert plan["offloaded_bytes"] == sum(l["bytes"] for l in plan["layers"] if l["path"] != "ram")
    assert plan["resident_bytes"] + plan["offloaded_bytes"] == 18432 * 4096


def test_info_human_output(gemma_path):
    p = run_cli("info", "-c", "4096", "--mem-budget", "40M", "--policy", "direct", timeout=120)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""
    out = p.stdout
    assert "gemma3" in out and "18 layers" in out
    assert "KV cache size" in out and "┏" in out and "┃ type" in out
    assert re.search(r"│ f16\s+│\s+18\.0 KiB │\s+72\.0 MiB │", out), out
    rows = [PLAN_ROW.match(l) for l in out.splitlines()]
    rows = [(int(m[1]), m[2], m[3]) for m in rows if m]
    assert [r[0] for r in rows] == list(range(N_LAYERS)), out
    assert [r[0] for r in rows if r[1] == "global"] == list(GLOBAL_LAYERS)
    assert {r[2] for r in rows} == {"ram", "direct"}
    # the C module's plan for this budget, in the units the table uses
    paths, staging = placement(gemma_path, 4096, "direct", 40 * MiB)
    sizes = model_info(gemma_path).layer_bytes(4096)
    resident = sum(b for b, path in zip(sizes, paths) if path == "ram")
    assert 0 < resident and resident + staging <= 40 * MiB and staging > 0
    assert [r[2] for r in rows] == paths
    assert (f"resident {format_size(resident)}, offloaded {format_size(sum(sizes) - resident)}, "
            f"direct-path staging {format_size(staging)}") in out, out


def test_info_tiny_model(tiny_path):
    p = run_cli("info", str(tiny_path), "--json", "-c", "1024", timeout=120)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["architecture"] == "llama"
    assert r["n_layer"] == 8 and r["n_kv_layers"] == 8
    assert r["n_head_kv"] == [2]
    assert r["swa_layers"] == []
    d = r["head_dim_k"]
    assert r["cache_types"]["f16"]["kv_bytes_per_token"] == 8 * 2 * 2 * d * 2
    human = run_cli("info", str(tiny_path), "-c", "1024", timeout=120)
    assert human.returncode == 0 and "llama" in human.stdout and "8 layers" in human.stdout


def test_chat_on_tiny_model(tiny_path):
    p = run_cli("chat", str(tiny_path), "-c", "512", "-n", "8", "--temp", "0", "--stats", input="Hello\n",
                timeout=120)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1
    (m,) = _status_lines(p.stderr)
    assert m[4] == "1.00 MiB"  # 8 layers x 2 KV heads x head dim 32 x 512 cells, K and V in f16


# ------------------------------------------------------------------------------------------- help


@pytest.mark.parametrize("args,usage", [
    ((), "Usage: dualblade"),
    (("--help",), "Usage: dualblade"),
    (("-h",), "Usage: dualblade"),
    (("chat", "--help"), "Usage: dualblade chat"),
    (("info", "--help"), "Usage: dualblade info"),
])
def test_help(args, usage):
    p = run_cli(*args, input="", timeout=60)
    _no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert usage in p.stdout
    if args[:1] == ("chat",):
        for opt in ("--mem-budget", "--ctx-size", "--max-tokens", "--temp", "--policy", "--kv-dir", "--cache-type"):
            assert opt in p.stdout
    elif not args or args[0] != "info":
        assert "chat" in p.stdout and "info" in p.stdout


def test_info_json_three_tier_plan():
    """-ngl/--vram-budget: the plan a GPU build would make (the header is all it needs). Gemma-3's 18 layers
    hold 4096 rows each at 4096 tokens (the windowed ones too: swa_full), 4 MiB of KV per layer: 24M keeps 4
    layers in VRAM next to 2 slots of 4 MiB and streams the other 14 from the host tiers."""
    p = run_cli("info", "--json", "-c", "4096", "-ngl", "99", "--vram-budget", "24M", "--mem-budget", "16M",
                "--policy", "direct", timeout=120)
    assert p.returncode == 0, p.stderr
    plan = json.loads(p.stdout)["plan"]
    layers = plan["layers"]
    resident = [l for l in layers if l["path"] == "vram"]
    streamed = [l for l in layers if l["streamed"]]
    assert len(resident) == 4 and len(streamed) == 14
    assert not any(l["streamed"] for l in resident)
    assert plan["vram_bytes"] <= 24 * 2**20 and plan["vram_slots"] == 2
    assert plan["vram_bytes"] == sum(l["bytes"] for l in resident) + 2 * plan["vram_slot_bytes"]
    # the streamed layers' host copies: pinned within --mem-budget, the rest on the direct path
    assert {l["path"] for l in streamed} <= {"ram", "direct"} and any(l["path"] == "direct" for l in streamed)
    p = run_cli("info", "-c", "4096", "-ngl", "99", "--vram-budget", "24M", "--mem-budget", "16M", "--policy",
                "direct", timeout=120)
    assert p.returncode == 0 and "direct -> VRAM slot" in p.stdout and "VRAM (a GPU build" in p.stdout


def test_info_vram_budget_mistakes_are_one_line():
    assert_user_error(run_cli("info", "-c", "4096", "-ngl", "99", "--vram-budget", "1M", timeout=120),
                      "--vram-budget 8M or more")
    assert_user_error(run_cli("info", "--vram-budget", "1G", timeout=120), "-ngl is 0")
    assert_user_error(run_cli("info", "-ngl", "99", "--vram-budget", "2X", timeout=120), "unknown unit")
