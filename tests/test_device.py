"""Raw KV devices (real loop devices): what is somebody else's is never overwritten without force."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from dualblade import ConfigError, Llama
from conftest import init_ext4, init_foreign_data, init_partition_table, min_budget, tiny_direct

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"),
                                reason="loop devices need root and losetup")


def _head(dev: str, n: int = 68 * 1024) -> bytes:
    with open(dev, "rb") as f:
        return f.read(n)


def _open(tiny_path, dev, **kw):
    return tiny_direct(tiny_path, kv_device=dev, **kw)  # every layer on the device


def test_blank_device_is_taken_and_marked(tiny_path, make_loop):
    dev = make_loop(64 << 20)
    llm = _open(tiny_path, dev)
    try:
        st = llm.kv_stats()
        assert st["store"]["kind"] == "device" and st["store"]["path"] == dev
        llm.eval(llm.tokenize(b"hello there " * 20))
    finally:
        llm.close()
    assert _head(dev, 16) == b"DUALBLADE-KV-v1\0"
    # ours, same layout: reused without force
    _open(tiny_path, dev).close()


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_file_system_is_refused_then_forced(tiny_path, make_loop):
    dev = make_loop(64 << 20, init=init_ext4)
    before = _head(dev)
    with pytest.raises(ConfigError, match=r"ext2/3/4 file system; refusing to overwrite"):
        _open(tiny_path, dev)
    assert _head(dev) == before  # not a byte changed
    llm = _open(tiny_path, dev, kv_force=True)
    llm.close()
    assert _head(dev, 16) == b"DUALBLADE-KV-v1\0"


def test_foreign_data_and_partition_table_are_refused(tiny_path, make_loop):
    for init, what in ((init_foreign_data, "data of another program"), (init_partition_table, "partition table")):
        dev = make_loop(64 << 20, init=init)
        before = _head(dev)
        with pytest.raises(ConfigError, match=what):
            _open(tiny_path, dev)
        assert _head(dev) == before


def test_other_layout_of_ours_is_refused(tiny_path, make_loop):
    dev = make_loop(64 << 20)
    _open(tiny_path, dev).close()
    with pytest.raises(ConfigError, match="another model or context size"):
        Llama(str(tiny_path), n_ctx=2048, verbose=False, kv_policy="direct",
              mem_budget=min_budget(tiny_path, 2048), kv_device=dev)


def test_too_small_device_names_the_size(tiny_path, make_loop):
    dev = make_loop(2 << 20)
    with pytest.raises(ConfigError, match=r"too small: .* the KV needs"):
        _open(tiny_path, dev)


@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_mounted_device_is_refused(tiny_path, make_loop, tmp_path):
    dev = make_loop(64 << 20, init=init_ext4)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", dev, str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount here")
    try:
        with pytest.raises(ConfigError, match="in use"):
            _open(tiny_path, dev, kv_force=True)  # not even force takes a mounted device
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
