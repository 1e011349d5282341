"""Shared fixtures: the real bundled model, a synthetic dense GQA model, running the CLI."""
from __future__ import annotations

import mmap
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import dualblade
from dualblade.heap import release_idle_memory

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # the tests exercise the installed package (pip install .), not the source folder
    here = Path(dualblade.__file__).resolve()
    if REPO in here.parents and "site-packages" not in str(here):
        raise pytest.UsageError(f"dualblade imported from the source tree ({here}); run the tests with "
                                "'pytest' after 'pip install .[test]', not 'python -m pytest'")


@pytest.fixture(scope="module", autouse=True)
def _memory_back_after_each_module():
    """When a module is done (its module-scoped models closed), collect what is left of them and give the
    freed heap back to the kernel. glibc keeps freed memory mapped (a Gemma test leaves 100-300 MB of
    it): without this the test process would carry it to the end of the suite."""
    yield
    release_idle_memory()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from dualblade.models import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """A synthetic llama-architecture model: 8 layers, GQA 8:2, random weights, real tokenizer."""
    from dualblade.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", seed=1)


@pytest.fixture(scope="session")
def heavy_path(tmp_path_factory) -> Path:
    """kv-heavy: 16 layers, 32 KiB of f16 KV per token, 120 MiB of weights: I/O shows up fast (written once)."""
    from dualblade.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("heavy") / "kv-heavy.gguf", "kv-heavy", seed=1)


PROMPT_TEXT = ("In the beginning the valley was quiet. The river ran past the old mill, and the people of the "
               "village counted the seasons by the colour of the water. ")


def prompt_tokens(llm, n: int) -> list[int]:
    """n tokens of an ordinary English prompt (the text repeated), as the model tokenizes it."""
    toks = llm.tokenize(PROMPT_TEXT.encode())
    while len(toks) < n:
        toks += llm.tokenize(PROMPT_TEXT.encode(), add_bos=False)
    return toks[:n]


def last_logits(llm):
    """The last evaluated position's logits, copied (llama_cpp keeps no copy without logits_all)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).copy()


def dualblade_exe() -> str:
    exe = shutil.which("dualblade") or str(Path(sys.executable).parent / "dualblade")
    assert os.path.exists(exe), "the dualblade command is not installed"
    return exe


def run_cli(*args: str, input: str | None = None, timeout: float = 300, env: dict | None = None):
    """Runs the installed `dualblade` command; returns the CompletedProcess (text)."""
    return subprocess.run([dualblade_exe(), *args], input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def no_traceback(p) -> None:
    assert "Traceback" not in p.stdout and "Traceback" not in p.stderr, p.stderr


def assert_user_error(p, word: str) -> None:
    """A user error as the README promises it: one line on stderr, `dualblade: error: ...` containing word,
    nothing on stdout, no traceback, a non-zero exit."""
    no_traceback(p)
    assert p.returncode != 0
    err = p.stderr.splitlines()
    assert len(err) == 1 and p.stderr.endswith("\n"), p.stderr
    assert err[0].startswith("dualblade: error: ")
    assert word in err[0], err[0]
    assert p.stdout == ""


@pytest.fixture(scope="session")
def bad_files(tmp_path_factory, gemma_path):
    """Files a user may give by mistake, by placeholder name (for command-line templates)."""
    d = tmp_path_factory.mktemp("bad")
    (d / "notes.txt").write_text("this is not a model\n" * 10)
    (d / "adir").mkdir()
    with open(gemma_path, "rb") as f:
        (d / "truncated.gguf").write_bytes(f.read(1000))
    (d / "kv").mkdir()
    return {"TXT": str(d / "notes.txt"), "DIR": str(d / "adir"), "TRUNC": str(d / "truncated.gguf"),
            "KVDIR": str(d / "kv")}


@pytest.fixture
def make_loop(tmp_path):
    """make(size, init=None) -> a loop device over a sparse file of that size (init(image path) runs first);
    detached, and unmounted if it was mounted, afterwards. Skips where loop devices cannot be made."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    devs = []

    def make(size: int, init=None) -> str:
        img = tmp_path / f"dev{len(devs)}.img"
        with open(img, "wb") as f:
            f.truncate(size)
        if init:
            init(str(img))
        r = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"losetup refused here: {r.stderr.strip()}")
        devs.append(r.stdout.strip())
        return devs[-1]

    yield make
    for d in devs:
        subprocess.run(["umount", d], capture_output=True)
        subprocess.run(["losetup", "-d", d], check=False)


# what a device may hold before we are given it (init functions for make_loop: they get the image's path)
def init_ext4(img: str) -> None:
    subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)


def init_foreign_data(img: str) -> None:
    with open(img, "r+b") as f:
        f.seek(40000)
        f.write(b"somebody's data")


def init_partition_table(img: str) -> None:
    with open(img, "r+b") as f:
        f.seek(510)
        f.write(b"\x55\xaa")


# --- the ownership header of a KV device (layout: native/src/header.c) ---

def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as the device header carries it."""
    table = crc32c.table
    crc = 0xFFFFFFFF
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc_table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        t.append(c)
    return t


crc32c.table = _crc_table()
assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def read_block0(dev: str) -> bytes:
    """Block 0 read with O_DIRECT (what the device holds, not a stale page cache)."""
    buf = mmap.mmap(-1, 4096)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == 4096
    finally:
        os.close(fd)
    return bytes(buf)


def device_header(dev: str) -> dict:
    """Decodes and checks the ownership header (layout: native/src/header.c)."""
    b = read_block0(dev)
    assert b[:16] == b"DUALBLADE-KV-v1\0", b[:16]
    (crc,) = struct.unpack_from("<I", b, 4092)
    assert crc == crc32c(b[:4092]), f"header CRC-32C {crc:#x} != {crc32c(b[:4092]):#x}"
    version, size = struct.unpack_from("<II", b, 16)
    device_bytes, data_offset, data_bytes = struct.unpack_from("<QQQ", b, 40)
    (align,) = struct.unpack_from("<I", b, 64)
    geometry, created = struct.unpack_from("<QQ", b, 72)
    assert version == 1 and size == 4096
    assert data_offset >= 4096 and data_offset + data_bytes <= device_bytes and align and not align & (align - 1)
    return {"uuid": b[24:40], "device_bytes": device_bytes, "data_offset": data_offset, "data_bytes": data_bytes,
            "align": align, "geometry": geometry}


# --- budgets: asked of the C module's placement plan, never restated here ---

def placement(model_path, n_ctx: int, policy: str, budget: int | None, type_k: str = "f16",
              type_v: str | None = None) -> tuple[list[str], int]:
    """The placement dualblade.Llama gets for this model, context, policy, budget and KV types: (a path per
    KV layer, the direct path's staging bytes). The layer sizes are those Llama plans with (the model
    header's layer_kv_bytes); MemoryError(minimum) when the budget is below the minimum working set."""
    from dualblade import _native
    from dualblade.gguf_header import model_info

    kv = model_info(model_path).layer_kv_bytes(n_ctx, type_k, type_v)
    return _native.plan(policy, budget, [k + v for k, v in kv])


def min_budget(model_path, n_ctx: int, policy: str = "direct", type_k: str = "f16",
               type_v: str | None = None) -> int:
    """The smallest mem_budget Llama accepts for this model, context, policy and KV types (0: any budget
    does, as on the page-cache path). At it, with the direct path, every layer is offloaded."""
    try:
        placement(model_path, n_ctx, policy, 0, type_k, type_v)
    except MemoryError as e:
        return e.args[0]
    return 0


# --- the tiny model with every layer on the direct path (the fault and privacy tests) ---

TINY_DIRECT_CTX = 1024


def tiny_direct_budget(model) -> int:
    """The budget of tiny_direct: the minimum working set, so every layer is on the direct path."""
    return min_budget(model, TINY_DIRECT_CTX, "direct")


def heavy_direct(model, kv_dir, n_ctx: int = 4096, **kw):
    """A dualblade.Llama on kv-heavy whose layers are all on the direct path (the minimum budget), its store in
    kv_dir, flash attention on; kw: more."""
    from dualblade import Llama

    return Llama(str(model), n_ctx=n_ctx, mem_budget=min_budget(model, n_ctx, "direct"), kv_policy="direct",
                 kv_dir=str(kv_dir), flash_attn=True, verbose=False, **kw)


def kv_written(stats: dict) -> int:
    """The bytes every layer has written to storage, from kv_stats() (or a server's /v1/kv)."""
    return sum(layer["bytes_written"] for layer in stats["layers"])


def tiny_direct(model, **kw):
    """A dualblade.Llama on the tiny model whose 8 layers are all on the direct path; kw: the store and more."""
    from dualblade import Llama

    return Llama(str(model), n_ctx=TINY_DIRECT_CTX, mem_budget=tiny_direct_budget(model), kv_policy="direct",
                 verbose=False, **kw)
