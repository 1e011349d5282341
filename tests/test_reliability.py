"""Reliability on real components: SIGKILL mid-prefill and mid-decode leaves nothing behind (KV dir,
device header, cgroup) and the next run answers; a memory spike in the same cgroup makes `auto`
demote to the direct path instead of dying; a long soak keeps counters, fds and RSS steady."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import device_header, dualblade_exe, min_budget, run_cli
from dualblade.bench import cgroup
from dualblade.gguf_header import model_info

MiB = 1 << 20
PROBE = str(Path(__file__).parent / "reliability_probe.py")
SENTENCE = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat "
QUESTION = "What is the capital of France?\n"
N_CTX = 4096  # kv-heavy at 4096: 128 MiB of KV, 8 MiB a layer


def _fs_type(path: Path) -> str:
    """The file system type of path, from /proc/self/mountinfo (longest mount point that holds it)."""
    best, fstype = "", "?"
    real = os.path.realpath(path)
    for line in open("/proc/self/mountinfo"):
        left, right = line.split(" - ", 1)
        mnt = left.split()[4].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, right.split()[0]
    return fstype


@pytest.fixture
def kv_dir(tmp_path):
    """An empty KV directory on a disk file system (tmp_path, unless that is tmpfs)."""
    d = tmp_path / "kv"
    made = None
    if _fs_type(tmp_path) in ("tmpfs", "ramfs"):
        base = Path.home() / ".cache" / "dualblade"
        base.mkdir(parents=True, exist_ok=True)
        made = d = Path(tempfile.mkdtemp(prefix="test-kv-", dir=base))
        if _fs_type(d) in ("tmpfs", "ramfs"):
            pytest.skip(f"no disk file system for a KV dir: {tmp_path} and {base} are on tmpfs")
    d.mkdir(exist_ok=True)
    yield d
    if made:
        shutil.rmtree(made, ignore_errors=True)


# ------------------------------------------------------------------------------------------- helpers


def _io(pid: int) -> dict:
    return {k: int(v) for k, v in (l.split(": ") for l in open(f"/proc/{pid}/io").read().splitlines())}


def _fd_links(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


@contextlib.contextmanager
def _child_cgroup():
    """A fresh child memory cgroup (limit 4 GiB, far from binding) to run a killed process in; yields its
    directory, or None where cgroups cannot be made here."""
    if cgroup.available() is not None:
        yield None
        return
    with cgroup.child(4 << 30) as (group, _):
        yield group


def _chat_args(model, policy, store: list[str], n_tokens: int) -> list[str]:
    """The chat's arguments: the minimum budget, every layer offloaded."""
    return ["chat", str(model), "-c", str(N_CTX), "-n", str(n_tokens), "--temp", "0", "--seed", "1", "--no-stats",
            "--policy", policy, "--mem-budget", str(min_budget(model, N_CTX)), *store]


def _kill_mid(phase: str, model: Path, policy: str, store: list[str], tmp_path: Path, group: Path | None) -> dict:
    """Runs a pipe chat and SIGKILLs it mid-prefill (a ~3200-token prompt: once it has written 24 MiB of KV
    and printed nothing) or mid-decode (once the reply has started, long before its 400 tokens).
    Returns what was seen at the kill."""
    if phase == "prefill":
        line, n_tokens = SENTENCE * 160, 64
    else:
        line, n_tokens = SENTENCE * 30, 400
    out_path, err_path = tmp_path / f"{phase}.out", tmp_path / f"{phase}.err"
    cmd = [dualblade_exe(), *_chat_args(model, policy, store, n_tokens)]
    if group is not None:  # join the group before exec: the process and its io_uring workers are in it
        cmd = cgroup.joined(group, cmd)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=err)
    seen = {}
    try:
        p.stdin.write((line + "\n").encode())
        p.stdin.flush()  # stdin stays open: the chat never ends on its own by reaching EOF
        deadline = time.monotonic() + 120
        while True:
            if p.poll() is not None:
                pytest.fail(f"the chat ended (rc {p.returncode}) before the {phase} kill: "
                            f"{err_path.read_text()[-2000:]}")
            assert time.monotonic() < deadline, f"no {phase} within 120 s: {err_path.read_text()[-2000:]}"
            io, n_out = _io(p.pid), out_path.stat().st_size
            if (phase == "prefill" and io["write_bytes"] >= 24 * MiB) or (phase == "decode" and n_out >= 32):
                seen = {"io": io, "fds": _fd_links(p.pid), "kv_dir_listing": None}
                if "--kv-dir" in store:
                    seen["kv_dir_listing"] = sorted(os.listdir(store[store.index("--kv-dir") + 1]))
                os.kill(p.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == -signal.SIGKILL, rc
    seen["out"] = out_path.read_text(errors="replace")
    seen["err"] = err_path.read_text(errors="replace")
    seen["prompt_tokens"] = len(line.split()) - 1  # a lower bound: a word is at least one token
    return seen


def _assert_cgroup_left_clean(group: Path | None) -> None:
    if group is None:
        return
    for _ in range(100):  # the kernel reaps the process and its I/O workers
        if not cgroup.members(group):
            break
        time.sleep(0.1)
    assert cgroup.members(group) == [], f"processes left in {group} after SIGKILL: {cgroup.members(group)}"
    group.rmdir()  # an empty group goes: nothing left behind
    assert not group.exists()


@pytest.fixture(scope="module")
def reference_answer(heavy_path):
    """The answer to QUESTION with every layer in RAM (with flash attention, as offloaded layers have)."""
    p = run_cli("chat", str(heavy_path), "-c", str(N_CTX), "-n", "16", "--temp", "0", "--seed", "1", "--no-stats",
                "--policy", "ram", "--flash-attn", input=QUESTION, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip(), p.stdout
    return p.stdout


def _answers_cleanly(model, policy, store, reference):
    p = run_cli(*_chat_args(model, policy, store, 16), input=QUESTION, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "error" not in p.stderr.lower(), p.stderr
    assert p.stdout == reference  # token-identical to the all-in-RAM run


# -------------------------------------------------------------------------------- 1. SIGKILL, KV dir


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("policy", ["direct", "mmap"])
def test_sigkill_leaves_no_kv_file_and_next_run_answers(heavy_path, reference_answer, kv_dir, tmp_path, policy,
                                                       phase):
    kv_bytes_per_token = sum(model_info(heavy_path).layer_bytes(N_CTX)) // N_CTX
    with _child_cgroup() as group:
        seen = _kill_mid(phase, heavy_path, policy, ["--kv-dir", str(kv_dir)], tmp_path, group)
        # the kill really came in the phase
        if phase == "prefill":
            assert seen["out"] == "", seen["out"]  # not a token yet
            # the prompt's KV is written as the prefill goes: a part of it, not all
            assert 24 * MiB <= seen["io"]["write_bytes"] < seen["prompt_tokens"] * kv_bytes_per_token // 2, seen["io"]
        else:
            assert seen["out"].strip() and not seen["out"].endswith("\n"), seen["out"]  # a reply, unfinished
        # the KV file was open in kv_dir, unnamed: nothing to see there even while it ran
        kv_files = [l for l in seen["fds"] if l.startswith(f"{kv_dir}/")]
        assert kv_files and all(l.endswith("(deleted)") for l in kv_files), seen["fds"]
        assert seen["kv_dir_listing"] == []
        assert "Traceback" not in seen["err"], seen["err"]
        _assert_cgroup_left_clean(group)
    assert sorted(os.listdir(kv_dir)) == []  # no KV file, no .dualblade-kv-* name
    _answers_cleanly(heavy_path, policy, ["--kv-dir", str(kv_dir)], reference_answer)
    assert sorted(os.listdir(kv_dir)) == []
    print(f"\n{policy} killed mid-{phase}: write_bytes {seen['io']['write_bytes'] / MiB:.0f} MiB, "
          f"{len(seen['out'])} bytes of reply, cgroup {'checked' if group else 'not available'}")


# -------------------------------------------------------------------------------- 1. SIGKILL, device


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_sigkill_keeps_the_device_header_and_next_run_takes_it(heavy_path, reference_answer, make_loop, tmp_path,
                                                             phase):
    loop_device = make_loop(192 * MiB)  # 1 MiB of header area + 128 MiB of KV, sparse (skips without loop devices)
    kv_bytes_per_token = sum(model_info(heavy_path).layer_bytes(N_CTX)) // N_CTX
    store = ["--kv-device", loop_device]
    with _child_cgroup() as group:
        seen = _kill_mid(phase, heavy_path, "direct", store, tmp_path, group)
        if phase == "prefill":
            assert seen["out"] == ""
            assert 24 * MiB <= seen["io"]["write_bytes"] < seen["prompt_tokens"] * kv_bytes_per_token // 2, seen["io"]
        else:
            assert seen["out"].strip() and not seen["out"].endswith("\n"), seen["out"]
        assert loop_device in seen["fds"], seen["fds"]  # the KV was on the device
        _assert_cgroup_left_clean(group)
    h = device_header(loop_device)
    kv_total = sum(model_info(heavy_path).layer_bytes(N_CTX))
    assert h["device_bytes"] == 192 * MiB and h["data_bytes"] >= kv_total - 32 * MiB, h
    # ours, same layout: taken again without --force (a refusal is an error on stderr and rc != 0)
    _answers_cleanly(heavy_path, "direct", store, reference_answer)
    h2 = device_header(loop_device)
    assert {k: v for k, v in h2.items() if k != "uuid"} == {k: v for k, v in h.items() if k != "uuid"}
    print(f"\ndevice killed mid-{phase}: write_bytes {seen['io']['write_bytes'] / MiB:.0f} MiB, {len(seen['out'])} "
          f"bytes of reply; header valid (CRC-32C), data {h['data_bytes'] / MiB:.0f} MiB at {h['data_offset']}, "
          f"taken again without --force")


# ----------------------------------------------------------------------- 2. a memory spike under auto


def _spike_run(model, n_prompt, n_decode, budget, kv_dir, spike_mib, spike_at, limit):
    args = [sys.executable, PROBE, "spike", str(model), str(N_CTX), str(n_prompt), str(n_decode), str(budget),
            str(kv_dir), str(spike_mib), str(spike_at)]
    r = cgroup.run_limited(args, limit, timeout=300)
    res = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
    if res is not None:  # the probe ran in a child cgroup of its own, and that is gone
        assert res["cgroup"] and Path(res["cgroup"]).name.startswith("dualblade-"), res["cgroup"]
        assert not os.path.exists(res["cgroup"]), f"cgroup {res['cgroup']} left behind"
    return r, res


@pytest.mark.skipif(cgroup.available() is not None, reason=f"no memory cgroup: {cgroup.available()}")
def test_memory_spike_in_the_cgroup_demotes_to_direct(heavy_path, tmp_path):
    """auto starts the offloaded layers on the page cache (the limit has room for them next to the weights);
    after 10 decode steps another process in the same cgroup touches and holds a block of anonymous memory
    that leaves the page cache too little room: auto moves layers to the direct path, nothing is OOM-killed,
    and the tokens equal those of the run without the spike."""
    n_prompt, n_decode, spike_at = 2000, 60, 10
    budget = min_budget(heavy_path, N_CTX, "auto")  # every layer offloaded
    weights = os.path.getsize(heavy_path)

    def margin(limit):  # native/src/monitor.c: dblade_auto_capacity
        return max(limit // 16, 32 * MiB)

    # calibration under a loose limit: the process's anonymous memory at the start and while decoding,
    # from the page cache room auto computed (limit - anon - weights - margin)
    loose = 2 << 30
    r, calib = _spike_run(heavy_path, n_prompt, n_decode, budget, tmp_path, 0, spike_at, loose)
    assert r.returncode == 0, r.stderr[-2000:]
    anon_start = loose - calib["start_memory"]["page_cache_room_bytes"] - weights - margin(loose)
    anon_decode = loose - calib["memory"]["page_cache_room_bytes"] - weights - margin(loose)
    assert 0 < anon_start < 512 * MiB and 0 < anon_decode < 512 * MiB, (anon_start, anon_decode, calib["memory"])
    offloaded, need = calib["offloaded_bytes"], calib["memory"]["page_cache_need_bytes"]
    assert offloaded > 64 * MiB and need > 32 * MiB, calib

    # the limit: room for every offloaded layer whole at the start, for the context's pages while decoding
    base = weights + max(anon_start + offloaded + 24 * MiB, anon_decode + need + 96 * MiB)
    limit = -(-max(base + 32 * MiB, base * 16 // 15) // MiB) * MiB
    room = limit - anon_decode - weights - margin(limit)
    spike_mib = (room - need // 4) // MiB  # leaves the page-cache layers a quarter of what they hold

    r, ref = _spike_run(heavy_path, n_prompt, n_decode, budget, tmp_path, 0, spike_at, limit)
    assert r.returncode == 0, r.stderr[-2000:]
    assert ref["start_paths"]["mmap"] > 0 and ref["start_paths"]["direct"] == 0, ref["switches"]
    assert not [s for s in ref["switches"] if s["reason"].startswith("page cache short")], ref["switches"]
    assert ref["out"] == calib["out"]
    ref_peak = r.peak_bytes

    r, res = _spike_run(heavy_path, n_prompt, n_decode, budget, tmp_path, spike_mib, spike_at, limit)
    assert r.returncode == 0 and not r.oom_killed, (r.returncode, r.oom_killed, r.stderr[-2000:])
    assert r.peak_bytes <= limit
    assert res["alloc_alive"] and res["alloc_ok"] and res["alloc_rc"] == 0, res  # the allocator held it, alive
    assert res["same_cgroup"], res  # ... in the probe's cgroup
    steps, held = res["steps"], res["held_step"]
    assert held is not None and held >= spike_at and held < n_decode, held
    # on the page cache until the spike ...
    assert res["start_paths"]["direct"] == 0 and all(s["direct"] == 0 for s in steps[:spike_at + 1]), steps
    # ... demoted while the allocator holds its memory, within a few decode steps of its touching it
    first_direct = next((i for i, s in enumerate(steps) if s["direct"] > 0), None)
    assert first_direct is not None, f"no layer left the page cache: {res['switches']}"
    assert spike_at < first_direct <= held + 3, (spike_at, first_direct, held)
    assert steps[-1]["direct"] > 0 and steps[-1]["direct"] >= steps[-1]["mmap"], steps[-1]
    demotions = [s for s in res["switches"] if s["from"] == "mmap" and s["to"] == "direct" and s["layer"] is not None]
    assert demotions and all(s["reason"] for s in demotions), res["switches"]
    assert any(s["reason"].startswith("page cache short") for s in demotions), res["switches"]
    # no flapping: a spike that stays moves each layer once, in one burst while it builds up (the allocator
    # touches its memory over a few samples), and nothing comes back while it is held
    layers = [s["layer"] for s in demotions]
    assert len(layers) == len(set(layers)), res["switches"]
    assert demotions[-1]["t_s"] - demotions[0]["t_s"] < 1.0, res["switches"]
    assert not [s for s in res["switches"] if s["to"] == "mmap" and s["layer"] is not None], res["switches"]
    assert res["out"] == ref["out"]  # greedy: the same tokens with and without the spike
    print(f"\nlimit {limit / MiB:.0f} MiB (weights {weights / MiB:.0f}, anon {anon_start / MiB:.0f}/"
          f"{anon_decode / MiB:.0f}, offloaded {offloaded / MiB:.0f}, need {need / MiB:.0f}), spike {spike_mib} MiB "
          f"at step {spike_at}, held at {held}, first direct at {first_direct}; peak {r.peak_bytes / MiB:.0f} MiB "
          f"(without the spike {ref_peak / MiB:.0f}); "
          f"{len(demotions)} demotions: {sorted({s['reason'].split(':')[0] for s in demotions})}")


# ------------------------------------------------------------------------------------------ 3. soak


def test_soak_counters_fds_and_rss_stay_steady(tiny_path, kv_dir):
    """2,400 decode steps on the direct path (every layer offloaded: the minimum budget), in cycles of reset or
    prefix reuse, prefill and decode: every step's counters are consistent; once the first cycle has filled
    the context (the warm-up), no fd and no memory is leaked."""
    n_steps = 2400
    r = subprocess.run([sys.executable, PROBE, "soak", str(tiny_path), "512", str(min_budget(tiny_path, 512)),
                        str(kv_dir), str(n_steps)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["errors"] == [], res["errors"]
    assert res["steps"] == n_steps and res["resets"] >= 3 and res["prefix_reuses"] >= 3, res
    assert res["paths"]["direct"] > 0 and res["bytes_read"] > 0 and res["bytes_written"] > 0, res
    assert 0 < res["staged_max"] <= res["budget"], res
    warm = res["warm_step"]
    assert warm and n_steps - warm >= 2000, warm
    fds = {int(k): v for k, v in res["fds"].items()}
    assert all(v == fds[warm] for k, v in fds.items() if k >= warm), {k: v for k, v in fds.items() if v != fds[warm]}
    rss = {int(k): v for k, v in res["rss"].items() if int(k) >= warm}
    anon_growth = max(v["RssAnon"] for v in rss.values()) - rss[warm]["RssAnon"]
    file_growth = max(0, max(v["RssFile"] for v in rss.values()) - rss[warm]["RssFile"])
    rss_growth = max(v["VmRSS"] for v in rss.values()) - rss[warm]["VmRSS"]
    table = {k: (v["VmRSS"] >> 10, v["RssAnon"] >> 10) for k, v in rss.items()}
    assert anon_growth < 8 * MiB, table  # the heap: what a leak grows
    assert rss_growth < 8 * MiB + file_growth, table  # mapped weights may be reclaimed and come back
    assert os.listdir(kv_dir) == []
    print(f"\nsoak: {res['steps']} steps ({warm} of warm-up), {res['cycles']} cycles ({res['resets']} resets, "
          f"{res['prefix_reuses']} prefix reuses), read {res['bytes_read'] / MiB:.0f} MiB, written "
          f"{res['bytes_written'] / MiB:.0f} MiB, VmRSS {rss[warm]['VmRSS'] / MiB:.1f} -> "
          f"{rss[n_steps]['VmRSS'] / MiB:.1f} MiB (max growth {rss_growth / MiB:.2f}, anon {anon_growth / MiB:.2f} "
          f"MiB), {len(fds[warm])} fds")


def test_chat_reset_soak_repeats_the_same_answers(tiny_path, kv_dir):
    """The chat's /reset forgets the conversation: five rounds of the same three questions, /reset between
    them, give five times the same answers (greedy), on the direct path; nothing left in the KV dir."""
    questions = ["What is the capital of France?", "And of Italy?", "Tell me about Rome."]
    rounds = 5
    script = "".join("\n".join(questions) + "\n/reset\n" for _ in range(rounds))
    p = run_cli("chat", str(tiny_path), "-c", "1024", "-n", "48", "--temp", "0", "--seed", "1", "--no-stats",
                "--policy", "direct", "--mem-budget", str(min_budget(tiny_path, 1024)), "--kv-dir", str(kv_dir),
                input=script + "/stats\n", timeout=240)
    assert p.returncode == 0, p.stderr
    answers = p.stdout.splitlines()
    assert len(answers) == rounds * len(questions), p.stdout
    first = answers[: len(questions)]
    assert all(a.strip() for a in first), first
    for i in range(1, rounds):
        assert answers[i * len(questions):(i + 1) * len(questions)] == first, i
    assert p.stderr.count("conversation cleared") == rounds
    assert "direct" in p.stderr  # /stats: the layers were on the direct path
    assert os.listdir(kv_dir) == []
    # the control: without /reset the history changes the answers to the same questions
    q = run_cli("chat", str(tiny_path), "-c", "1024", "-n", "48", "--temp", "0", "--seed", "1", "--no-stats",
                "--policy", "direct", "--mem-budget", str(min_budget(tiny_path, 1024)), "--kv-dir", str(kv_dir),
                input="\n".join(questions * 2) + "\n", timeout=240)
    assert q.returncode == 0, q.stderr
    again = q.stdout.splitlines()
    assert again[: len(questions)] == first and again[len(questions):] != first, again
