"""I/O faults on the direct path: a read or write that fails (DUALBLADE_FAULT injects EIO, ENOSPC or a
short transfer into the real engine) or data that comes back other than written (a bit flipped in
the real backing file) stops generation with KVIOError; no token computed from the damaged cache
is ever returned; reset() recovers, and the output then equals the fault-free run."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import TINY_DIRECT_CTX, run_cli, tiny_direct, tiny_direct_budget
from dualblade import ConfigError, KVIOError, Llama

N_CTX = TINY_DIRECT_CTX
TEXT = "Tell me a story about a king who lived in a castle by the sea. " * 20  # rows past the tail page
GEN = 12


def _llm(model, kv_dir, **kw) -> Llama:
    return tiny_direct(model, kv_dir=str(kv_dir), **kw)


def _complete(llm) -> str:
    return llm.create_completion(TEXT, max_tokens=GEN, temperature=0)["choices"][0]["text"]


def _fault(monkeypatch, spec: str, engine: str | None = None) -> None:
    """DUALBLADE_FAULT (and the engine) for the sessions this test opens (each engine reads them when it opens)."""
    monkeypatch.setenv("DUALBLADE_FAULT", spec)
    if engine is None:
        monkeypatch.delenv("DUALBLADE_IO_ENGINE", raising=False)
    else:
        monkeypatch.setenv("DUALBLADE_IO_ENGINE", engine)


@pytest.fixture(scope="module")
def reference(tiny_path, tmp_path_factory):
    llm = _llm(tiny_path, tmp_path_factory.mktemp("kvref"))
    try:
        assert all(l["path"] == "direct" for l in llm.kv_stats()["layers"])
        return _complete(llm)
    finally:
        llm.close()


@pytest.mark.parametrize("spec,engine,words", [
    ("read:1:eio", None, "reading layer 0 K from"),
    ("read:3:eio", "threads", "Input/output error"),
    ("read:2:short", None, "reading layer"),
    ("write:1:enospc", None, "No space left on device"),
    ("write:4:eio", "threads", "writing layer"),
    ("write:2:short", None, "writing layer"),
])
def test_fault_stops_generation_until_reset(tiny_path, tmp_path, monkeypatch, reference, spec, engine, words):
    _fault(monkeypatch, spec, engine)
    llm = _llm(tiny_path, tmp_path)
    try:
        with pytest.raises(KVIOError, match=words) as e:
            _complete(llm)
        assert "reset()" in str(e.value) and words in e.value.detail
        st = llm.kv_stats()
        assert st["io_errors"] >= 1
        # sticky: the same prompt reuses the damaged cache, so it is refused again
        with pytest.raises(KVIOError):
            _complete(llm)
        with pytest.raises(KVIOError):
            llm.save_state()
        llm.reset()  # forgets the cache and the error; the fault was one transfer, storage works again
        assert _complete(llm) == reference
    finally:
        llm.close()


def test_persistent_fault_never_produces_output(tiny_path, tmp_path, monkeypatch):
    _fault(monkeypatch, "read:1+:eio")
    llm = _llm(tiny_path, tmp_path)
    try:
        for _ in range(3):
            with pytest.raises(KVIOError):
                _complete(llm)
            llm.reset()
    finally:
        llm.close()


def test_stream_yields_only_tokens_of_the_fault_free_run(tiny_path, tmp_path, monkeypatch, reference):
    _fault(monkeypatch, "read:4:eio")
    llm = _llm(tiny_path, tmp_path)
    got = ""
    try:
        with pytest.raises(KVIOError):
            for chunk in llm.create_completion(TEXT, max_tokens=GEN, temperature=0, stream=True):
                got += chunk["choices"][0]["text"]
    finally:
        llm.close()
    assert reference.startswith(got), (got, reference)
    assert len(got) < len(reference)  # it really stopped early


def _store_fd(kv_dir) -> int:
    """The unnamed KV file this process holds open in kv_dir."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(kv_dir) + "/") and target.endswith("(deleted)"):
            return int(fd)
    raise AssertionError(f"no KV file open in {kv_dir}")


def _flip_bit(kv_dir, offset: int) -> None:
    with open(f"/proc/self/fd/{_store_fd(kv_dir)}", "r+b", buffering=0) as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x04]))
        os.fsync(f.fileno())


@pytest.mark.parametrize("verify", [True, False])
def test_flipped_bit_in_the_backing_file(tiny_path, tmp_path, verify):
    """Row 0 of the first offloaded layer's K is the store's first block: flip a bit of it between
    two completions. With checksums the next read of it fails loudly; without, it goes unnoticed."""
    llm = _llm(tiny_path, tmp_path, kv_verify=verify)
    try:
        _complete(llm)
        st = llm.kv_stats()
        assert st["verify"] is verify and (st["checksum_bytes"] > 0) is verify
        _flip_bit(tmp_path, 100)
        if verify:
            with pytest.raises(KVIOError, match="checksum mismatch") as e:
                _complete(llm)
            assert "layer 0 K" in e.value.detail
        else:
            _complete(llm)
            assert llm.kv_stats()["io_errors"] == 0
    finally:
        llm.close()


def test_malformed_fault_spec_is_refused(tiny_path, tmp_path, monkeypatch):
    _fault(monkeypatch, "read:1:boom")
    with pytest.raises(ConfigError, match="DUALBLADE_FAULT=read:1:boom is not a fault list"):
        _llm(tiny_path, tmp_path)


def test_cli_pipe_stops_with_one_line(tiny_path, tmp_path, reference):
    p = run_cli("chat", str(tiny_path), "--policy", "direct", "--mem-budget", str(tiny_direct_budget(tiny_path)),
                "-c", str(N_CTX), "--kv-dir", str(tmp_path), "--temp", "0", "-n", str(GEN), input=TEXT + "\n",
                env={"DUALBLADE_FAULT": "read:1:eio"}, timeout=120)
    assert p.returncode == 1
    assert "Traceback" not in p.stderr
    err = p.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith("dualblade: error: reading layer 0 K from"), p.stderr
    assert "--kv-dir" in err[0] and "reset()" not in err[0]
    assert p.stdout.endswith("\n") and len(p.stdout.splitlines()) == 1


def _no_device_mapper() -> str | None:
    """Why a device-mapper error target cannot be made here, or None."""
    if os.geteuid() != 0 or not shutil.which("dmsetup"):
        return "device-mapper targets need root and dmsetup"
    r = subprocess.run(["dmsetup", "targets"], capture_output=True, text=True)
    if r.returncode != 0 or not any(line.split()[:1] == ["error"] for line in r.stdout.splitlines()):
        return f"this kernel has no device-mapper error target ({(r.stderr or r.stdout).strip().splitlines()[0]})"
    return None


@pytest.mark.skipif(_no_device_mapper() is not None, reason=str(_no_device_mapper()))
def test_device_mapper_error_target(tiny_path, make_loop):
    """A real failing device: the header and the first 64 KiB of data sit on a loop device, every
    sector after them is a device-mapper `error` target, so the first write past them fails."""
    loop = make_loop(64 << 20)
    sectors, good = (64 << 20) // 512, ((1 << 20) + (64 << 10)) // 512
    name = f"dualblade-test-{os.getpid()}"
    table = f"0 {good} linear {loop} 0\n{good} {sectors - good} error\n"
    subprocess.run(["dmsetup", "create", name], input=table, text=True, check=True, capture_output=True)
    try:
        llm = tiny_direct(tiny_path, kv_device=f"/dev/mapper/{name}")
        try:
            with pytest.raises(KVIOError, match="Input/output error"):
                _complete(llm)
            with pytest.raises(KVIOError):
                _complete(llm)
        finally:
            with pytest.warns(UserWarning, match="could not discard"):
                llm.close()
    finally:
        subprocess.run(["dmsetup", "remove", name], capture_output=True)
