"""Persistent sessions (issue 13): a context saved in one process resumes in another, exactly.

Each exactness test saves in one subprocess, which then goes on (the uninterrupted run), and loads in a
fresh subprocess that does the same steps: the logits' bytes after every step must be equal. The error
tests run in this process on small real session files: each failure is one clean SessionError (or the
KVIOError of a damaged block at its first read), and the context is left empty."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from conftest import crc32c, last_logits, min_budget, prompt_tokens
from dualblade import Llama
from dualblade.errors import KVIOError, SessionError, StoreError

WORKER = str(Path(__file__).parent / "session_worker.py")
N_CTX = 512
PREFIX, SUFFIX_END, N_GEN = 300, 340, 8  # the prefix is longer than gemma3-tiny's 128-token window
KV_OFFSET = 1 << 20


@pytest.fixture(scope="module")
def g3_path(tmp_path_factory):
    from dualblade.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("g3") / "gemma3-tiny.gguf", "gemma3-tiny", seed=1)


def kv_args(model, policy: str, kv_type: str, tmp_path) -> dict:
    kw = {"n_ctx": N_CTX, "flash_attn": True, "seed": 1}
    if kv_type == "q8_0":
        kw.update(type_k=8, type_v=8)
    if policy != "ram":
        kw.update(kv_policy=policy, kv_dir=str(tmp_path),
                  mem_budget=max(min_budget(model, N_CTX, "direct", kv_type, kv_type), 1 << 16))
    else:
        kw.update(kv_policy="ram")
    return kw


def worker(model, kw: dict, steps: list, env: dict | None = None) -> list:
    p = subprocess.run([sys.executable, WORKER, json.dumps({"model": str(model), "kw": kw, "steps": steps})],
                       capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    return out["log"]


def after(log: list, step: str) -> list:
    """The records after the step named `step` (the steps both processes did)."""
    i = next(i for i, e in enumerate(log) if e["step"] == step)
    return [{k: e[k] for k in ("step", "n_tokens", "logits", "text") if k in e} for e in log[i + 1:]]


CONTINUE = [["eval_from", PREFIX, SUFFIX_END], ["greedy", N_GEN]]


def resume_matches(model, save_kw, load_kw, session, steps=CONTINUE, prefix=(("eval", PREFIX),), env=None):
    saved = worker(model, save_kw, [list(s) for s in prefix] + [["save", str(session)]] + steps, env=env)
    loaded = worker(model, load_kw, [["load", str(session)]] + steps, env=env)
    a, b = after(saved, "save"), after(loaded, "load")
    assert len(a) == len(b) >= 1
    assert a == b, "a resumed process differs from the uninterrupted one"
    return saved, loaded


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("policy", ["ram", "mmap", "direct", "auto"])
def test_resume_exact_gemma3_iswa(g3_path, tmp_path, policy, kv_type):
    kw = kv_args(g3_path, policy, kv_type, tmp_path)
    saved, loaded = resume_matches(g3_path, kw, kw, tmp_path / "s.dbkv")
    save = next(e for e in saved if e["step"] == "save")
    assert save["n_tokens"] == PREFIX and save["stats"]["kv_bytes"] > 0
    if policy != "ram":  # offloaded layers reach the file in the kernel, not through this process
        st = save["stats"]
        assert st["cloned_bytes"] + st["copied_bytes"] + st["direct_bytes"] > 0
        assert st["memory_bytes"] < st["kv_bytes"]
    assert next(e for e in loaded if e["step"] == "load")["n_tokens"] == PREFIX


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
@pytest.mark.parametrize("policy", ["ram", "direct"])
def test_resume_exact_dense(tiny_path, tmp_path, policy, kv_type):
    kw = kv_args(tiny_path, policy, kv_type, tmp_path)
    resume_matches(tiny_path, kw, kw, tmp_path / "s.dbkv")


@pytest.mark.parametrize("policy", ["ram", "direct"])
def test_resume_exact_swa_ring(g3_path, tmp_path, policy):
    """A sliding-window cache smaller than the prefix (swa_full off, small ubatch): its cells wrap around, so
    they are not 0..n-1 in position order; restored at their saved indices with the saved head, the resumed run
    is exact."""
    kw = {**kv_args(g3_path, policy, "f16", tmp_path), "swa_full": False, "n_batch": 64, "n_ubatch": 64}
    saved, _ = resume_matches(g3_path, kw, kw, tmp_path / "s.dbkv")
    full = worker(g3_path, kv_args(g3_path, "ram", "f16", tmp_path), [["eval", PREFIX], ["save", str(tmp_path / "f")]])
    ring_kv = next(e for e in saved if e["step"] == "save")["stats"]["kv_bytes"]
    assert ring_kv < full[-1]["stats"]["kv_bytes"]  # the window's cache is smaller than the prefix: a ring


def test_resume_exact_transposed_v(tiny_path, tmp_path):
    """Flash attention off (all in RAM): V is stored transposed, and its whole tensor is saved."""
    kw = {"n_ctx": N_CTX, "flash_attn": False, "seed": 1, "kv_policy": "ram"}
    resume_matches(tiny_path, kw, kw, tmp_path / "s.dbkv")


def test_resume_across_policies(g3_path, tmp_path):
    """The file does not depend on the placement: saved all in RAM, loaded with layers on the direct path."""
    resume_matches(g3_path, kv_args(g3_path, "ram", "f16", tmp_path),
                   kv_args(g3_path, "direct", "f16", tmp_path), tmp_path / "s.dbkv")


@pytest.mark.parametrize("how", ["copy_file_range", "direct"])
def test_copy_strategies(g3_path, tmp_path, how):
    """Each way of moving the extents (forced with DUALBLADE_SESSION_COPY) gives the same exact resume; the page
    cache path's blocks get their checksums from its mapping."""
    kw = kv_args(g3_path, "mmap", "f16", tmp_path)
    saved, loaded = resume_matches(g3_path, kw, kw, tmp_path / "s.dbkv", env={"DUALBLADE_SESSION_COPY": how})
    save = next(e for e in saved if e["step"] == "save")["stats"]
    load = next(e for e in loaded if e["step"] == "load")["stats"]
    key = "copied_bytes" if how == "copy_file_range" else "direct_bytes"
    assert save["strategy"] == load["strategy"] == how
    assert save[key] == load[key] == save["kv_bytes"] - save["memory_bytes"] > 0
    assert save["checked_bytes"] > 0 and load["checked_bytes"] > 0


def test_resume_real_gemma_completion_prefix_reuse(gemma_path, tmp_path):
    """create_completion after a resume reuses the saved prefix and continues exactly (bundled Gemma-3)."""
    kw = kv_args(gemma_path, "direct", "f16", tmp_path)
    steps = [["complete", 3, " And then the miller said", 12]]
    saved, loaded = resume_matches(gemma_path, kw, kw, tmp_path / "g.dbkv", steps=steps,
                                   prefix=(("complete", 3, "", 8),))
    a, b = after(saved, "save")[0], after(loaded, "load")[0]
    assert a["text"] == b["text"] and a["text"].strip()


def test_two_loaders_at_once_leave_the_file_unchanged(g3_path, tmp_path):
    kw = kv_args(g3_path, "direct", "f16", tmp_path)
    session = tmp_path / "shared.dbkv"
    saved = worker(g3_path, kw, [["eval", PREFIX], ["save", str(session)]] + CONTINUE)
    before = session.read_bytes()
    st0 = os.stat(session)
    assert st0.st_mode & 0o777 == 0o600
    spec = json.dumps({"model": str(g3_path), "kw": kw, "steps": [["load", str(session)]] + CONTINUE})
    procs = [subprocess.Popen([sys.executable, WORKER, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        log = json.loads(out.strip().splitlines()[-1])["log"]
        assert after(log, "load") == after(saved, "save")
    st1 = os.stat(session)
    assert session.read_bytes() == before
    assert (st1.st_mtime_ns, st1.st_ctime_ns, st1.st_size, st1.st_ino) == \
        (st0.st_mtime_ns, st0.st_ctime_ns, st0.st_size, st0.st_ino)


# --- errors: in this process, on small real files ---

@pytest.fixture(scope="module")
def tiny_session(tiny_path, tmp_path_factory):
    """A session of the tiny model (all in RAM, 64 tokens) and its bytes."""
    path = tmp_path_factory.mktemp("ses") / "tiny.dbkv"
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.eval(prompt_tokens(llm, 64))
        llm.save_session(path)
    return path


def load_error(model, path, **kw) -> str:
    kw = {"n_ctx": N_CTX, "kv_policy": "ram", "verbose": False, **kw}
    with closing(Llama(str(model), **kw)) as llm:
        with pytest.raises(SessionError) as e:
            llm.load_session(path)
        assert llm.n_tokens == 0
        msg = str(e.value)
        assert "\n" not in msg
        # the context still works after the failed load
        llm.eval(prompt_tokens(llm, 8))
        assert llm.n_tokens == 8
    return msg


def damaged(src: Path, dst: Path, at: int | None = None, size: int | None = None) -> Path:
    b = bytearray(src.read_bytes())
    if at is not None:
        b[at] ^= 0xFF
    if size is not None:
        b = b[:size]
    dst.write_bytes(bytes(b))
    return dst


def test_session_error_is_a_store_error():
    assert issubclass(SessionError, StoreError)


def test_not_a_session(tiny_path, tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("not a session\n" * 1000)
    assert "is not a dualblade session" in load_error(tiny_path, p)
    assert "cannot open the session" in load_error(tiny_path, tmp_path / "missing.dbkv")


def test_truncated(tiny_path, tiny_session, tmp_path):
    size = tiny_session.stat().st_size
    for cut in (100, 5000, KV_OFFSET + 4096, size - 1):
        msg = load_error(tiny_path, damaged(tiny_session, tmp_path / f"t{cut}.dbkv", size=cut))
        assert "truncated" in msg, (cut, msg)


def test_damaged_header_and_sections(tiny_path, tiny_session, tmp_path):
    msg = load_error(tiny_path, damaged(tiny_session, tmp_path / "h.dbkv", at=70))
    assert "is damaged (header checksum)" in msg
    size = tiny_session.stat().st_size
    msg = load_error(tiny_path, damaged(tiny_session, tmp_path / "s.dbkv", at=size - 3))
    assert "is damaged" in msg and "checksum" in msg


def test_damaged_kv_block_pinned_found_at_load(tiny_path, tiny_session, tmp_path):
    msg = load_error(tiny_path, damaged(tiny_session, tmp_path / "k.dbkv", at=KV_OFFSET + 100))
    assert "KV block" in msg and "failed its checksum" in msg


def test_verify_finds_a_damaged_kv_block_before_anything_changes(tiny_path, tiny_session, tmp_path):
    from dualblade import sessions

    assert sessions.verify(tiny_session)["checked_bytes"] > 0
    bad = damaged(tiny_session, tmp_path / "v.dbkv", at=KV_OFFSET + 7)
    with pytest.raises(SessionError, match="KV block .* failed its checksum"):
        sessions.verify(bad)
    kw = {"n_ctx": N_CTX, "kv_policy": "ram", "verbose": False}
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.eval(prompt_tokens(llm, 8))
        with pytest.raises(SessionError, match="failed its checksum"):
            llm.load_session(bad, verify=True)
        llm.load_session(tiny_session, verify=True)
        assert llm.n_tokens == 64


def test_damaged_kv_block_direct_found_at_first_read(tiny_path, tmp_path):
    kw = kv_args(tiny_path, "direct", "f16", tmp_path)
    good = tmp_path / "d.dbkv"
    with closing(Llama(str(tiny_path), verbose=False, **kw)) as llm:
        toks = prompt_tokens(llm, 80)
        llm.eval(toks[:64])
        llm.save_session(good)
        assert all(l["path"] == "direct" for l in llm.kv_stats()["layers"])
    bad = damaged(good, tmp_path / "bad.dbkv", at=KV_OFFSET + 100)
    with closing(Llama(str(tiny_path), verbose=False, **kw)) as llm:
        llm.load_session(bad)  # the KV is checked block by block when the direct path reads it
        assert llm.n_tokens == 64
        with pytest.raises(KVIOError, match="checksum"):
            llm.eval(toks[64:80])
        with pytest.raises(KVIOError):
            llm.eval(toks[64:65])  # nothing is computed from it until reset()
        llm.reset()
        llm.eval(toks[:8])
        assert llm.n_tokens == 8


def test_other_model(g3_path, tiny_session):
    msg = load_error(g3_path, tiny_session)
    assert "another model" in msg and "tiny.gguf" in msg


def test_other_n_ctx_and_kv_type(tiny_path, tiny_session):
    msg = load_error(tiny_path, tiny_session, n_ctx=1024)
    assert "n_ctx=512" in msg and "n_ctx=1024" in msg
    msg = load_error(tiny_path, tiny_session, type_k=8)
    assert "saved with type_k=f16, this Llama has type_k=q8_0" in msg, msg


def test_logits_all_scores_come_back(tiny_path, tmp_path):
    path = tmp_path / "la.dbkv"
    kw = {"n_ctx": N_CTX, "kv_policy": "ram", "verbose": False, "logits_all": True}
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.eval(prompt_tokens(llm, 32))
        want = llm.scores[:32].tobytes()
        llm.save_session(path)
    with closing(Llama(str(tiny_path), **kw)) as llm:
        llm.load_session(path)
        assert llm.n_tokens == 32 and llm.scores[:32].tobytes() == want
    assert "logits_all=True" in load_error(tiny_path, path)


def test_other_rope_base(tiny_path, tiny_session):
    msg = load_error(tiny_path, tiny_session, rope_freq_base=5000.0)
    assert "rope_freq_base" in msg


def test_newer_format(tiny_path, tiny_session, tmp_path):
    b = bytearray(tiny_session.read_bytes())
    struct.pack_into("<I", b, 16, 3)  # the format version
    struct.pack_into("<I", b, 4092, crc32c(bytes(b[:4092])))
    p = tmp_path / "newer.dbkv"
    p.write_bytes(bytes(b))
    assert "newer dualblade" in load_error(tiny_path, p)


def test_symlink_at_path(tiny_path, tiny_session, tmp_path):
    link = tmp_path / "link.dbkv"
    link.symlink_to(tiny_session)
    assert "is a symlink" in load_error(tiny_path, link)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    link2 = tmp_path / "link2.dbkv"
    link2.symlink_to(target)
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.eval(prompt_tokens(llm, 8))
        with pytest.raises(SessionError, match="is a symlink"):
            llm.save_session(link2)
    assert link2.is_symlink() and target.read_text() == "keep me"


def test_refuses_to_overwrite_a_file_that_is_not_a_session(tiny_path, tmp_path):
    p = tmp_path / "thesis.txt"
    p.write_text("years of work\n")
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.eval(prompt_tokens(llm, 8))
        with pytest.raises(SessionError, match="not a dualblade session; refusing to overwrite it"):
            llm.save_session(p)
    assert p.read_text() == "years of work\n"
    assert [x.name for x in tmp_path.iterdir()] == ["thesis.txt"]  # no temporary left behind


@pytest.mark.parametrize("compact", [False, True])
def test_full_disk_keeps_the_old_session(tiny_path, tmp_path, monkeypatch, compact):
    """A save that runs out of space fails with one line and leaves the last save: byte for byte when it wrote a new
    file, and as the commit that loads (and verifies) when it appended (its new rows went where nothing points)."""
    path = tmp_path / "s.dbkv"
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        toks = prompt_tokens(llm, 48)
        llm.eval(toks[:32])
        llm.save_session(path)
        old = path.read_bytes()
        llm.eval(toks[32:])
        monkeypatch.setenv("DUALBLADE_FAULT", "write:1+:enospc")
        with pytest.raises(SessionError, match="no space"):
            llm.save_session(path, compact=compact)
        monkeypatch.delenv("DUALBLADE_FAULT")
    if compact:
        assert path.read_bytes() == old
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.dbkv"]
    from dualblade import sessions

    sessions.verify(path)
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.load_session(path)
        assert llm.n_tokens == 32 and list(llm.input_ids[:32]) == toks[:32]


def test_save_replaces_a_session_atomically_and_0600(tiny_path, tmp_path):
    """A save to a file this context did not write or load is a new file renamed over it; one to its own last save
    appends to it in place; compact=True writes it anew."""
    path = tmp_path / "s.dbkv"
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        toks = prompt_tokens(llm, 64)
        llm.eval(toks[:32])
        assert llm.save_session(path)["appended"] is False
        ino = path.stat().st_ino
        llm.eval(toks[32:48])
        st = llm.save_session(path)
        assert st["appended"] is True and path.stat().st_ino == ino
        st = llm.save_session(path, compact=True)
        assert st["appended"] is False and st["whole_why"] == "asked to write it whole"
        assert path.stat().st_ino != ino  # a new file renamed over the old one
        assert path.stat().st_mode & 0o777 == 0o600
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.load_session(path)
        assert llm.n_tokens == 48 and list(llm.input_ids[:48]) == toks[:48]
        llm.eval(toks[48:])
        assert llm.save_session(path)["appended"] is True  # loaded from it: appends
    with closing(Llama(str(tiny_path), n_ctx=N_CTX, kv_policy="ram", verbose=False)) as llm:
        llm.eval(toks[:8])
        st = llm.save_session(path)  # another context's file: written whole
        assert st["appended"] is False and "has not saved to or loaded from it" in st["whole_why"]


@pytest.mark.parametrize("phase", ["kv", "linked"])
def test_sigkill_during_save_leaves_the_old_session(tiny_path, tmp_path, phase):
    """The saver stops itself at a phase of the save (DUALBLADE_TEST_PAUSE) and is killed there: the old
    session is intact and loads; the next save clears the temporary a kill left behind."""
    path = tmp_path / "s.dbkv"
    kw = {"n_ctx": N_CTX, "kv_policy": "ram", "seed": 1}
    worker(tiny_path, kw, [["eval", 32], ["save", str(path)]])
    old = path.read_bytes()
    spec = json.dumps({"model": str(tiny_path), "kw": kw, "steps": [["eval", 48], ["save", str(path)]]})
    p = subprocess.Popen([sys.executable, WORKER, spec], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "DUALBLADE_TEST_PAUSE": f"save:{phase}"})
    try:
        _, status = os.waitpid(p.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), "the saver did not reach the pause"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
        p.stdout.close()
        p.stderr.close()
    assert path.read_bytes() == old
    log = worker(tiny_path, kw, [["load", str(path)]])
    assert log[0]["n_tokens"] == 32
    worker(tiny_path, kw, [["eval", 40], ["save", str(path)]])
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.dbkv"]


@pytest.mark.skipif(os.geteuid() != 0, reason="loop devices need root")
def test_resume_exact_raw_device_stores(g3_path, tmp_path, make_loop):
    """Saved from layers on one raw device, resumed with layers on another (O_DIRECT copies both ways)."""
    kw = kv_args(g3_path, "direct", "f16", tmp_path)
    del kw["kv_dir"]
    saved, loaded = resume_matches(g3_path, {**kw, "kv_device": make_loop(64 << 20)},
                                   {**kw, "kv_device": make_loop(64 << 20)}, tmp_path / "dev.dbkv")
    st = next(e for e in saved if e["step"] == "save")["stats"]
    assert st["memory_bytes"] < st["kv_bytes"] and st["direct_bytes"] + st["copied_bytes"] > 0


def test_mutated_session_files_fail_cleanly(tiny_path, tiny_session, tmp_path):
    """Random damage to the header, the sections or the length: the file is refused with a SessionError (a
    flip inside the KV extents is left to the block checksums), and nothing crashes."""
    import random

    from dualblade import _native

    rng = random.Random(13)
    good = tiny_session.read_bytes()
    kv_end = struct.unpack_from("<Q", good, 856)[0]  # the tail: every byte there is named by the header
    p = tmp_path / "m.dbkv"
    refused = 0
    for i in range(300):
        b = bytearray(good)
        if i % 3 == 0:
            b = b[: rng.randrange(len(b))]
        else:
            for _ in range(rng.randint(1, 4)):
                at = rng.choice([rng.randrange(4096), rng.randrange(kv_end, len(b))])
                b[at] = rng.randrange(256)
        p.write_bytes(bytes(b))
        try:
            _native.SessionFile(str(p)).close()
        except _native.SessionFileError as e:
            assert str(e) and "\n" not in str(e)
            refused += 1
    assert refused >= 290  # a changed byte that changes nothing (same value) may still open
