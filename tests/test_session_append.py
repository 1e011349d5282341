"""Sessions that grow by appending (issue 23): a save to the file a context last saved or loaded writes only what
changed since (new rows, a block or two around them per layer, rewritten rows), commits with one header write,
and never overwrites what the last commit names. Exactness against the uninterrupted run, the bytes a save writes
(its own count and the process's write counter), kill -9 at random instants, 1,000 appends, verify."""
from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from conftest import min_budget, prompt_tokens
from dualblade import Llama, sessions
from dualblade.bench.sessions import process_write_bytes
from dualblade.errors import SessionError
from test_sessions import N_CTX, PREFIX, g3_path, kv_args, worker  # noqa: F401 (g3_path: a fixture)

APPEND_WORKER = str(Path(__file__).parent / "append_worker.py")


def since_last_save(log: list) -> list:
    i = max(i for i, e in enumerate(log) if e["step"] in ("save", "load"))
    return [{k: e[k] for k in ("step", "n_tokens", "logits") if k in e} for e in log[i + 1:]]


STEPS = [["eval", PREFIX], ["save", "S"], ["eval_from", PREFIX, PREFIX + 40], ["save", "S"],
         ["eval_from", PREFIX + 40, PREFIX + 46], ["save", "S"]]
# a loaded context evaluates before it samples (its last logits are not kept): both sides go on the same way
GO_ON = [["eval_from", PREFIX + 46, PREFIX + 60], ["greedy", 4]]


def appended_resume(model, kw, session):
    steps = [[s[0], str(session)] if s[0] == "save" else s for s in STEPS]
    saved = worker(model, kw, steps + GO_ON)
    loaded = worker(model, kw, [["load", str(session)]] + GO_ON)
    assert since_last_save(saved) == since_last_save(loaded), "a resumed process differs from the uninterrupted one"
    return [e["stats"] for e in saved if e["step"] == "save"]


@pytest.mark.parametrize("policy", ["ram", "mmap", "direct", "auto"])
def test_appended_saves_resume_exact_swa_ring(g3_path, tmp_path, policy):  # noqa: F811
    """Gemma-3's sliding-window cache is a ring smaller than the conversation: its cells are rewritten, so an
    append puts blocks the last commit still names in the tail (patches), and the next one moves them home."""
    kw = {**kv_args(g3_path, policy, "f16", tmp_path), "swa_full": False, "n_batch": 64, "n_ubatch": 64}
    stats = appended_resume(g3_path, kw, tmp_path / "s.dbkv")
    assert [s["appended"] for s in stats] == [False, True, True]
    assert stats[0]["whole_why"] and stats[1]["n_patches"] > 0  # the ring's rewritten cells
    for s in stats[1:]:
        assert s["written_bytes"] < stats[0]["written_bytes"] / 2
    sessions.verify(tmp_path / "s.dbkv")


@pytest.mark.parametrize("policy", ["ram", "direct"])
def test_appended_saves_resume_exact_dense(tiny_path, tmp_path, policy):
    stats = appended_resume(tiny_path, kv_args(tiny_path, policy, "f16", tmp_path), tmp_path / "s.dbkv")
    assert [s["appended"] for s in stats] == [False, True, True]


@pytest.mark.parametrize("policy", ["ram", "direct"])
def test_a_save_after_a_reply_writes_what_changed(tiny_path, tmp_path, policy):
    """Target: the bytes a save after a reply writes are at most 2x the new rows plus 1 MiB, by the save's own count
    and by the process's write counter; the whole file's save writes all of the KV."""
    n_ctx, reply = 2048, 50
    kw = {"n_ctx": n_ctx, "flash_attn": True, "seed": 1, "verbose": False}
    if policy == "direct":
        kw.update(kv_policy="direct", kv_dir=str(tmp_path), mem_budget=min_budget(tiny_path, n_ctx, "direct"))
    else:
        kw.update(kv_policy="ram")
    path = tmp_path / "s.dbkv"
    with closing(Llama(str(tiny_path), **kw)) as llm:
        per_token = sum(l["bytes"] for l in llm.kv_stats()["layers"]) // n_ctx  # K and V rows of every layer
        toks = prompt_tokens(llm, n_ctx)
        llm.eval(toks[:1500])
        first = llm.save_session(path)
        assert not first["appended"] and first["written_bytes"] >= first["kv_bytes"] >= 1500 * per_token
        for k in range(3):
            llm.eval(toks[1500 + k * reply: 1500 + (k + 1) * reply])
            before = process_write_bytes()
            st = llm.save_session(path)
            counted = process_write_bytes() - before
            bound = 2 * reply * per_token + (1 << 20)
            assert st["appended"], st
            assert st["written_bytes"] <= bound, (st["written_bytes"], bound)
            assert counted <= bound, (counted, bound)
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.load_session(path)
        assert llm.n_tokens == 1650 and list(llm.input_ids[:1650]) == toks[:1650]


def test_kill_9_at_random_instants_leaves_the_last_complete_save(g3_path, tmp_path):  # noqa: F811
    """A conversation saving after every reply (appends, patches of the ring, and a whole save when it starts over)
    is killed with SIGKILL at random instants; each time the file loads and its state is bit-exact one the saver
    had: the last it finished, or the one it was committing."""
    kw = {**kv_args(g3_path, "direct", "f16", tmp_path), "swa_full": False, "n_batch": 64, "n_ubatch": 64}
    session = tmp_path / "s.dbkv"
    spec = json.dumps({"model": str(g3_path), "kw": kw, "session": str(session), "step": 24})
    rng = random.Random(23)
    digests: dict[int, set] = {}
    outcomes = {"last": 0, "in flight": 0}
    for round_ in range(24):
        p = subprocess.Popen([sys.executable, APPEND_WORKER, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        time.sleep(rng.uniform(0.8, 2.5))
        os.kill(p.pid, signal.SIGKILL)
        out, err = p.communicate(timeout=60)
        lines = out.splitlines()
        saved = [l.split() for l in lines if l.startswith("saved ")]
        saving = [int(l.split()[1]) for l in lines if l.startswith("saving ")]
        for s in saved:
            digests.setdefault(int(s[1]), set()).add(s[2])
        if not session.exists():
            assert not saved, err[-2000:]
            continue
        sessions.verify(session)
        with closing(Llama(str(g3_path), verbose=False, **kw)) as llm:
            llm.load_session(session)
            from append_worker import state_digest

            got = llm.n_tokens
            if saved and got == int(saved[-1][1]) and state_digest(llm) == saved[-1][2]:
                outcomes["last"] += 1
            else:
                # killed after the commit and before it said so: the save in flight, equal to a later run's
                assert saving and got == saving[-1], (round_, got, saved[-1:] , saving[-1:])
                outcomes["in flight"] += 1
                digests.setdefault(got, set()).add("?" + state_digest(llm))
    assert outcomes["last"] >= 10, outcomes
    # every state a save left, however it was reached, is the same bytes at the same length
    for n, d in digests.items():
        assert len({x.lstrip("?") for x in d}) == 1, (n, d)


def test_1000_appends_keep_the_file_small_and_exact(tiny_path, tmp_path):
    """A session grown by 1,000 saves of one token each: every save appends, the file holds at most a few
    blocks outside home and about the bytes of a fresh save, and it loads exact and verifies."""
    path, fresh = tmp_path / "grown.dbkv", tmp_path / "fresh.dbkv"
    kw = {"n_ctx": 1536, "flash_attn": True, "seed": 1, "verbose": False, "kv_policy": "direct",
          "kv_dir": str(tmp_path), "mem_budget": min_budget(tiny_path, 1536, "direct")}
    with closing(Llama(str(tiny_path), **kw)) as llm:
        toks = prompt_tokens(llm, 1536)
        llm.eval(toks[:200])
        llm.save_session(path)
        for i in range(1000):
            llm.eval(toks[200 + i: 201 + i])
            st = llm.save_session(path)
            assert st["appended"], (i, st)
        assert st["n_patches"] <= 2 * len(llm.kv_stats()["layers"])
        llm.save_session(fresh, compact=True)
    grown_disk, fresh_disk = path.stat().st_blocks * 512, fresh.stat().st_blocks * 512
    assert grown_disk <= fresh_disk + (1 << 20), (grown_disk, fresh_disk)
    assert path.stat().st_size <= fresh.stat().st_size + (8 << 20)
    sessions.verify(path)
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.load_session(path)
        assert llm.n_tokens == 1200 and list(llm.input_ids[:1200]) == toks[:1200]


def test_verify_checks_the_blocks_the_commit_names(g3_path, tmp_path):  # noqa: F811
    """A damaged patch block is found; the stale home copy under a patch is not the commit's and is not checked."""
    kw = {**kv_args(g3_path, "ram", "f16", tmp_path), "swa_full": False, "n_batch": 64, "n_ubatch": 64}
    path = tmp_path / "s.dbkv"
    with closing(Llama(str(g3_path), verbose=False, **kw)) as llm:
        toks = prompt_tokens(llm, 400)
        llm.eval(toks[:300])
        llm.save_session(path)
        llm.eval(toks[300:340])
        st = llm.save_session(path)
        assert st["appended"] and st["n_patches"] > 0
    from dualblade import _native

    f = _native.SessionFile(str(path))
    f.close()
    b = bytearray(path.read_bytes())
    tail_off = struct.unpack_from("<Q", b, 856 + 4096)[0]  # the commit in slot 1 (generation 2)
    bad = tmp_path / "bad.dbkv"
    b[tail_off + 100] ^= 0xFF  # the first patch block
    bad.write_bytes(bytes(b))
    with pytest.raises(SessionError, match="failed its checksum"):
        sessions.verify(bad)


def test_bench_sessions(tmp_path):
    """bench --sessions: every reply's save appends and stays under its target; the grown file loads."""
    from conftest import no_traceback, run_cli

    out = tmp_path / "s.json"
    p = run_cli("bench", "--sessions", "6", "-c", "2048", "-p", "600", "-n", "40", "--kv-dir", str(tmp_path),
                "--json", str(out), timeout=600)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert res["mode"] == "sessions" and res["appended_all"] and len(res["saves"]) == 6
    assert 0 < res["worst_vs_bound"] <= 1, res["worst_vs_bound"]
    assert res["first_save"]["written_bytes"] >= res["first_save"]["kv_bytes"] > 10 * res["max_written_bytes"] / 2
    assert res["load_s"]["grown"] > 0 and res["load_s"]["fresh"] > 0
    assert "largest save / target" in p.stdout and "grown / fresh" in p.stdout


@pytest.mark.parametrize("args, word", [
    (["--sessions", "0"], "--sessions"),
    (["--sessions", "2", "--gpu"], "--gpu"),
    (["--sessions", "999", "-c", "512", "-p", "100", "-n", "8"], "--ctx-size"),
])
def test_bench_bad_sessions_options(args, word):
    from conftest import assert_user_error, run_cli

    assert_user_error(run_cli("bench", *args, timeout=120), word)


def test_chat_session_flash_attention(tmp_path, monkeypatch):
    """chat --session: a new session gets flash attention (V kept by cell, so saves append a reply's rows), a saved
    one keeps what it was saved with."""
    from conftest import run_cli

    from dualblade.sessions import saved_flash_attn

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    new = tmp_path / "new.dbkv"
    p = run_cli("chat", "--session", str(new), "-n", "4", "--verbose", input="Hello\n", timeout=300,
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert saved_flash_attn(new) is True and "flash attention: on (the new session)" in p.stderr
    old = tmp_path / "old.dbkv"
    p = run_cli("chat", "--session", str(old), "--no-flash-attn", "-n", "4", input="Hello\n", timeout=300,
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert saved_flash_attn(old) is False
    p = run_cli("chat", "--session", str(old), "-n", "4", "--verbose", input="Again\n", timeout=300,
                env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert p.returncode == 0, p.stderr
    assert "as the session was saved" in p.stderr and "resumed session" in p.stderr


def to_format_1(src: Path, dst: Path) -> None:
    """The session at src (format 2, written whole: no patches) in format 1's layout, as dualblade before issue 23
    wrote it: one header, the extents back to back from 1 MiB, LAYERS (72-byte entries), SUMS and the rest as
    sections, each with its CRC-32C."""
    from conftest import crc32c

    b = src.read_bytes()
    n_sections = struct.unpack_from("<I", b, 28)[0]
    secs = [struct.unpack_from("<IIQQ", b, 64 + 24 * i) for i in range(n_sections)]
    by_kind = {k: (off, n) for k, _, off, n in secs}
    assert 3 not in by_kind or by_kind[3][1] == 0, "a whole save has no patches"
    sums_off = by_kind[2][0]
    off, nbytes = by_kind[1]
    kv, sums, layers = bytearray(), bytearray(), bytearray()
    for i in range(nbytes // 88):
        e = bytearray(b[off + 88 * i: off + 88 * i + 72])
        saved, file_off, sums_at = struct.unpack_from("<QQQ", e, 48)
        struct.pack_into("<QQ", e, 56, (1 << 20) + len(kv), len(sums) // 4)
        kv += b[file_off: file_off + saved]
        sums += b[sums_off + 4 * sums_at: sums_off + 4 * (sums_at + saved // 4096)]
        layers += e
    body = [(1, bytes(layers)), (2, bytes(sums))] + [(k, b[o: o + n]) for k, _, o, n in secs if k >= 16]
    out = bytearray(1 << 20) + kv
    table = []
    for k, data in body:
        out += bytes(-len(out) % 8)
        table.append((k, crc32c(data), len(out), len(data)))
        out += data
    h = bytearray(4096)
    h[:16] = b[:16]
    struct.pack_into("<IIII", h, 16, 1, 4096, 0, len(table))
    struct.pack_into("<QQQQ", h, 32, len(out), 0, 1 << 20, len(kv))
    for i, t in enumerate(table):
        struct.pack_into("<IIQQ", h, 64 + 24 * i, *t)
    struct.pack_into("<I", h, 4092, crc32c(bytes(h[:4092])))
    out[:4096] = h
    dst.write_bytes(bytes(out))


@pytest.mark.parametrize("policy", ["ram", "direct"])
def test_format_1_sessions_still_load(tiny_path, tmp_path, policy):
    """A session in the format dualblade wrote before sessions could grow loads, verifies and resumes exactly as
    the same session in format 2; saving to it writes it anew (format 2), and then saves append."""
    from conftest import last_logits

    kw = {**kv_args(tiny_path, policy, "f16", tmp_path), "verbose": False}
    new, old = tmp_path / "new.dbkv", tmp_path / "old.dbkv"
    with closing(Llama(str(tiny_path), **kw)) as llm:
        toks = prompt_tokens(llm, 120)
        llm.eval(toks[:100])
        llm.save_session(new)
    to_format_1(new, old)
    assert struct.unpack_from("<I", old.read_bytes(), 16)[0] == 1
    sessions.verify(old)
    logits = []
    for path in (new, old):
        with closing(Llama(str(tiny_path), **kw)) as llm:
            llm.load_session(path)
            llm.eval(toks[100:110])
            logits.append(last_logits(llm).tobytes())
            if path == old:
                st = llm.save_session(old)
                assert not st["appended"] and struct.unpack_from("<I", old.read_bytes(), 16)[0] == 2
                llm.eval(toks[110:115])
                assert llm.save_session(old)["appended"]
    assert logits[0] == logits[1]


def test_server_conversations_append_under_their_new_name(tiny_path, tmp_path):
    """serve's store names a conversation by its tokens: the reply's save takes over the file of the conversation
    it continues (renamed, the same inode), so it appends; the superseded name is gone, and the result resumes."""
    from dualblade.conversations import ConversationStore

    kw = {"n_ctx": N_CTX, "flash_attn": True, "seed": 1, "verbose": False, "kv_policy": "ram"}
    store = ConversationStore(tmp_path / "conv", 1 << 30)
    with closing(Llama(str(tiny_path), **kw)) as llm:
        toks = prompt_tokens(llm, 200)
        llm.eval(toks[:120])
        k1 = store.save(llm, 100)
        ino = store.path(k1).stat().st_ino
        llm.eval(toks[120:140])
        k2 = store.save(llm, 100)
    assert k2 != k1 and not store.path(k1).exists()
    p2 = store.path(k2)
    assert p2.stat().st_ino == ino
    b = p2.read_bytes()
    assert struct.unpack_from("<I", b, 4096 + 16)[0] == 2 and struct.unpack_from("<Q", b, 4096 + 832)[0] == 2  # gen 2
    sessions.verify(p2)
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.load_session(p2)
        assert llm.n_tokens == 140 and list(llm.input_ids[:140]) == toks[:140]
