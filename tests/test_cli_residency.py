"""The CLI's KV flags do what they say: same answers, real placement in /stats."""
import re

from conftest import run_cli

QUESTIONS = "What is the capital of France?\nAnd of Italy?\nWhich one is larger?\n"
# Gemma at -c 2048: 36 MiB of KV, a minimum working set of about 4 MiB; 12M is far from both: some
# layers pinned, the rest offloaded. At -c 32768 the minimum is about 64 MiB: 4M is far below it.


def test_direct_policy_chat_equals_ram(tmp_path):
    # offloaded layers run with flash attention: so does the reference
    ram = run_cli("chat", "-c", "2048", "-n", "24", "--temp", "0", "--policy", "ram", "--flash-attn", input=QUESTIONS)
    assert ram.returncode == 0, ram.stderr
    for policy in ("direct", "mmap"):
        off = run_cli("chat", "-c", "2048", "-n", "24", "--temp", "0", "--policy", policy, "--mem-budget", "12M",
                      "--kv-dir", str(tmp_path), input=QUESTIONS)
        assert off.returncode == 0, off.stderr
        assert off.stdout == ram.stdout  # three turns: multi-turn history with prefix reuse, same tokens
        assert len(off.stdout.strip().splitlines()) >= 3


def test_stats_show_real_placement(tmp_path):
    r = run_cli("chat", "-c", "2048", "-n", "8", "--temp", "0", "--policy", "direct", "--mem-budget", "12M",
                "--kv-dir", str(tmp_path), input="Hello\n/stats\n")
    assert r.returncode == 0, r.stderr
    rows = re.findall(r"^\s*\S?\s*(\d+)\s*\S?\s*(ram|direct|mmap)\b", r.stderr, re.M)
    paths = {p for _, p in rows}
    assert len(rows) == 18 and paths == {"ram", "direct"}
    # what the direct path runs on, said as it is: the engine and why, and staging reused from a pool
    engine = re.search(r"^I/O: (\S+) \(([^)]*)\)", r.stderr, re.M)
    assert engine and engine[1] in ("io_uring", "threads") and engine[2], r.stderr
    assert re.search(r"^staging: .* pool in .* chunks, (reused|faulted in per pass)", r.stderr, re.M), r.stderr
    # chat does not nag about flash attention it switched on (it says so with -v)
    assert "FlashAttention" not in r.stderr and "flash attention switched on" not in r.stderr


def test_verbose_says_where_the_kv_is(tmp_path):
    r = run_cli("chat", "-v", "-c", "2048", "-n", "4", "--temp", "0", "--policy", "direct", "--mem-budget", "12M",
                "--kv-dir", str(tmp_path), input="Hi\n")
    assert r.returncode == 0, r.stderr
    assert "offloaded on file" in r.stderr and "flash attention: on" in r.stderr


def test_budget_below_minimum_is_one_line(tmp_path):
    r = run_cli("chat", "-c", "32768", "--policy", "direct", "--mem-budget", "4M", "--kv-dir", str(tmp_path), input="")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualblade: error:") and "minimum working set" in lines[0]
    assert "Traceback" not in r.stderr
