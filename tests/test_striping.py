"""The KV striped over several members (issue 23, part 1): several directories or real loop devices give the
all-in-RAM run's tokens and logits, bit for bit, on every path; kv_stats() reports the members and their shares; a
session moves between a striped store and a single one; a bad member is refused naming it, before anything is
written; a member failing mid-decode is the same clean KVIOError as a single store's fault; the CLI takes A,B."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
from contextlib import closing

import numpy as np
import pytest

from conftest import (TINY_DIRECT_CTX, assert_user_error, device_header, init_ext4, last_logits, min_budget,
                      no_traceback, prompt_tokens, read_block0, run_cli, tiny_direct, tiny_direct_budget)
from dualblade import ConfigError, KVIOError, Llama, StoreError
from dualblade.config import KVConfig
from dualblade.gguf_header import model_info

N_CTX = 2048
PROMPT_TOKENS = 1024
GEN_TOKENS = 48


def _dirs(tmp_path, n: int) -> list[str]:
    out = []
    for i in range(n):
        d = tmp_path / f"member{i}"
        d.mkdir()
        out.append(str(d))
    return out


def _open_kv_files() -> dict[str, int]:
    """The unnamed KV files this process holds open, by directory."""
    found: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.endswith("(deleted)"):
            d = os.path.dirname(target)
            found[d] = found.get(d, 0) + 1
    return found


@pytest.fixture
def small_stripes(monkeypatch):
    """16 KiB stripes: the tiny model's tensors (each on a 2 MiB boundary, a few hundred tokens of rows in their first
    tens of KiB) reach every member; with the default unit, larger than those rows, they would all sit on member 0."""
    monkeypatch.setenv("DUALBLADE_STRIPE_UNIT", "16384")


def _budget(path) -> int:
    """A quarter of the KV, or the direct path's minimum where that is more: most layers offloaded."""
    return max(sum(model_info(path).layer_bytes(N_CTX)) // 4, min_budget(path, N_CTX, "direct"))


def run_greedy(path, switch: bool = False, **kv) -> dict:
    """A prompt, then greedy tokens one eval at a time, every step's logits hashed bit for bit; switch: an
    offloaded layer moves between the page cache and the direct path at every step (as auto does)."""
    llm = Llama(str(path), n_ctx=N_CTX, n_batch=512, flash_attn=True, verbose=False, **kv)
    try:
        llm.eval(prompt_tokens(llm, PROMPT_TOKENS))
        offloaded = [l["layer"] for l in llm.kv_stats()["layers"] if l["path"] != "ram"]
        out, hashes = [], []
        for step in range(GEN_TOKENS):
            lg = last_logits(llm)
            hashes.append(hashlib.sha256(lg.tobytes()).hexdigest())
            tok = int(np.argmax(lg))
            out.append(tok)
            if switch:
                il = offloaded[step % len(offloaded)]
                now = {l["layer"]: l["path"] for l in llm.kv_stats()["layers"]}[il]
                llm.kv_set_path(il, "direct" if now == "mmap" else "mmap")
            llm.eval([tok])
        return {"tokens": out, "hashes": hashes, "stats": llm.kv_stats(), "files": _open_kv_files()}
    finally:
        llm.close()


@pytest.fixture(scope="module")
def ram_reference(gemma_path, tiny_path):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_greedy({"gemma": gemma_path, "tiny": tiny_path}[name], kv_policy="ram")
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("policy", ["direct", "mmap", "auto"])
def test_two_dirs_equal_ram(policy, gemma_path, tmp_path, ram_reference):
    ref = ram_reference("gemma")
    dirs = _dirs(tmp_path, 2)
    got = run_greedy(gemma_path, switch=policy == "auto", kv_policy=policy, mem_budget=_budget(gemma_path),
                     kv_dir=dirs)
    st = got["stats"]
    assert st["offloaded_bytes"] >= 0.5 * st["kv_bytes_total"]
    assert got["tokens"] == ref["tokens"]
    assert got["hashes"] == ref["hashes"]  # every step's logits, to the last bit
    # one store over both: a KV file open in each directory, each holding its share of the stripes
    assert all(got["files"].get(d) == 1 for d in dirs), got["files"]
    assert st["store"]["members"] == 2 and st["store"]["stripe_unit"] > 0
    members = st["store_members"]
    assert [m["path"] for m in members] == dirs and st["kv_dir"] == dirs
    assert all(m["kind"] == "file" and m["bytes"] > 0 for m in members)
    # shares from each member's probed read bandwidth
    assert all(m["read_bps"] and m["read_bps"] > 0 and m["share"] >= 1 for m in members)
    assert sum(m["share"] for m in members) == members[0]["n_pattern"] == members[1]["n_pattern"]
    if policy != "mmap":
        assert st["bytes_read"] > 0 and st["bytes_written"] > 0
    if policy == "auto":
        assert st["switch_count"] >= GEN_TOKENS
    for d in dirs:
        assert not os.listdir(d)  # unnamed files: nothing left behind


@pytest.mark.parametrize("model", ["gemma", "tiny"])
def test_three_dirs_uneven_shares_small_stripes_equal_ram(model, gemma_path, tiny_path, tmp_path, monkeypatch,
                                                         ram_reference):
    """Shares 1,2,1 in 64 KiB stripes: every K and V tensor crosses many stripe boundaries and all three members;
    the direct path with the page-cache path switched in and out at every step."""
    monkeypatch.setenv("DUALBLADE_STRIPE_SHARES", "1,2,1")
    monkeypatch.setenv("DUALBLADE_STRIPE_UNIT", "65536")
    path = {"gemma": gemma_path, "tiny": tiny_path}[model]
    ref = ram_reference(model)
    dirs = _dirs(tmp_path, 3)
    got = run_greedy(path, switch=True, kv_policy="direct", mem_budget=_budget(path), kv_dir=",".join(dirs))
    st = got["stats"]
    assert got["tokens"] == ref["tokens"]
    assert got["hashes"] == ref["hashes"]
    assert st["store"]["stripe_unit"] == 65536 and st["store"]["members"] == 3
    members = st["store_members"]
    assert [m["path"] for m in members] == dirs
    assert [m["share"] for m in members] == [1, 2, 1] and {m["n_pattern"] for m in members} == {4}
    assert all(m["read_bps"] is None for m in members)  # shares given: nothing probed
    # the member with two stripes a pattern holds twice the others' share of the store (at least its even split)
    assert members[1]["bytes"] >= 2 * st["store"]["bytes"] // 4
    assert all(got["files"].get(d) == 1 for d in dirs), got["files"]


def test_one_member_is_not_striped(tiny_path, tmp_path):
    with closing(tiny_direct(tiny_path, kv_dir=[str(tmp_path)])) as llm:
        st = llm.kv_stats()
        assert st["store"]["members"] == 1 and st["store"]["stripe_unit"] == 0
        assert st["store"]["path"] == str(tmp_path) and st["kv_dir"] == [str(tmp_path)]
        m, = st["store_members"]
        assert (m["path"], m["share"], m["n_pattern"], m["read_bps"]) == (str(tmp_path), 1, 1, None)


# ------------------------------------------------------------------------------------------- arguments


def test_members_given_every_way(tmp_path):
    a, b = _dirs(tmp_path, 2)
    for value in ([a, b], (a, b), f"{a},{b}", f"{a}, {b}", [tmp_path / "member0", tmp_path / "member1"]):
        assert KVConfig.from_args(None, "direct", value).kv_dir == (a, b)
    # a directory whose name has a comma is one member
    comma = tmp_path / "x,y"
    comma.mkdir()
    assert KVConfig.from_args(None, "direct", str(comma)).kv_dir == (str(comma),)
    assert KVConfig.from_args(None, "direct", a).kv_dir == (a,)


@pytest.mark.parametrize("value,words", [
    ("{a},{a}", "given twice"),
    ("{a},{a}/", "given twice"),
    ("{a},{b},{a}/../member0", "given twice"),
    ("{a},{link}", "are the same directory"),
    ("{a},,{b}", "empty entry"),
    ("{a},{missing}", "missing does not exist"),
    ("{a},{file}", "file is not a directory"),
    (",".join(["{a}"] + [f"{{d{i}}}" for i in range(8)]), "at most 8"),
])
def test_bad_members_are_refused(tmp_path, value, words):
    a, b = _dirs(tmp_path, 2)
    names = {"a": a, "b": b, "link": str(tmp_path / "link"), "missing": str(tmp_path / "missing"),
             "file": str(tmp_path / "file")}
    os.symlink(a, names["link"])
    (tmp_path / "file").write_text("x")
    for i in range(8):
        names[f"d{i}"] = str(tmp_path / f"d{i}")
        os.mkdir(names[f"d{i}"])
    with pytest.raises(ConfigError, match=words) as e:
        KVConfig.from_args(None, "direct", value.format(**names))
    assert "\n" not in str(e.value)


def test_member_list_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"kv_dir\[1\] must be a path"):
        KVConfig.from_args(None, "direct", [str(tmp_path), 7])
    with pytest.raises(ConfigError, match="empty list"):
        KVConfig.from_args(None, "direct", [])
    with pytest.raises(ConfigError, match="line break"):
        KVConfig.from_args(None, "direct", f"{tmp_path}\n{tmp_path}")


# ------------------------------------------------------------------------------------------- sessions


def _continue(llm, tokens: list[int]) -> list[str]:
    out = []
    for t in tokens:
        llm.eval([t])
        out.append(hashlib.sha256(last_logits(llm).tobytes()).hexdigest())
    return out


def test_session_moves_between_striped_and_single_stores(tiny_path, tmp_path, small_stripes):
    striped, single = _dirs(tmp_path, 2), str(tmp_path / "single")
    os.mkdir(single)
    kw = {"n_ctx": TINY_DIRECT_CTX, "flash_attn": True, "seed": 1, "verbose": False, "kv_policy": "direct",
          "mem_budget": tiny_direct_budget(tiny_path)}
    s1, s2 = str(tmp_path / "striped.dbkv"), str(tmp_path / "single.dbkv")
    with closing(Llama(str(tiny_path), kv_dir=striped, **kw)) as llm:
        toks = prompt_tokens(llm, 400)
        llm.eval(toks[:300])
        assert llm.save_session(s1)["kv_bytes"] > 0
        uninterrupted = _continue(llm, toks[300:340])
    with closing(Llama(str(tiny_path), kv_dir=single, **kw)) as llm:
        assert llm.kv_stats()["store"]["members"] == 1
        llm.load_session(s1)
        assert llm.n_tokens == 300
        assert _continue(llm, toks[300:340]) == uninterrupted
        llm.save_session(s2)  # 340 tokens, from the single store
        after_single = _continue(llm, toks[340:380])
    with closing(Llama(str(tiny_path), kv_dir=striped[::-1], **kw)) as llm:  # striped again, the other way round
        assert llm.kv_stats()["store"]["members"] == 2
        llm.load_session(s2)
        assert llm.n_tokens == 340
        assert _continue(llm, toks[340:380]) == after_single


# ------------------------------------------------------------------------------------------- raw devices

pytest_loop = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("losetup"),
                                 reason="loop devices need root and losetup")
TEXT = "Tell me a story about a king who lived in a castle by the sea. " * 20  # rows past the tail page
GEN = 12


def _complete(llm) -> str:
    return llm.create_completion(TEXT, max_tokens=GEN, temperature=0)["choices"][0]["text"]


@pytest.fixture(scope="module")
def tiny_ram_text(tiny_path):
    with closing(Llama(str(tiny_path), n_ctx=TINY_DIRECT_CTX, kv_policy="ram", flash_attn=True,
                       verbose=False)) as llm:
        return _complete(llm)


@pytest_loop
def test_two_devices_equal_ram(tiny_path, make_loop, tiny_ram_text, small_stripes):
    a, b = make_loop(64 << 20), make_loop(64 << 20)
    with closing(tiny_direct(tiny_path, kv_device=[a, b])) as llm:
        st = llm.kv_stats()
        assert all(l["path"] == "direct" for l in st["layers"])
        assert st["store"]["kind"] == "device" and st["store"]["members"] == 2
        assert st["store"]["stripe_unit"] == 16384
        assert st["kv_device"] == [a, b]
        assert [m["path"] for m in st["store_members"]] == [a, b]
        assert all(m["kind"] == "device" and m["read_bps"] > 0 for m in st["store_members"])
        assert _complete(llm) == tiny_ram_text
        assert llm.kv_stats()["bytes_read"] > 0
        llm.save_state()  # every row on the devices, tails too
        # both hold rows: the start of each member's data range is neither blank nor the bandwidth probe's pattern
        for dev in (a, b):
            head = _read_direct(dev, device_header(dev)["data_offset"], 64 << 10)
            assert head.strip(b"\x00") and head.strip(b"\x5a"), dev
    ha, hb = device_header(a), device_header(b)  # each member its own ownership header
    assert ha["uuid"] != hb["uuid"] and ha["geometry"] == hb["geometry"]
    assert ha["data_bytes"] + hb["data_bytes"] >= st["store"]["bytes"]
    # ours, same layout: taken again without force, in either order
    with closing(tiny_direct(tiny_path, kv_device=f"{b},{a}")) as llm:
        assert _complete(llm) == tiny_ram_text


def _read_direct(dev: str, off: int, n: int) -> bytes:
    buf = mmap.mmap(-1, n)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], off) == n
    finally:
        os.close(fd)
    return bytes(buf)


@pytest_loop
def test_session_moves_between_striped_and_single_devices(tiny_path, tmp_path, make_loop, small_stripes):
    """The same on raw devices: saved from two striped loop devices, resumed on one device, saved there, resumed
    on the two again (the other way round), each continuation as the uninterrupted one."""
    a, b, one = make_loop(64 << 20), make_loop(64 << 20), make_loop(64 << 20)
    kw = {"n_ctx": TINY_DIRECT_CTX, "flash_attn": True, "seed": 1, "verbose": False, "kv_policy": "direct",
          "mem_budget": tiny_direct_budget(tiny_path)}
    s1, s2 = str(tmp_path / "striped.dbkv"), str(tmp_path / "single.dbkv")
    with closing(Llama(str(tiny_path), kv_device=[a, b], **kw)) as llm:
        toks = prompt_tokens(llm, 400)
        llm.eval(toks[:300])
        llm.save_session(s1)
        uninterrupted = _continue(llm, toks[300:340])
    with closing(Llama(str(tiny_path), kv_device=one, **kw)) as llm:
        assert llm.kv_stats()["store"]["members"] == 1 and llm.kv_stats()["store"]["kind"] == "device"
        llm.load_session(s1)
        assert _continue(llm, toks[300:340]) == uninterrupted
        llm.save_session(s2)
        after_single = _continue(llm, toks[340:380])
    with closing(Llama(str(tiny_path), kv_device=[b, a], **kw)) as llm:
        llm.load_session(s2)
        assert llm.n_tokens == 340
        assert _continue(llm, toks[340:380]) == after_single


@pytest_loop
@pytest.mark.skipif(not shutil.which("mkfs.ext4"), reason="mkfs.ext4 is not installed")
def test_member_with_a_file_system_is_refused_before_anything_is_written(tiny_path, make_loop):
    blank, ext4 = make_loop(64 << 20), make_loop(64 << 20, init=init_ext4)
    before = read_block0(ext4)
    for order in ([blank, ext4], [ext4, blank]):
        with pytest.raises(StoreError, match=f"KV device {ext4} holds an ext2/3/4 file system; refusing"):
            tiny_direct(tiny_path, kv_device=order)
    assert read_block0(ext4) == before
    assert read_block0(blank) == bytes(4096)  # not claimed: the other member was refused first
    with closing(tiny_direct(tiny_path, kv_device=[blank, ext4], kv_force=True)) as llm:
        assert llm.kv_stats()["store"]["members"] == 2
    assert device_header(ext4)["geometry"] == device_header(blank)["geometry"]


@pytest_loop
def test_same_device_twice_is_refused(tiny_path, make_loop, tmp_path):
    a = make_loop(64 << 20)
    with pytest.raises(ConfigError, match=f"{a} is given twice as a KV member; give each once"):
        tiny_direct(tiny_path, kv_device=[a, a])
    link = tmp_path / "same"
    os.symlink(a, link)
    with pytest.raises(ConfigError, match="are the same device, given twice"):
        tiny_direct(tiny_path, kv_device=[a, str(link)])
    assert read_block0(a) == bytes(4096)


@pytest_loop
def test_too_small_member_is_refused_naming_it(tiny_path, make_loop):
    big, small = make_loop(64 << 20), make_loop(2 << 20)
    with pytest.raises(StoreError, match=f"KV device {small} is too small"):
        tiny_direct(tiny_path, kv_device=[big, small])
    assert read_block0(big) == bytes(4096)


# ------------------------------------------------------------------------------------------- faults


def _fault(monkeypatch, spec: str) -> None:
    monkeypatch.setenv("DUALBLADE_FAULT", spec)
    monkeypatch.delenv("DUALBLADE_IO_ENGINE", raising=False)


def test_member_failing_mid_decode_is_a_clean_kv_io_error(tiny_path, tmp_path, monkeypatch, tiny_ram_text,
                                                          small_stripes):
    dirs = _dirs(tmp_path, 2)
    _fault(monkeypatch, "read:3+:eio@1")  # every read of member 1 from the third transfer on
    llm = tiny_direct(tiny_path, kv_dir=dirs)
    try:
        with pytest.raises(KVIOError, match="Input/output error") as e:
            _complete(llm)
        assert "reset()" in str(e.value) and "reading layer" in e.value.detail
        assert f"from {dirs[1]} (member 2 of 2) failed" in e.value.detail  # the member that failed, named
        assert llm.kv_stats()["io_errors"] >= 1
        with pytest.raises(KVIOError):  # sticky until reset
            _complete(llm)
        with pytest.raises(KVIOError):
            llm.save_state()
        llm.reset()
        with pytest.raises(KVIOError):  # the member still fails
            _complete(llm)
    finally:
        llm.close()
    monkeypatch.delenv("DUALBLADE_FAULT")
    with closing(tiny_direct(tiny_path, kv_dir=dirs)) as llm:  # a fresh context, the member working again
        assert _complete(llm) == tiny_ram_text


@pytest_loop
def test_a_member_that_vanishes_mid_decode_is_a_clean_kv_io_error(tiny_path, make_loop, small_stripes):
    """A real device going away: member 1's loop device shrinks to nothing between decode steps (its image
    truncated, `losetup -c`), so its reads end at once. The next step raises the clean KVIOError, sticky until
    reset; member 0 is written nowhere outside the range its header gives us."""
    import subprocess

    a, b = make_loop(64 << 20), make_loop(64 << 20)
    end = 64 << 20
    tail = os.urandom(1 << 20)  # member 0's last MiB: the user's, beyond our reservation
    fd = os.open(a, os.O_WRONLY)
    try:
        os.pwrite(fd, tail, end - len(tail))
        os.fsync(fd)
    finally:
        os.close(fd)
    llm = tiny_direct(tiny_path, kv_device=[a, b])
    try:
        assert device_header(a)["data_offset"] + device_header(a)["data_bytes"] <= end - len(tail)
        toks = prompt_tokens(llm, 300)
        llm.eval(toks)
        llm.eval([int(np.argmax(last_logits(llm)))])
        img = subprocess.run(["losetup", "-nO", "BACK-FILE", b], capture_output=True, text=True).stdout.strip()
        os.truncate(img, 0)
        subprocess.run(["losetup", "-c", b], check=True)
        with pytest.raises(KVIOError) as e:
            for _ in range(4):
                llm.eval([int(np.argmax(last_logits(llm)))])
        assert "reset()" in str(e.value) and "reading layer" in e.value.detail, e.value.detail
        assert f"{b} (member 2 of 2)" in e.value.detail  # the drive that went away, named
        with pytest.raises(KVIOError):  # sticky
            llm.eval([1])
    finally:
        import warnings

        with warnings.catch_warnings():  # the vanished member cannot discard what it held: said, and expected
            warnings.simplefilter("ignore")
            llm.close()
    fd = os.open(a, os.O_RDONLY)
    try:
        assert os.pread(fd, len(tail), end - len(tail)) == tail
    finally:
        os.close(fd)


def test_fault_of_another_member_touches_nothing(tiny_path, tmp_path, monkeypatch, tiny_ram_text, small_stripes):
    """@M selects the member: a rule for a member the store does not have never fires, so the rule above failed
    member 1's transfers and no other's."""
    _fault(monkeypatch, "read:1+:eio@2,write:1+:eio@2")
    with closing(tiny_direct(tiny_path, kv_dir=_dirs(tmp_path, 2))) as llm:
        assert _complete(llm) == tiny_ram_text
        assert llm.kv_stats()["io_errors"] == 0


# ------------------------------------------------------------------------------------------- CLI


def test_info_checks_and_lists_the_members(tiny_path, tmp_path):
    a, b = _dirs(tmp_path, 2)
    p = run_cli("info", str(tiny_path), "-c", "1024", "--json", "--kv-dir", f"{a},{b}", timeout=120)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    store = json.loads(p.stdout)["store"]
    assert store["kind"] == "file" and not store["probed"]
    assert [m["path"] for m in store["members"]] == [a, b]
    assert not os.listdir(a) and not os.listdir(b)  # checked, nothing written

    p = run_cli("info", str(tiny_path), "-c", "1024", "--kv-dir", f"{a},{b}", "--probe",
                "--mem-budget", str(min_budget(tiny_path, 1024)), "--policy", "direct", timeout=120)
    no_traceback(p)
    assert p.returncode == 0, p.stderr
    assert "KV store: 2 file members for the plan's offloaded layers" in p.stdout, p.stdout
    rows = [l for l in p.stdout.splitlines() if a in l or b in l]
    assert len(rows) == 2 and all(re.search(r" \(\d+/\d+ of the stripes, \d+\.\d\d GB/s read\)", r) for r in rows), \
        p.stdout

    p = run_cli("info", str(tiny_path), "-c", "1024", "--json", "--probe", "--kv-dir", f"{a},{b}",
                env={"DUALBLADE_STRIPE_SHARES": "3,1"}, timeout=120)
    store = json.loads(p.stdout)["store"]
    assert store["probed"] and [(m["share"], m["n_pattern"]) for m in store["members"]] == [(3, 4), (1, 4)]


@pytest.mark.parametrize("args,word", [
    (("--kv-dir", "{a},{missing}"), "KV directory {missing} does not exist"),
    (("--kv-dir", "{a},{a}"), "{a} is given twice as a KV member"),
    (("--kv-dir", "{a},{file}"), "KV directory {file} is not a directory"),
    (("--kv-device", "{a},{file}"), "KV device {a} is not a block device"),
    (("--kv-dir", "{a},{b}", "--kv-device", "/dev/null"), "--kv-dir and --kv-device were both given"),
    (("--kv-dir", "{a},/dev/shm"), "tmpfs"),
    (("--probe",), "--probe opens the store in a --kv-dir"),
])
def test_info_bad_member_is_one_line(tiny_path, tmp_path, args, word):
    a, b = _dirs(tmp_path, 2)
    (tmp_path / "file").write_text("x")
    names = {"a": a, "b": b, "missing": str(tmp_path / "missing"), "file": str(tmp_path / "file")}
    p = run_cli("info", str(tiny_path), "-c", "1024", *(x.format(**names) for x in args), timeout=120)
    assert_user_error(p, word.format(**names))


@pytest.mark.parametrize("cmd", ["chat", "serve"])
def test_chat_and_serve_bad_member_is_one_line(tiny_path, tmp_path, cmd):
    a, b = _dirs(tmp_path, 2)
    p = run_cli(cmd, str(tiny_path), "-c", "1024", "-n", "16", "--mem-budget", "1M", "--policy", "direct",
                "--kv-dir", f"{a},{b},{a}", input="", timeout=120)
    assert_user_error(p, f"{a} is given twice as a KV member; give each once")
    p = run_cli(cmd, str(tiny_path), "-c", "1024", "-n", "16", "--mem-budget", "1M", "--policy", "direct",
                "--kv-dir", f"{a},{tmp_path / 'gone'}", input="", timeout=120)
    assert_user_error(p, f"KV directory {tmp_path / 'gone'} does not exist; create it or give another --kv-dir")


@pytest_loop
def test_info_checks_devices_writing_nothing_and_will_not_probe_them(tiny_path, make_loop):
    a, b = make_loop(64 << 20), make_loop(64 << 20)
    p = run_cli("info", str(tiny_path), "-c", "1024", "--json", "--kv-device", f"{a},{b}", timeout=120)
    assert p.returncode == 0, p.stderr
    assert [m["path"] for m in json.loads(p.stdout)["store"]["members"]] == [a, b]
    assert read_block0(a) == read_block0(b) == bytes(4096)
    assert_user_error(run_cli("info", str(tiny_path), "-c", "1024", "--kv-device", f"{a},{b}", "--probe",
                              timeout=120), "--probe would write")
    assert_user_error(run_cli("info", str(tiny_path), "-c", "1024", "--kv-device", f"{a},{a}", timeout=120),
                      f"{a} is given twice")


def test_chat_with_two_dirs_answers_as_ram(tiny_path, tmp_path):
    a, b = _dirs(tmp_path, 2)
    base = ("chat", str(tiny_path), "-c", "1024", "-n", "16", "--temp", "0", "--seed", "1", "--flash-attn")
    ram = run_cli(*base, "--policy", "ram", input="Hello there\n", timeout=240)
    assert ram.returncode == 0, ram.stderr
    got = run_cli(*base, "--policy", "direct", "--mem-budget", str(min_budget(tiny_path, 1024)),
                  "--kv-dir", f"{a},{b}", "--verbose", input="Hello there\n", timeout=240)
    no_traceback(got)
    assert got.returncode == 0, got.stderr
    assert got.stdout == ram.stdout and got.stdout.strip()
    assert f"on file {a}, {b}" in got.stderr, got.stderr
    assert re.search(rf"KV striped in \d+\.\d+ [KM]iB stripes: {re.escape(a)} \(\d+/\d+ of the stripes, \d+\.\d\d GB/s "
                     rf"read\); {re.escape(b)} \(", got.stderr), got.stderr


def test_bench_probes_every_member_and_runs_striped(tmp_path):
    a, b = _dirs(tmp_path, 2)
    out = tmp_path / "bench.json"
    p = run_cli("bench", "--synthetic", "tiny", "-c", "1024", "-p", "64", "-n", "2", "-r", "1", "--budgets", "40%",
                "--policies", "ram,direct", "--kv-dir", f"{a},{b}", "--probe-size", "32M", "--no-cgroup",
                "--json", str(out), timeout=600)
    no_traceback(p)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["location"]["path"] == f"{a}, {b}" and [m["path"] for m in res["location"]["members"]] == [a, b]
    members = res["probe"]["members"]
    assert [m["path"] for m in members] == [a, b] and all(m["read_gib_s"] > 0 for m in members)
    assert res["probe"]["bytes"] == sum(m["bytes"] for m in members)
    assert f"device probe ({a}, {b})" in p.stdout and "all members read at once" in p.stdout
    direct = next(r for r in res["rows"] if r["policy"] == "direct")
    assert direct["status"] == "ok" and direct["tokens_equal_ram"] is True, (direct, res["ram_reference"], p.stderr)
    assert not os.listdir(a) and not os.listdir(b)


def test_bench_stripes_compares_one_two_and_three_members(tmp_path):
    """bench --stripes: the first 1, 2 and all 3 members, each against one, exact against all in RAM (here on
    one disk, unthrottled: the figures mean nothing, the shape and the exactness do)."""
    dirs = _dirs(tmp_path, 3)
    out = tmp_path / "stripes.json"
    p = run_cli("bench", "--stripes", "--synthetic", "tiny", "-c", "1024", "-p", "200", "-n", "4", "-r", "1",
                "--budgets", "40%", "--kv-dir", ",".join(dirs), "--no-cgroup", "--json", str(out), timeout=600,
                env={"DUALBLADE_STRIPE_UNIT": "16384"})
    no_traceback(p)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["mode"] == "stripes" and res["members"] == dirs and res["workload"]["policy"] == "direct"
    assert [r["members"] for r in res["rows"]] == [1, 2, 3]
    for r in res["rows"]:
        assert r["status"] == "ok" and r["tokens_equal_ram"] is True, r
        assert len(r["store_members"]) == r["members"] and r["decode_bytes_read_per_token"] > 0
        assert r["target"] == pytest.approx(0.85 * r["members"])
    assert res["rows"][0]["vs_one"] == 1.0 and "x one" in p.stdout
    assert not any(os.listdir(d) for d in dirs)


@pytest.mark.parametrize("args, word", [
    (["--kv-dir", "/tmp"], "two or more"),
    (["--kv-dir", "/tmp,/var/tmp", "--policies", "ram"], "storage policy"),
    (["--kv-dir", "/tmp,/var/tmp", "--gpu"], "--stripes measures striping on its own"),
])
def test_bench_stripes_bad_options(args, word):
    assert_user_error(run_cli("bench", "--stripes", "--synthetic", "tiny", "--no-cgroup", *args, timeout=120), word)
