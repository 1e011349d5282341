"""Privacy of the KV store: the file is private and unnamed, a redirecting symlink is refused, and
nothing of a conversation stays on a raw device (real loop devices) after a normal close, after
kv_wipe, or, once the device is next opened, after a crash."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from conftest import TINY_DIRECT_CTX, device_header, tiny_direct, tiny_direct_budget
from dualblade import ConfigError

MiB = 1 << 20
TEXT = b"The secret is the password swordfish. " * 40
DATA_OFFSET = 1 * MiB  # where a device's KV data starts (after the ownership header)


def _kv_fds(kv_dir) -> list[int]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(kv_dir) + "/"):
                out.append(int(fd))
        except OSError:
            pass
    return out


@pytest.mark.parametrize("tmpfile", [True, False], ids=["O_TMPFILE", "named-fallback"])
def test_kv_file_is_private_and_has_no_name(tiny_path, tmp_path, monkeypatch, tmpfile):
    if not tmpfile:
        monkeypatch.setenv("DUALBLADE_NO_TMPFILE", "1")  # the way taken where O_TMPFILE is missing
    llm = tiny_direct(tiny_path, kv_dir=str(tmp_path))
    try:
        llm.eval(llm.tokenize(TEXT))
        (fd,) = _kv_fds(tmp_path)
        st = os.fstat(fd)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_nlink == 0  # no name: nothing to find, nothing left when the process ends
        assert os.listdir(tmp_path) == []
    finally:
        llm.close()
    assert os.listdir(tmp_path) == [] and _kv_fds(tmp_path) == []


def test_kv_wipe_zeroes_the_file_before_it_goes(tiny_path, tmp_path):
    llm = tiny_direct(tiny_path, kv_dir=str(tmp_path), kv_wipe=True)
    try:
        llm.eval(llm.tokenize(TEXT))
        llm._kv.flush()
        (fd,) = _kv_fds(tmp_path)
        spy = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)  # outlives the KV store's descriptor
    finally:
        llm.close()
    try:
        data = os.pread(spy, 4 * MiB, 0)
        assert len(data) > 0 and data.count(0) == len(data)
    finally:
        os.close(spy)


@pytest.mark.skipif(os.geteuid() != 0, reason="making a symlink owned by another user needs root")
def test_kv_dir_through_another_users_symlink_is_refused(tiny_path, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "planted"
    link.symlink_to(real)
    os.lchown(link, 65534, 65534)
    with pytest.raises(ConfigError, match=r"symlink owned by another user \(uid 65534\)"):
        tiny_direct(tiny_path, kv_dir=str(link))
    # the user's own symlink is the user's choice
    os.lchown(link, os.geteuid(), os.getegid())
    tiny_direct(tiny_path, kv_dir=str(link)).close()


# --- raw devices ---------------------------------------------------------------------------------

def _read(dev: str, off: int, n: int) -> bytes:
    with open(dev, "rb", buffering=0) as f:
        f.seek(off)
        return f.read(n)


def _data_written(dev: str) -> int:
    return sum(1 for b in _read(dev, DATA_OFFSET, 4 * MiB) if b)


@pytest.mark.parametrize("wipe", [False, True], ids=["discard", "zero"])
def test_device_holds_nothing_after_close(tiny_path, make_loop, wipe):
    dev = make_loop(64 * MiB)
    llm = tiny_direct(tiny_path, kv_device=dev, kv_wipe=wipe)
    try:
        llm.eval(llm.tokenize(TEXT))
        llm._kv.flush()
        assert _data_written(dev) > 0  # the conversation is on the device while it runs
    finally:
        llm.close()
    assert _data_written(dev) == 0
    device_header(dev)  # still ours (asserts the magic, CRC-32C, bounds): the next run takes it without --force
    tiny_direct(tiny_path, kv_device=dev).close()


def test_device_left_by_a_crash_is_cleared_when_next_opened(tiny_path, make_loop):
    dev = make_loop(64 * MiB)
    crash = ("import os, sys\nfrom dualblade import Llama\n"
             f"llm = Llama({str(tiny_path)!r}, n_ctx={TINY_DIRECT_CTX}, mem_budget={tiny_direct_budget(tiny_path)}, "
             f"kv_policy='direct', kv_device={dev!r}, verbose=False)\n"
             f"llm.eval(llm.tokenize({TEXT!r}))\nllm._kv.flush()\nos._exit(0)  # no close: as a crash\n")
    r = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _data_written(dev) > 0
    device_header(dev)
    llm = tiny_direct(tiny_path, kv_device=dev)
    try:
        assert _data_written(dev) == 0  # discarded at open, before anything is written
    finally:
        llm.close()
