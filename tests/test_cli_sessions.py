"""`dualblade chat --session`, /save /load /sessions, and `dualblade sessions` (ls, rm, --kv-wipe)."""
from __future__ import annotations

import os

import pytest

from conftest import assert_user_error, no_traceback, run_cli

CHAT = ("--temp", "0", "--seed", "1", "-c", "1024", "-n", "12", "--policy", "direct", "-m", "6M")


@pytest.fixture
def home(tmp_path):
    """An empty cache home (sessions live under it) and a KV dir."""
    (tmp_path / "kv").mkdir()
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}, str(tmp_path / "kv")


def chat(model, env_kv, *extra, input: str):
    env, kv = env_kv
    p = run_cli("chat", str(model), *CHAT, "--kv-dir", kv, *extra, input=input, env=env)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    return p


def test_session_resumes_exactly_across_runs(gemma_path, home):
    """Two messages in one run, or the first in one run and the second after --session resumed it: the same
    second answer (greedy), token for token."""
    one = chat(gemma_path, home, input="Name a colour.\nAnd another one?\n").stdout.splitlines()
    assert len(one) == 2 and all(one)
    a = chat(gemma_path, home, "--session", "talk", input="Name a colour.\n").stdout.splitlines()
    b = chat(gemma_path, home, "--session", "talk", input="And another one?\n").stdout.splitlines()
    assert a == one[:1] and b == one[1:]
    env, _ = home
    path = os.path.join(env["XDG_CACHE_HOME"], "dualblade", "sessions", "talk.dbkv")
    assert os.stat(path).st_mode & 0o777 == 0o600
    ls = run_cli("sessions", env=env)
    no_traceback(ls)
    assert ls.returncode == 0 and "talk" in ls.stdout and "gemma" in ls.stdout.lower(), ls.stdout


def test_save_load_and_sessions_commands(gemma_path, home, tmp_path):
    target = tmp_path / "mine.dbkv"
    p = chat(gemma_path, home, input=f"Name a colour.\n/save {target}\n/sessions\n/save chatA\n/sessions\n")
    assert f"saved session {target}" in p.stderr and "saved session chatA" in p.stderr
    assert "no saved sessions" in p.stderr and "chatA" in p.stderr.split("saved session chatA")[1]
    assert target.exists()
    env, kv = home
    p = run_cli("chat", str(gemma_path), *CHAT, "--kv-dir", kv, input="/load chatA\n/load nothing-here\n", env=env)
    no_traceback(p)
    assert "resumed session chatA: 2 messages" in p.stderr
    last = p.stderr.splitlines()[-1]  # on a pipe an error ends the chat, in one line
    assert p.returncode != 0 and last.startswith("dualblade: error: ") and "cannot open the session" in last


def test_sessions_rm_and_kv_wipe(gemma_path, home):
    env, _ = home
    chat(gemma_path, home, input="/save a\n/save b\n")
    d = os.path.join(env["XDG_CACHE_HOME"], "dualblade", "sessions")
    assert sorted(os.listdir(d)) == ["a.dbkv", "b.dbkv"]
    p = run_cli("sessions", "verify", "a", env=env)
    assert p.returncode == 0 and "intact" in p.stdout, p.stderr
    p = run_cli("sessions", "rm", "a", env=env)
    assert p.returncode == 0 and "removed" in p.stdout, p.stderr
    fd = os.open(os.path.join(d, "b.dbkv"), os.O_RDONLY)  # the inode outlives the name: what a wipe leaves
    try:
        p = run_cli("sessions", "rm", "b", "--kv-wipe", env=env)
        assert p.returncode == 0, p.stderr
        size = os.fstat(fd).st_size
        assert size > 0 and os.pread(fd, size, 0) == bytes(size)
    finally:
        os.close(fd)
    assert os.listdir(d) == []


def test_session_bad_input_is_one_line(gemma_path, home, tmp_path):
    env, kv = home
    assert_user_error(run_cli("sessions", "rm", "ghost", env=env), "no session")
    assert_user_error(run_cli("sessions", "frobnicate", env=env), "unknown sessions action")
    assert_user_error(run_cli("sessions", "rm", env=env), "needs a session name")
    notes = tmp_path / "notes.dbkv"
    notes.write_text("not a session\n")
    assert_user_error(run_cli("sessions", "rm", str(notes), env=env), "not a dualblade session")
    assert notes.exists()
    p = run_cli("chat", str(gemma_path), *CHAT, "--kv-dir", kv, "--session", str(notes), input="hi\n", env=env)
    assert_user_error(p, "not a dualblade session")
    chat(gemma_path, home, "--session", "s", input="/save s\n")
    p = run_cli("chat", str(gemma_path), *CHAT[:4], "-c", "2048", "-n", "12", "--kv-dir", kv, "--policy", "direct",
                "-m", "6M", "--session", "s", input="hi\n", env=env)
    assert_user_error(p, "--ctx-size 1024")
