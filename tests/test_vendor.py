"""The vendoring step: a verified, patched tree; loud failures; minimal rewrites."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import vendor  # noqa: E402


def test_lock_names_the_sdist():
    lock = json.loads((REPO / "vendor.lock").read_text())
    assert lock["name"] == "llama-cpp-python" and lock["version"] == "0.3.36"
    assert len(lock["sha256"]) == 64 and lock["filename"].endswith(".tar.gz")


def test_tree_is_current_and_patched():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "vendor.py"), "status"], capture_output=True, text=True)
    assert r.returncode == 0 and "current" in r.stdout and "needs" not in r.stdout
    src = (REPO / "vendor/llama-cpp-python/vendor/llama.cpp/src/llama-kv-cache.cpp").read_text()
    assert "dblade_cache_open" in src


def test_a_patch_that_does_not_apply_fails_loudly(tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("one\ntwo\n")
    bad = tmp_path / "0001-bad.patch"
    bad.write_text("--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n-uno\n+eins\n two\n")
    with pytest.raises(vendor.VendorError, match="0001-bad.patch does not apply"):
        vendor._apply([bad], tree)


def test_sync_rewrites_only_what_changed(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in (src, dst):
        (d / "sub").mkdir(parents=True)
        (d / "same.c").write_text("same\n")
        (d / "sub" / "changed.c").write_text("old\n")
    (dst / "stale.c").write_text("gone\n")
    (src / "sub" / "changed.c").write_text("new\n")
    import os
    os.utime(dst / "same.c", (1, 1))
    assert vendor._sync(src, dst) == 1
    assert (dst / "sub" / "changed.c").read_text() == "new\n"
    assert (dst / "same.c").stat().st_mtime == 1  # untouched: nothing to rebuild
    assert not (dst / "stale.c").exists()


def test_a_corrupt_sdist_is_refused(tmp_path, monkeypatch):
    fake = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    fake.write_bytes(b"not the real thing")
    monkeypatch.setenv("DUALBLADE_SDIST", str(fake))
    with pytest.raises(vendor.VendorError, match="does not match the sha256"):
        vendor.fetch(json.loads((REPO / "vendor.lock").read_text()))
