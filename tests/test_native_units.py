"""The C module's own unit tests (ctest), built with the `debug` preset: ASan + UBSan."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not shutil.which("cmake") or not shutil.which("ninja"), reason="cmake and ninja are needed")
@pytest.mark.parametrize("preset", ["debug", "tsan"])  # ASan + UBSan; TSan for the prefetcher thread
def test_c_units_under_sanitizers(tmp_path, preset):
    build = tmp_path / preset
    run = lambda *a: subprocess.run(a, cwd=REPO, capture_output=True, text=True, timeout=600)  # noqa: E731
    r = run("cmake", "--preset", preset, "-B", str(build))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("cmake", "--build", str(build))
    assert r.returncode == 0, r.stdout + r.stderr
    r = run("ctest", "--test-dir", str(build), "--output-on-failure")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "100% tests passed" in r.stdout
    assert "0 tests" not in r.stdout.split("tests passed")[0][-20:]
