"""Bad input (issue 6): every mistake a user can make with a budget, a KV directory or device, a model, a
context size, a cache type or a combination of flags is refused before any weight is loaded, with the
problem and the fix named: on the command line one line `dualblade: error: <problem>; <fix>` in CLI flags
and a non-zero exit, in the Python API an exception of a precise type.

Placeholders ({NAME}) stand for files, directories and devices made on demand; those that need root (loop
devices, mounts) skip elsewhere. {MIN_<MODEL>_<N_CTX>} is the direct path's minimum budget for that model and
context (asked of the placement plan): every layer offloaded. Other budget literals here are far from any
minimum: far below it (1M at -c 4096, where Gemma needs 8M) or far above it and below the KV.
"""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import llama_cpp
import pytest

from dualblade import BudgetError, ConfigError, Llama, ModelError, StoreError
from conftest import assert_user_error, init_ext4, init_foreign_data, init_partition_table, min_budget, run_cli

MiB = 1 << 20
# the tiny model on a KV device: direct policy, every layer offloaded (as tests/test_device.py opens it)
TINY_DEV = "chat {TINY} -c 1024 --policy direct --mem-budget {MIN_TINY_1024} --kv-device"
TINY_DEV_KW = {"n_ctx": 1024, "kv_policy": "direct", "mem_budget": "{MIN_TINY_1024}"}


def _write_gguf(path, arch: str, keys: dict, tensors: bool = True):
    """A minimal GGUF of architecture arch (one small tensor unless tensors=False)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        w.add_uint32(f"{arch}.{key}", value)
    if tensors:
        w.add_tensor("token_embd.weight", np.zeros((16, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory, bad_files, gemma_path, tiny_path):
    d = tmp_path_factory.mktemp("bad-models")
    (d / "empty.gguf").write_bytes(b"")
    (d / "v9.gguf").write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(40))
    (d / "magic.gguf").write_bytes(b"GGML" + bytes(100))
    with open(tiny_path, "rb") as f:  # the header intact, the weights cut short (an interrupted copy)
        (d / "cut.gguf").write_bytes(f.read(os.path.getsize(tiny_path) // 2))
    geometry = {"context_length": 4096, "embedding_length": 64, "block_count": 2}
    return {**bad_files, "GEMMA": str(gemma_path), "TINY": str(tiny_path), "EMPTY": str(d / "empty.gguf"),
            "V9": str(d / "v9.gguf"), "MAGIC": str(d / "magic.gguf"), "CUT": str(d / "cut.gguf"),
            # an architecture llama.cpp does not know
            "FROB": _write_gguf(d / "frob.gguf", "frobnet", {**geometry, "attention.head_count": 4}),
            # a recurrent one: no per-layer KV cache to offload (header only: refused before loading)
            "MAMBA": _write_gguf(d / "mamba.gguf", "mamba", {**geometry, "ssm.state_size": 16}, tensors=False)}


def _root_tools(*tools: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices, mounts)")
    for t in tools:
        if not shutil.which(t):
            pytest.skip(f"{t} is not installed")


class Places(dict):
    """Placeholder -> path; directories and devices are made when first asked for."""

    def __init__(self, files: dict, request, tmp_path):
        super().__init__(files)
        self.request, self.tmp_path, self.mounts = request, tmp_path, []

    def _loop(self, size: int, init=None) -> str:
        return self.request.getfixturevalue("make_loop")(size, init)

    def _mount(self, *args: str) -> None:
        r = subprocess.run(["mount", *args], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")
        if "remount" not in args[-2]:
            self.mounts.append(args[-1])

    def _mounted_fs(self, size: int) -> tuple[str, str]:
        """A loop device with an ext4 file system, mounted: (device, mount point)."""
        _root_tools("mkfs.ext4", "mount")
        dev = self._loop(size, init_ext4)
        mnt = self.tmp_path / f"mnt{len(self.mounts)}"
        mnt.mkdir()
        self._mount(dev, str(mnt))
        return dev, str(mnt)

    def __missing__(self, key: str) -> str:
        if key.startswith("MIN_"):  # MIN_<MODEL>_<N_CTX>
            model, n_ctx = key[4:].rsplit("_", 1)
            self[key] = value = str(min_budget(self[model], int(n_ctx), "direct"))
            return value
        self[key] = value = getattr(self, f"make_{key.lower()}")()
        return value

    def make_ro(self) -> str:
        """A read-only KV directory: a read-only bind mount as root (permissions do not stop root), else
        a directory without write permission."""
        d = self.tmp_path / "ro"
        d.mkdir()
        if os.geteuid() != 0:
            d.chmod(0o500)
            return str(d)
        _root_tools("mount")
        self._mount("--bind", str(d), str(d))
        self._mount("-o", "remount,bind,ro", str(d))
        return str(d)

    def make_smallfs(self) -> str:
        """A directory on a 16 MiB ext4 file system: too little room for a long context's KV."""
        return self._mounted_fs(16 * MiB)[1]

    def make_dev_mounted(self) -> str:
        return self._mounted_fs(64 * MiB)[0]

    def make_dev_ext4(self) -> str:
        _root_tools("mkfs.ext4")
        return self._loop(64 * MiB, init_ext4)

    def make_dev_mbr(self) -> str:
        return self._loop(64 * MiB, init_partition_table)

    def make_dev_data(self) -> str:
        return self._loop(64 * MiB, init_foreign_data)

    def make_dev_small(self) -> str:
        return self._loop(2 * MiB)

    def make_dev_16m(self) -> str:
        return self._loop(16 * MiB)

    def make_dev_other(self) -> str:
        """A device of ours, holding the KV layout of the tiny model at -c 1024."""
        dev = self._loop(64 * MiB)
        kw = {k: v.format_map(self) if isinstance(v, str) else v for k, v in TINY_DEV_KW.items()}
        Llama(self["TINY"], verbose=False, kv_device=dev, **kw).close()
        return dev

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            subprocess.run(["umount", m], capture_output=True)


@pytest.fixture
def places(model_files, request, tmp_path):
    p = Places(model_files, request, tmp_path)
    yield p
    p.cleanup()


# ------------------------------------------------------------------------------------------ the CLI

# (command line, a word the one-line error must contain); all new beyond tests/test_cli.py's ERROR_CASES
CLI_CASES = [
    # budgets
    ("chat --mem-budget 1.5.5G", "not a size"),
    ("chat --mem-budget 0.5", "fraction of a byte"),
    ("chat --mem-budget 0M -c 1024", "zero"),
    ("chat --mem-budget -64M --policy direct", "negative"),
    ("chat --mem-budget 1M --policy direct -c 4096", "minimum working set"),
    ("chat --mem-budget 5000G --policy mmap", "machine's memory"),
    # KV directories
    ("chat --kv-dir {RO} --mem-budget 40M -c 4096", "writable --kv-dir"),
    ("chat --kv-dir {SMALLFS} --mem-budget {MIN_GEMMA_32768} --policy direct -c 32768", "the KV file needs"),
    ("chat --kv-dir {KVDIR}/missing --mem-budget 40M", "does not exist"),
    ("chat --kv-dir /dev/shm --mem-budget 40M --policy direct -c 4096", "tmpfs"),
    # KV devices
    (TINY_DEV + " {DEV_MOUNTED} --force", "in use"),
    (TINY_DEV + " {DEV_EXT4}", "ext2/3/4 file system"),
    (TINY_DEV + " {DEV_MBR}", "partition table"),
    (TINY_DEV + " {DEV_DATA}", "data of another program"),
    (TINY_DEV + " {DEV_SMALL}", "too small"),
    ("chat {TINY} -c 2048 --policy direct --mem-budget {MIN_TINY_2048} --kv-device {DEV_OTHER}",
     "another model or context"),
    ("chat --kv-device {KVDIR} --mem-budget 40M", "not a block device"),
    # models
    ("chat {EMPTY}", "empty"),
    ("chat {V9}", "GGUF version 9"),
    ("chat {MAGIC}", "not a GGUF"),
    ("chat {CUT}", "truncated"),
    ("chat {FROB}", "architecture 'frobnet'"),
    ("chat {MAMBA} --policy direct --mem-budget 64M", "recurrent state"),
    ("info {EMPTY}", "empty"),
    ("info {CUT}", "truncated"),
    # contexts
    ("chat -c -5", "not positive"),
    ("chat {TINY} -c 40000", "training context (32768)"),
    ("chat {TINY} -c 32768 --policy direct --mem-budget {MIN_TINY_32768} --kv-device {DEV_16M}",
     "a smaller --ctx-size"),
    ("info -c -5", "not positive"),
    # cache types
    ("chat --cache-type q4_0 --no-flash-attn", "needs flash attention"),
    ("chat --cache-type q8_0 --no-flash-attn", "needs flash attention"),
    ("info --cache-type bf16", "bf16"),
    # flags that contradict each other, or would silently do nothing
    ("chat --policy ram --mem-budget 1G", "--policy ram"),
    ("chat --policy ram --kv-dir {KVDIR}", "--kv-dir would do nothing"),
    ("chat --policy ram --kv-device /dev/null", "--kv-device would do nothing"),
    ("chat --force", "--force takes over a --kv-device"),
    ("chat --force --kv-dir {KVDIR} --mem-budget 40M", "--force takes over a --kv-device"),
    ("chat --kv-dir {KVDIR} --kv-device {DEV_SMALL} --mem-budget 40M", "give only one"),
    # the VRAM tier (this build has no GPU)
    ("chat --vram-budget 1G -ngl 99", "GPU build"),
    ("chat --vram-budget 2X -ngl 99", "unknown unit"),
    ("chat --vram-budget auto -ngl 99", "GPU build"),
    ("info --vram-budget auto -ngl 99", "has no GPU"),
]
# llama.cpp has to open these to find out (their weights are never read)
LOADED_BY_LLAMA_CPP = {"chat {FROB}"}


@pytest.mark.parametrize("cmdline,word", CLI_CASES, ids=[c for c, _ in CLI_CASES])
def test_cli_bad_input_is_one_line_before_loading(places, cmdline, word):
    """With llama.cpp's log switched on, the single line on stderr also shows that llama.cpp never started
    to load the model: the mistake was caught before any weight was read."""
    args = [a.format_map(places) for a in shlex.split(cmdline)]
    env = {} if cmdline in LOADED_BY_LLAMA_CPP else {"DUALBLADE_LLAMA_LOG": "1"}
    p = run_cli(*args, input="", timeout=120, env=env)
    assert_user_error(p, word)
    for api_word in ("mem_budget", "kv_policy", "kv_dir", "kv_device", "kv_force", "n_ctx", "type_v"):
        assert api_word not in p.stderr, p.stderr  # the fix is a flag the user can type


def test_cli_cases_cover_the_issue():
    from test_cli import ERROR_CASES

    old = {c for c, _ in ERROR_CASES}
    new = {c for c, _ in CLI_CASES}
    assert len(new) == len(CLI_CASES) and not old & new
    assert len(old | new) >= 40


# ---------------------------------------------------------------------------------------- the API

# (id, exception type (exactly), message fragment, model placeholder, keyword arguments); {NAME} in a
# string argument is a placeholder too
API_CASES = [
    # budgets
    ("budget-unit", ConfigError, "unknown unit", "GEMMA", {"mem_budget": "2X"}),
    ("budget-malformed", ConfigError, "not a size", "GEMMA", {"mem_budget": "1.5.5G"}),
    ("budget-zero", ConfigError, "zero", "GEMMA", {"mem_budget": 0}),
    ("budget-negative", ConfigError, "negative", "GEMMA", {"mem_budget": -1}),
    ("budget-float", ConfigError, "not float", "GEMMA", {"mem_budget": 1.5e9}),
    ("budget-list", ConfigError, "not list", "GEMMA", {"mem_budget": [512]}),
    ("budget-bool", ConfigError, "not bool", "GEMMA", {"mem_budget": True}),
    ("budget-above-memory", ConfigError, "machine's memory", "GEMMA", {"mem_budget": "1000T"}),
    ("budget-below-minimum", BudgetError, "minimum working set", "GEMMA",
     {"mem_budget": "1M", "kv_policy": "direct", "n_ctx": 4096}),
    ("policy-unknown", ConfigError, "unknown KV policy", "GEMMA", {"kv_policy": "fast"}),
    ("policy-type", ConfigError, "kv_policy must be a string", "GEMMA", {"kv_policy": 3}),
    # KV directories
    ("kv-dir-missing", StoreError, "does not exist", "GEMMA", {"kv_dir": "/nonexistent/dir"}),
    ("kv-dir-a-file", StoreError, "not a directory", "GEMMA", {"kv_dir": "{TXT}"}),
    ("kv-dir-read-only", StoreError, "writable kv_dir", "GEMMA", {"kv_dir": "{RO}"}),
    ("kv-dir-tmpfs", StoreError, "tmpfs", "GEMMA", {"mem_budget": "8M", "kv_policy": "direct", "kv_dir": "/dev/shm"}),
    ("kv-dir-no-room", StoreError, "the KV file needs", "GEMMA",
     {"mem_budget": "{MIN_GEMMA_32768}", "kv_policy": "direct", "n_ctx": 32768, "kv_dir": "{SMALLFS}"}),
    ("kv-dir-type", ConfigError, "kv_dir must be a path", "GEMMA", {"kv_dir": 5}),
    # KV devices
    ("kv-device-missing", StoreError, "does not exist", "TINY", {"kv_device": "/dev/nonexistent"}),
    ("kv-device-not-block", StoreError, "not a block device", "TINY", {"kv_device": "/dev/null"}),
    ("kv-device-mounted", StoreError, "in use", "TINY",
     {**TINY_DEV_KW, "kv_device": "{DEV_MOUNTED}", "kv_force": True}),
    ("kv-device-file-system", StoreError, "ext2/3/4 file system", "TINY", {**TINY_DEV_KW, "kv_device": "{DEV_EXT4}"}),
    ("kv-device-partition-table", StoreError, "partition table", "TINY", {**TINY_DEV_KW, "kv_device": "{DEV_MBR}"}),
    ("kv-device-foreign-data", StoreError, "data of another program", "TINY",
     {**TINY_DEV_KW, "kv_device": "{DEV_DATA}"}),
    ("kv-device-too-small", StoreError, "too small", "TINY", {**TINY_DEV_KW, "kv_device": "{DEV_SMALL}"}),
    ("kv-device-other-layout", StoreError, "another model or context size", "TINY",
     {**TINY_DEV_KW, "n_ctx": 2048, "mem_budget": "{MIN_TINY_2048}", "kv_device": "{DEV_OTHER}"}),
    # models
    ("model-missing", ModelError, "does not exist", "/nonexistent.gguf", {}),
    ("model-directory", ModelError, "is a directory", "DIR", {}),
    ("model-not-gguf", ModelError, "not a GGUF", "TXT", {}),
    ("model-bad-magic", ModelError, "not a GGUF", "MAGIC", {}),
    ("model-empty", ModelError, "empty", "EMPTY", {}),
    ("model-gguf-version", ModelError, "GGUF version 9", "V9", {}),
    ("model-header-truncated", ModelError, "truncated", "TRUNC", {}),
    ("model-weights-truncated", ModelError, "truncated", "CUT", {}),
    ("model-unknown-architecture", ModelError, "architecture 'frobnet'", "FROB", {}),
    ("model-recurrent-offload", ConfigError, "recurrent state", "MAMBA", {"kv_policy": "direct", "mem_budget": "64M"}),
    ("model-path-type", ModelError, "model_path must be a path", 5, {}),
    # contexts
    ("ctx-negative", ConfigError, "negative", "GEMMA", {"n_ctx": -1}),
    ("ctx-type", ConfigError, "whole number of tokens", "GEMMA", {"n_ctx": "4096"}),
    ("ctx-beyond-training", ConfigError, "training context (32768)", "GEMMA", {"n_ctx": 99999}),
    ("ctx-beyond-device", StoreError, "smaller context", "TINY",
     {"n_ctx": 32768, "kv_policy": "direct", "mem_budget": "{MIN_TINY_32768}", "kv_device": "{DEV_16M}"}),
    # cache types
    ("cache-type-unknown", ConfigError, "not a ggml type", "GEMMA", {"type_k": 99}),
    ("cache-type-name", ConfigError, "not a ggml type", "GEMMA", {"type_v": "q4_0"}),
    ("cache-type-not-offloadable", ConfigError, "not a KV type dualblade can offload", "GEMMA",
     {"mem_budget": "8M", "kv_policy": "direct", "type_k": 6}),
    ("cache-q4_0-without-flash-attn", ConfigError, "needs flash attention", "GEMMA",
     {"type_k": 2, "type_v": 2, "flash_attn": False}),
    ("cache-q8_0-without-flash-attn", ConfigError, "needs flash attention", "GEMMA",
     {"type_v": 8, "flash_attn": False}),
    # arguments that contradict each other
    ("kv-dir-and-device", ConfigError, "give only one", "GEMMA", {"kv_dir": "{KVDIR}", "kv_device": "/dev/null"}),
    ("force-without-device", ConfigError, "kv_force takes over a kv_device", "GEMMA", {"kv_force": True}),
    ("force-type", ConfigError, "kv_force must be True or False", "TINY",
     {"kv_force": "yes", "kv_device": "/dev/null"}),
    # the VRAM tier (this build has no GPU)
    ("vram-budget-without-gpu", ConfigError, "GPU build", "GEMMA", {"vram_budget": "1G", "n_gpu_layers": -1}),
    ("vram-budget-malformed", ConfigError, "not a size", "GEMMA", {"vram_budget": "1.5.5G"}),
    ("vram-budget-auto-without-gpu", ConfigError, "GPU build", "GEMMA", {"vram_budget": "auto", "n_gpu_layers": -1}),
]
LOADED_BY_LLAMA_CPP_API = {"model-unknown-architecture"}


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_precise_exception(places, monkeypatch, case):
    name, exc_type, fragment, model, kwargs = case
    model = places[model] if isinstance(model, str) and model.isupper() else model
    kwargs = {k: v.format_map(places) if isinstance(v, str) else v for k, v in kwargs.items()}
    if name not in LOADED_BY_LLAMA_CPP_API:
        def load(*args, **kw):
            raise AssertionError("the weights were loaded before the mistake was caught")

        monkeypatch.setattr(llama_cpp.Llama, "__init__", load)
    with pytest.raises(exc_type) as e:
        Llama(model, verbose=False, **kwargs)
    assert type(e.value) is exc_type, f"{type(e.value).__name__}: {e.value}"
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert "; " in str(e.value)  # the problem; what to do


def test_api_cases_cover_the_issue():
    assert len({c[0] for c in API_CASES}) == len(API_CASES) >= 25


def test_budget_one_byte_below_the_minimum_is_refused_and_the_minimum_taken(tiny_path, tmp_path):
    """The minimum working set the plan names is exact: one byte less is refused before any weight is
    loaded, with that minimum in the message; the minimum itself runs, every layer on the direct path."""
    from dualblade.sizes import format_size

    minimum = min_budget(tiny_path, 1024, "direct")
    kw = {"n_ctx": 1024, "kv_policy": "direct", "kv_dir": str(tmp_path), "verbose": False}
    with pytest.raises(BudgetError, match=r"minimum working set") as e:
        Llama(str(tiny_path), mem_budget=minimum - 1, **kw)
    assert f"({format_size(minimum)})" in str(e.value), str(e.value)
    llm = Llama(str(tiny_path), mem_budget=minimum, **kw)
    try:
        assert {l["path"] for l in llm.kv_stats()["layers"]} == {"direct"}
        assert llm.create_completion("Once", max_tokens=4, temperature=0)["choices"][0]["text"] is not None
    finally:
        llm.close()
