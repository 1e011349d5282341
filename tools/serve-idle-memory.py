#!/usr/bin/env python3
"""What a burst of requests leaves in `dualblade serve`'s memory once it is idle again, and where: the bursts of
tests/test_serve.py::test_memory_goes_back_to_idle_after_a_burst (2 requests, then 24 from 4 clients), repeated,
with RssAnon after each and, where it grew, the anonymous mappings (/proc/PID/smaps) that grew most. Found the
worker's malloc arena behind that test's flakes (heap.fix_malloc_thresholds).
    .venv/bin/python tools/serve-idle-memory.py [TRIALS]      (after pip install '.[test]', from the repo root)
"""
import pathlib
import re
import sys
import tempfile
import threading
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from test_serve import BUDGET, Server, _model_id  # noqa: E402

from dualblade.models import bundled_model_path  # noqa: E402


def anon_by_mapping(pid: int) -> dict:
    out, cur = {}, None
    for line in open(f"/proc/{pid}/smaps"):
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            parts = line.split()
            cur = (parts[0].split("-")[0], parts[5] if len(parts) > 5 else "[anon]")  # by start address
        elif line.startswith("Anonymous:"):
            out[cur] = int(line.split()[1])
    return out


def main(trials: int) -> None:
    model_path = bundled_model_path()
    for trial in range(trials):
        s = Server("--queue", "4", *BUDGET, tmp=pathlib.Path(tempfile.mkdtemp()))
        model = _model_id(model_path)

        def burst(numbers):
            todo = list(numbers)

            def client():
                while todo:
                    n = todo.pop()
                    body = {"model": model, "messages": [{"role": "user", "content": f"Question {n}: name a fruit."}],
                            "max_tokens": 8 + n % 17, "temperature": 0.7, "seed": n, "stream": n % 2 == 0}
                    while s.request("POST", "/v1/chat/completions", body)[0] == 503:
                        time.sleep(0.2)

            threads = [threading.Thread(target=client) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        def settled():
            s.wait_for(lambda st: st["server"]["released_after_requests"] == st["server"]["requests"], "idle")
            return s.rss_anon(), anon_by_mapping(s.proc.pid)

        try:
            burst([0, 1])
            idle, before = settled()
            burst(range(2, 26))
            after, later = settled()
        finally:
            s.stop()
        print(f"trial {trial}: {(after - idle) / 2**20:+.2f} MiB of RssAnon after the burst", flush=True)
        if after - idle > 1.5 * 2**20:
            grew = sorted(((later.get(k, 0) - before.get(k, 0), k) for k in set(before) | set(later)), reverse=True)
            for kib, (start, name) in grew[:4]:
                print(f"    {kib:+d} KiB  {name} at {start} ({before.get((start, name))} -> {later.get((start, name))} KiB)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)
