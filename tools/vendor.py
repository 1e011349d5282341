#!/usr/bin/env python3
"""Fetch, verify, unpack and patch the llama.cpp source that dualblade builds against.

The source is the PyPI sdist named in ``vendor.lock`` (llama-cpp-python, which vendors llama.cpp).
It is fetched by name and version, checked against the locked sha256, unpacked, and the series in
``patches/`` is applied in order; a patch that does not apply stops the build.

The result lands in ``vendor/llama-cpp-python``. Only files whose content changed are rewritten, so
that changing one patch rebuilds only what that patch touches (ninja compares timestamps).

    python tools/vendor.py prepare      # idempotent; what the CMake configure step runs
    python tools/vendor.py status       # prints what is there and whether it is current

Environment:
    DUALBLADE_SDIST       path of an already downloaded sdist (offline builds); still hash-checked
    DUALBLADE_INDEX_URL   package index (simple API; default $PIP_INDEX_URL or https://pypi.org/simple)
    XDG_CACHE_HOME        the download is cached under $XDG_CACHE_HOME/dualblade/sdist
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "vendor.lock"
PATCHES = ROOT / "patches"
VENDOR = ROOT / "vendor"
TREE = VENDOR / "llama-cpp-python"
STAMP = TREE / ".dualblade-stamp"


class VendorError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dualblade" / "sdist"


def _download(lock: dict, dest: Path) -> None:
    # the package index's simple API (PEP 691 JSON), as pip uses it
    index = (os.environ.get("DUALBLADE_INDEX_URL") or os.environ.get("PIP_INDEX_URL")
             or "https://pypi.org/simple").rstrip("/")
    page = f"{index}/{lock['name']}/"
    req = urllib.request.Request(page, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            meta = json.load(r)
    except (OSError, ValueError) as e:
        raise VendorError(f"cannot read {page} ({e}); download {lock['filename']} by hand and set "
                          f"DUALBLADE_SDIST to its path") from e
    files = [u for u in meta.get("files", []) if u.get("filename") == lock["filename"]]
    if not files:
        raise VendorError(f"{index} has no file {lock['filename']} for {lock['name']}=={lock['version']}")
    if files[0].get("hashes", {}).get("sha256") not in (None, lock["sha256"]):
        raise VendorError(f"{index} publishes a different sha256 for {lock['filename']} than vendor.lock")
    url = urllib.parse.urljoin(page, files[0]["url"])
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=300) as r:
            shutil.copyfileobj(r, out, 1 << 20)
        if _sha256(Path(tmp)) != lock["sha256"]:
            raise VendorError(f"downloaded {lock['filename']} does not match the sha256 in vendor.lock")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fetch(lock: dict) -> Path:
    """Returns the path of the verified sdist, downloading it once into the user cache."""
    explicit = os.environ.get("DUALBLADE_SDIST")
    path = Path(explicit) if explicit else _cache_dir() / lock["filename"]
    if path.exists():
        if _sha256(path) == lock["sha256"]:
            return path
        if explicit:
            raise VendorError(f"DUALBLADE_SDIST={path} does not match the sha256 in vendor.lock")
        path.unlink()  # a corrupt cache entry of ours: fetch again
    elif explicit:
        raise VendorError(f"DUALBLADE_SDIST={path} does not exist")
    print(f"-- dualblade: fetching {lock['name']}=={lock['version']}", file=sys.stderr)
    _download(lock, path)
    return path


def _patch_series() -> list[Path]:
    return sorted(PATCHES.glob("*.patch"))


def _wanted_stamp(lock: dict) -> dict:
    return {"sha256": lock["sha256"], "patches": [[p.name, _sha256(p)] for p in _patch_series()]}


def _apply(series: list[Path], tree: Path) -> None:
    git = shutil.which("git")
    for p in series:
        if git:
            cmd = [git, "apply", "--whitespace=nowarn", "-p1", str(p)]
        else:
            cmd = ["patch", "-p1", "--batch", "--forward", "--silent", "-i", str(p)]
        r = subprocess.run(cmd, cwd=tree, capture_output=True, text=True,
                           env={**os.environ, "GIT_DIR": os.devnull})
        if r.returncode != 0:
            raise VendorError(f"patch {p.name} does not apply to {tree.name}:\n{r.stdout}{r.stderr}")


def _sync(src: Path, dst: Path) -> int:
    """Makes dst equal to src, rewriting only files whose content differs. Returns files written."""
    written = 0
    seen = set()
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            s, d = Path(dirpath) / name, dst / rel / name
            seen.add(rel / name)
            if d.is_file() and not d.is_symlink() and d.stat().st_size == s.stat().st_size \
                    and _same(s, d):
                continue
            if d.is_symlink() or d.exists():
                d.unlink()
            shutil.copyfile(s, d)  # fresh mtime: the build sees the change
            shutil.copymode(s, d)
            written += 1
    for dirpath, dirnames, filenames in os.walk(dst, topdown=False):
        rel = Path(dirpath).relative_to(dst)
        for name in filenames:
            # build outputs installed in-tree (llama_cpp/lib) are not part of the source
            if (rel / name) not in seen and rel.parts[:2] != ("llama_cpp", "lib") and name != STAMP.name:
                (Path(dirpath) / name).unlink()
        if not any(Path(dirpath).iterdir()) and rel != Path("."):
            Path(dirpath).rmdir()
    return written


def _same(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def prepare() -> Path:
    lock = json.loads(LOCK.read_text())
    wanted = _wanted_stamp(lock)
    if STAMP.exists():
        try:
            if json.loads(STAMP.read_text()) == wanted:
                return TREE
        except ValueError:
            pass
    sdist = fetch(lock)
    VENDOR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=VENDOR, prefix=".staging-") as staging:
        with tarfile.open(sdist) as tf:
            top = {m.name.split("/", 1)[0] for m in tf.getmembers()}
            if len(top) != 1:
                raise VendorError(f"{sdist.name}: expected one top-level directory, found {sorted(top)}")
            if sys.version_info >= (3, 12):
                tf.extractall(staging, filter="data")
            else:
                for m in tf.getmembers():
                    if m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise VendorError(f"{sdist.name}: unsafe member {m.name}")
                tf.extractall(staging)
        tree = Path(staging) / top.pop()
        _apply(_patch_series(), tree)
        n = _sync(tree, TREE)
    STAMP.write_text(json.dumps(wanted, indent=1) + "\n")
    print(f"-- dualblade: vendor tree ready ({len(wanted['patches'])} patches, {n} files updated)",
          file=sys.stderr)
    return TREE


def main(argv: list[str]) -> int:
    cmd = argv[1] if len(argv) > 1 else "prepare"
    try:
        if cmd == "prepare":
            prepare()
        elif cmd == "status":
            lock = json.loads(LOCK.read_text())
            current = STAMP.exists() and json.loads(STAMP.read_text()) == _wanted_stamp(lock)
            print(f"{lock['name']}=={lock['version']} (llama.cpp {lock['llama_cpp_commit'][:7]}): "
                  f"{'current' if current else 'needs prepare'}; {len(_patch_series())} patches")
        else:
            print(f"usage: {argv[0]} [prepare|status]", file=sys.stderr)
            return 2
    except VendorError as e:
        print(f"dualblade vendor: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
