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
