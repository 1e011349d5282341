"""Fuzzing (issue 6): the device header parser (C: native/fuzz/, built with the `debug` preset, ASan +
UBSan) and the size, budget and GGUF header parsers (Python: tests/fuzz_parsers.py, atheris), each for a
bounded number of inputs; and what the fuzzers found, kept as plain regression tests.

Longer runs by hand: <build>/bin/fuzz_header -runs=10000000 native/fuzz/corpus/header, and
python tests/fuzz_parsers.py {sizes,gguf} -len_control=0 (until stopped).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dualblade.errors import ModelError
from dualblade.gguf_header import model_info
from dualblade.sizes import parse_size

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "native" / "fuzz" / "corpus" / "header"
RUNS = 100_000


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory) -> Path:
    """The debug preset configured as test_native_units configures it; only fuzz_header built."""
    if not shutil.which("cmake") or not shutil.which("ninja"):
        pytest.skip("cmake and ninja are needed")
    build = tmp_path_factory.mktemp("fuzz") / "debug"
    for cmd in (["cmake", "--preset", "debug", "-B", str(build)],
                ["cmake", "--build", str(build), "--target", "fuzz_header"]):
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
    return build


def fuzz(exe: Path, *args, cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs a fuzz_header binary; returns it and the counts of its closing lines."""
    r = subprocess.run([str(exe), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    counts = {}
    if m := re.search(r"ran (\d+) corpus inputs and (\d+) mutated inputs", r.stderr):
        counts["corpus"], counts["mutated"] = map(int, m.groups())
    if m := re.search(r"(\d+) inputs, decoded as is and re-sealed: (\d+) ours, (\d+) not ours, (\d+) damaged, "
                      r"(\d+) another version", r.stderr):
        counts.update(zip(["inputs", "ours", "not ours", "damaged", "another version"], map(int, m.groups())))
    return r, counts


def test_header_fuzzer_runs_corpus_and_mutations(debug_build, tmp_path):
    r, n = fuzz(debug_build / "bin" / "fuzz_header", f"-runs={RUNS}", "-seed=7", CORPUS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert n["corpus"] == len([p for p in CORPUS.iterdir() if not p.name.startswith(".")])
    assert n["mutated"] == RUNS and n["inputs"] == n["corpus"] + RUNS
    # the mutations get everywhere: past the magic, to the CRC, past it to the version and the fields
    assert sum(n[k] for k in ("ours", "not ours", "damaged", "another version")) == 2 * n["inputs"]
    assert n["ours"] > RUNS // 100 and n["damaged"] > RUNS // 100 and n["another version"] > RUNS // 100
    assert not list(tmp_path.glob("crash-*"))


def test_header_fuzzer_takes_any_corpus_entry(debug_build, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "sub" / "skipped").write_bytes(b"x")  # folders inside are not entries
    (corpus / ".hidden").write_bytes(b"x")
    (corpus / "empty").write_bytes(b"")
    (corpus / "one-byte").write_bytes(b"D")
    (corpus / "past-max-len").write_bytes(bytes(range(256)) * 512)  # 128 KiB
    (corpus / "magic-then-junk").write_bytes(b"DUALBLADE-KV-v1\0" + b"\xff" * 5000)
    shutil.copy(CORPUS / "wrapping-offset", corpus)  # the decoder's bug the fuzzer found
    exe = debug_build / "bin" / "fuzz_header"
    r, n = fuzz(exe, "-runs=1000", corpus, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert n["corpus"] == 5 and n["mutated"] == 1000

    r, _ = fuzz(exe, tmp_path / "missing", cwd=tmp_path)
    assert r.returncode == 1 and "missing" in r.stderr  # not a silent run of nothing
    r, _ = fuzz(exe, "-max_total_time=5", corpus, cwd=tmp_path)
    assert r.returncode == 2 and "unknown or bad flag" in r.stderr


PLANTED = r"""
#include "crc32c.h"
#include "header.h"
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    uint8_t blk[DBLADE_HEADER_BYTES] = { 0 };
    memcpy(blk, data, size < sizeof(blk) ? size : sizeof(blk));
    const uint32_t crc = dblade_crc32c(blk, DBLADE_HEADER_BYTES - 4);
    memcpy(blk + DBLADE_HEADER_BYTES - 4, &crc, 4);
    struct dblade_header h;
    if (dblade_header_decode(blk, &h) == 0 && h.align == 1u << 31) {
        abort(); // the planted bug: a valid header with this alignment
    }
    return 0;
}
"""


def test_header_fuzzer_finds_a_planted_bug(debug_build, tmp_path):
    """The driver with a target that fails on one field value: it gets there and saves the input."""
    cache = (debug_build / "CMakeCache.txt").read_text()
    cc = re.search(r"^CMAKE_C_COMPILER:\w+=(.+)$", cache, re.M).group(1)
    (tmp_path / "planted.c").write_text(PLANTED)
    exe = tmp_path / "planted"
    r = subprocess.run([cc, "-std=gnu11", "-g", "-fsanitize=address,undefined", f"-I{REPO}/native/include",
                        f"-I{REPO}/native/src", "planted.c", str(REPO / "native/fuzz/fuzz_driver.c"),
                        str(debug_build / "native" / "libdualblade_static.a"), "-lpthread", "-o", str(exe)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r, _ = fuzz(exe, f"-runs={RUNS}", CORPUS, cwd=tmp_path)
    assert r.returncode != 0
    m = re.search(r"the failing input \(run (\d+)\) is in \./(crash-\d+)", r.stderr)
    assert m, r.stderr[-4000:]
    crash = tmp_path / m.group(2)
    # the saved input is the failing one: it fails again alone, and the real decoder takes it
    assert fuzz(exe, crash, cwd=tmp_path)[0].returncode != 0
    assert fuzz(debug_build / "bin" / "fuzz_header", crash, cwd=tmp_path)[0].returncode == 0


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None,
                    reason="atheris is not installed (the test extra has it for CPython 3.11-3.13 on Linux x86_64)")
@pytest.mark.parametrize("target", ["sizes", "gguf"])
def test_python_fuzzer(target, tmp_path):
    runs = 20_000
    r = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_parsers.py"), target, f"-runs={runs}", "-seed=1",
                        "-len_control=0", "-timeout=30"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and f"Done {runs} runs" in out, out[-6000:]
    assert not list(tmp_path.glob("crash-*"))


# a parent whose peak RSS is past libFuzzer's default -rss_limit_mb (2048) starts the fuzzer, as a test
# process that has loaded models does: the child's ru_maxrss starts at the parent's peak (vfork+exec)
BIG_PARENT = r"""
import resource, subprocess, sys
b = b"\1" * (2200 << 20); del b  # touched, then freed: only the peak remains
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
r = subprocess.run([sys.executable, *sys.argv[1:]], capture_output=True, text=True)
print(peak, r.returncode)
sys.stderr.write(r.stdout + r.stderr)
"""


def _mem_available() -> int:
    return next(int(l.split()[1]) << 10 for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris is not installed")
def test_python_fuzzer_ignores_the_parents_peak_rss(tmp_path):
    if _mem_available() < 3 << 30:
        pytest.skip("needs 3 GiB of available memory for a parent with a 2.2 GB peak")
    r = subprocess.run([sys.executable, "-c", BIG_PARENT, str(REPO / "tests" / "fuzz_parsers.py"), "sizes",
                        "-runs=100000000", "-max_total_time=3", "-seed=1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    peak, rc = map(int, r.stdout.split())
    assert peak > 2048  # the setup holds: the fuzzer's default limit would fire at its first check
    assert rc == 0 and "out-of-memory" not in r.stderr and re.search(r"Done \d+ runs", r.stderr), r.stderr[-4000:]


# ------------------------------------------------------------------------- what the fuzzers found

def test_size_of_hundreds_of_digits_is_refused():
    # float() made these inf, and int(inf) raised an OverflowError instead of the ValueError
    for text in ("1" * 400 + ".5", "9" * 320 + ".0", "1" * 400 + ".5G"):
        with pytest.raises(ValueError, match="absurdly large"):
            parse_size(text)


U32, I32, BOOL, STRING, ARRAY, U64 = 4, 5, 7, 8, 9, 10


def _s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _gguf(path: Path, **changes) -> Path:
    """A GGUF header of a 4-layer llama; changes: key -> (type, encoded value), or None to drop the key."""
    kvs = {"general.architecture": (STRING, _s(b"llama")), "llama.block_count": (U32, struct.pack("<I", 4)),
           "llama.embedding_length": (U32, struct.pack("<I", 64)),
           "llama.attention.head_count": (U32, struct.pack("<I", 4))}
    kvs.update({k.replace("__", "."): v for k, v in changes.items()})
    kvs = {k: v for k, v in kvs.items() if v is not None}
    body = b"".join(_s(k.encode()) + struct.pack("<I", t) + v for k, (t, v) in kvs.items())
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + body + bytes(64))
    return path


def _arr(t: int, fmt: str, values) -> bytes:
    return struct.pack("<IQ", t, len(values)) + b"".join(struct.pack(fmt, v) for v in values)


@pytest.mark.parametrize("key,value,words", [
    ("llama__block_count", (U64, struct.pack("<Q", 2**33)), "block_count"),  # was gigabytes, then MemoryError
    ("llama__block_count", (U32, struct.pack("<I", 0)), "block_count"),  # llama.cpp aborts on it
    ("llama__block_count", (I32, struct.pack("<i", -3)), "block_count"),
    ("llama__block_count", (BOOL, b"\x01"), "block_count"),
    ("llama__attention__head_count", (ARRAY, _arr(U32, "<I", [4, 4])), "2 values"),  # was an IndexError
    ("llama__attention__head_count_kv", (ARRAY, _arr(I32, "<i", [1, 1, -1, 1])), "head_count_kv"),
    ("llama__attention__key_length", (STRING, _s(b"64")), "key_length"),  # was a TypeError
    ("llama__context_length", (ARRAY, _arr(U32, "<I", [1])), "context_length"),  # was a TypeError
    ("llama__attention__sliding_window_pattern", (ARRAY, _arr(BOOL, "<?", [True])), "1 values"),
    ("general__architecture", (STRING, _s(b"lla\nma")), "not a name"),  # was a message on two lines
])
def test_gguf_header_refuses_what_llama_cpp_would(tmp_path, key, value, words):
    assert model_info(_gguf(tmp_path / "good.gguf")).n_layer == 4
    with pytest.raises(ModelError, match=words) as e:
        model_info(_gguf(tmp_path / "bad.gguf", **{key: value}))
    assert "\n" not in str(e.value)


def test_gguf_chat_template_of_another_type_is_none(tmp_path):
    info = model_info(_gguf(tmp_path / "m.gguf", tokenizer__chat_template=(ARRAY, _arr(U32, "<I", [14, 14]))))
    assert info.chat_template is None
