"""Shared fixtures: the real bundled model, a synthetic dense GQA model, running the CLI."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import dualblade

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # the tests exercise the installed package (pip install .), not the source folder
    here = Path(dualblade.__file__).resolve()
    if REPO in here.parents and "site-packages" not in str(here):
        raise pytest.UsageError(f"dualblade imported from the source tree ({here}); run the tests with "
                                "'pytest' after 'pip install .[test]', not 'python -m pytest'")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from dualblade.models import bundled_model_path

    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """A synthetic llama-architecture model: 8 layers, GQA 8:2, random weights, real tokenizer."""
    from dualblade.synthetic import write_model

    return write_model(tmp_path_factory.mktemp("models") / "tiny.gguf", "tiny", seed=1)


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
