#!/usr/bin/env python3
"""Benchmark of `dualblade serve` (issue 14), two parts:

resume  4 conversations whose first turn carries a ~4,000-token history, then their later turns interleaved
        (A2 B2 C2 D2 A3 ...): time to first token of each later turn, resumed from its saved KV, against the cold
        prefill of the same prompt (a server that saves nothing: the context holds another conversation, so the
        whole prompt is evaluated again); the server's memory sampled throughout; the answers compared with those
        of the same conversations run one after another in `dualblade chat` (a pipe, greedy).
load    100 requests from 8 client threads (half streaming) against a server with a small queue, in rounds: every
        request answered (200 or 503 with Retry-After, retried after it), no 5xx, no stream cut short; the
        server's memory at idle (after a warm-up request) and after each round, once it has given back what the
        requests used.

  .venv/bin/python tools/bench_serve.py [--json docs/bench-serve.json] [--model M.gguf] [--parts resume,load]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

EXE = str(Path(sys.executable).parent / "dualblade")
TOPICS = ["a lighthouse keeper on a northern island", "the history of a small mountain railway",
          "a baker who opens a shop in a busy city", "an astronomer who catalogues comets"]
FOLLOW_UPS = ["Who is the story about?", "Where does it take place?", "Give it a title."]


def history(i: int, n_words: int) -> str:
    """A first message of about n_words words (a long document to talk about), different per conversation."""
    base = (f"Here is a long story about {TOPICS[i]}. Each day began early and ended late, and the work was "
            f"never quite done. Day NUM: the weather changed, visitors came and went, and {TOPICS[i]} went on. ")
    words, day = [], 1
    while len(words) < n_words:
        words += base.replace("NUM", str(day)).split()
        day += 1
    return " ".join(words[:n_words]) + " Summarise the story in one sentence."


class Server:
    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([EXE, "serve", "--port", "0", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        while True:
            ready, _, _ = select.select([self.proc.stderr], [], [], 600)
            line = self.proc.stderr.readline() if ready else ""
            if not line:
                raise SystemExit("the server did not start: " + "".join(self.log))
            self.log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                break
        threading.Thread(target=self._drain, daemon=True).start()
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line)

    def mem(self) -> tuple[int, int]:
        """(RssAnon, RssFile) in bytes."""
        vals = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssFile"):
                    vals[k] = int(v.split()[0]) * 1024
        return vals.get("RssAnon", 0), vals.get("RssFile", 0)

    def _sample(self):
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                a, f = self.mem()
                self.samples.append((time.monotonic(), a, f))
            except OSError:
                return
            time.sleep(0.05)

    def request(self, body: dict, path: str = "/v1/chat/completions") -> tuple[int, dict, object, float | None]:
        """(status, headers, result, seconds to the first content) of one request; a stream is read to its end."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        t0 = time.perf_counter()
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders()}
        if r.status != 200 or not body.get("stream"):
            data = json.loads(r.read())
            conn.close()
            return r.status, headers, data, time.perf_counter() - t0
        text, first, usage, done = [], None, None, False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = (c.get("delta") or {}).get("content") or c.get("text") or ""
                if piece and first is None:
                    first = time.perf_counter() - t0
                text.append(piece)
        conn.close()
        return r.status, headers, {"text": "".join(text), "usage": usage, "done": done}, first

    def kv(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=900)
        conn.request("GET", "/v1/kv")
        data = json.loads(conn.getresponse().read())
        conn.close()
        return data

    def stop(self):
        self._stop.set()
        self.proc.send_signal(15)
        self.proc.wait(timeout=120)


def part_resume(args, common: list[str], out: dict) -> None:
    n_turns = 1 + args.turns
    convs = [[{"role": "user", "content": history(i, args.history_words)}] for i in range(4)]
    answers = {"saved": [[] for _ in range(4)], "cold": [[] for _ in range(4)]}
    rows = []
    for mode in ("saved", "cold"):
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            srv = Server([*common, "--session-dir", d, "--session-disk", "0" if mode == "cold" else "20G"])
            try:
                idle = srv.mem()
                msgs = [list(c[:1]) for c in convs]
                for turn in range(n_turns):
                    for i in range(4):
                        if turn > 0:
                            msgs[i] += [{"role": "assistant", "content": answers[mode][i][-1]},
                                        {"role": "user", "content": FOLLOW_UPS[(turn - 1) % len(FOLLOW_UPS)]}]
                        status, _, res, ttft = srv.request({"messages": msgs[i], "max_tokens": args.max_tokens,
                                                            "temperature": 0, "seed": 0, "stream": True,
                                                            "stream_options": {"include_usage": True}})
                        assert status == 200 and res["done"], res
                        answers[mode][i].append(res["text"])
                        u = res["usage"]
                        rows.append({"mode": mode, "conv": "ABCD"[i], "turn": turn + 1, "ttft_s": ttft,
                                     "prompt_tokens": u["prompt_tokens"],
                                     "evaluated": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"],
                                     "resumed": u["resumed_from_storage"]})
                        print(f"{mode:5} {'ABCD'[i]}{turn + 1}: prompt {u['prompt_tokens']:5} tok, evaluated "
                              f"{rows[-1]['evaluated']:5}, resumed {u['resumed_from_storage']!s:5}, first token "
                              f"{ttft:.3f} s", flush=True)
                kv = srv.kv()
                out.setdefault("resume_servers", {})[mode] = {
                    "idle_rss_anon": idle[0], "idle_rss_file": idle[1],
                    "peak_rss_anon": max(s[1] for s in srv.samples), "peak_rss_file": max(s[2] for s in srv.samples),
                    "kv_budget_bytes": kv["budget_bytes"], "kv_resident_bytes": kv["resident_bytes"],
                    "staged_peak_bytes": kv["staged_peak_bytes"], "conversations": kv["conversations"],
                    "server": kv["server"]}
            finally:
                srv.stop()
    out["resume_rows"] = rows
    later = [r for r in rows if r["mode"] == "saved" and r["turn"] > 1]
    cold_later = {(r["conv"], r["turn"]): r for r in rows if r["mode"] == "cold" and r["turn"] > 1}
    ratios = [r["ttft_s"] / cold_later[(r["conv"], r["turn"])]["ttft_s"] for r in later]
    out["resume_summary"] = {
        "cold_first_turn_ttft_s": statistics.median(r["ttft_s"] for r in rows if r["turn"] == 1),
        "later_turn_ttft_s_resumed": statistics.median(r["ttft_s"] for r in later),
        "later_turn_ttft_s_cold": statistics.median(r["ttft_s"] for r in cold_later.values()),
        "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
        "all_later_turns_resumed": all(r["resumed"] for r in later),
        "answers_saved_equal_cold": answers["saved"] == answers["cold"]}
    # the same conversations one after another in `dualblade chat` (a pipe: one answer per line)
    chat_same = []
    for i in range(4):
        lines = [convs[i][0]["content"]] + [FOLLOW_UPS[t % len(FOLLOW_UPS)] for t in range(args.turns)]
        p = subprocess.run([EXE, "chat", *common, "--temp", "0", "--seed", "0", "-n", str(args.max_tokens),
                            "--no-stats"], input="\n".join(lines) + "\n", capture_output=True, text=True,
                           timeout=1800)
        got = [line.rstrip() for line in p.stdout.splitlines()]  # the chat prints a reply as it came
        want = [a.strip().replace("\n", " ") for a in answers["saved"][i]]
        chat_same.append(got == want)
        if got != want:
            print(f"chat differs for {'ABCD'[i]}: {got!r} vs {want!r}", flush=True)
    out["resume_summary"]["answers_equal_chat"] = chat_same
    print(json.dumps(out["resume_summary"], indent=1), flush=True)


def part_load(args, common: list[str], out: dict) -> None:
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        srv = Server([*common, "--session-dir", d, "--queue", str(args.queue), "--max-tokens", "64"])
        try:
            def settled() -> dict:
                """The server's memory once it has given back what the requests used (it does so after
                IDLE_RELEASE_S without a request): RssAnon, RssFile, the direct path's staging pool (given back
                too) and the pinned KV."""
                deadline = time.monotonic() + 120
                while True:
                    kv = srv.kv()
                    if kv["server"]["released_after_requests"] == kv["server"]["requests"]:
                        break
                    if time.monotonic() > deadline:
                        raise SystemExit(f"the server did not give memory back at idle: {kv['server']}")
                    time.sleep(0.1)
                anon, file = srv.mem()
                return {"rss_anon": anon, "rss_file": file, "staging_pool": kv["staging"]["pool_bytes"],
                        "kv_resident": kv["resident_bytes"]}

            # a warm-up request of the load's kind: llama.cpp's buffers are sized by the first requests
            srv.request({"messages": [{"role": "user", "content": "Question 0: name a colour and a fruit."}],
                         "max_tokens": 32, "temperature": 0.7, "seed": 0})
            idle = settled()
            rounds = []
            for rnd in range(args.rounds):
                results, lock = [], threading.Lock()
                todo = list(range(args.requests))
                samples_from = len(srv.samples)

                def client(cid: int):
                    while True:
                        with lock:
                            if not todo:
                                return
                            n = todo.pop(0)
                        stream = n % 2 == 0
                        body = {"messages": [{"role": "user",
                                              "content": f"Question {n}: name a colour and a fruit."}],
                                "max_tokens": 16 + n % 17, "temperature": 0.7, "seed": n + rnd * 1000,
                                "stream": stream}
                        attempts, rejected = 0, 0
                        while True:
                            attempts += 1
                            try:
                                status, headers, res, _ = srv.request(body)
                            except Exception as e:  # noqa: BLE001 - counted as lost
                                status, headers, res = -1, {}, repr(e)
                            if status == 503 and "retry-after" in headers and attempts < 50:
                                rejected += 1
                                time.sleep(min(float(headers["retry-after"]), 2.0))
                                continue
                            break
                        ok = status == 200 and (res.get("done") if stream else bool(res.get("choices")))
                        with lock:
                            results.append({"n": n, "stream": stream, "status": status, "ok": bool(ok),
                                            "rejected_503": rejected})

                t0 = time.perf_counter()
                threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - t0
                peak = max(s[1] for s in srv.samples[samples_from:])
                after = settled()
                left = after["rss_anon"] - idle["rss_anon"] - (after["staging_pool"] - idle["staging_pool"])
                rounds.append({
                    "requests": args.requests, "wall_s": wall,
                    "answered_200": sum(r["status"] == 200 for r in results),
                    "complete": sum(r["ok"] for r in results),
                    "lost": args.requests - sum(r["ok"] for r in results),
                    "5xx_other_than_503": sum(500 <= r["status"] < 600 and r["status"] != 503 for r in results),
                    "answers_503_then_retried": sum(r["rejected_503"] for r in results),
                    "requests_that_met_503": sum(r["rejected_503"] > 0 for r in results),
                    "peak_rss_anon": peak, "after": after,
                    "rss_anon_above_idle": after["rss_anon"] - idle["rss_anon"],
                    "staging_pool_growth": after["staging_pool"] - idle["staging_pool"],
                    "rss_anon_above_idle_besides_the_pool": left})
                print(f"round {rnd + 1}: {rounds[-1]['complete']}/{args.requests} complete, "
                      f"{rounds[-1]['5xx_other_than_503']} 5xx, {rounds[-1]['answers_503_then_retried']} 503s; "
                      f"RssAnon idle {idle['rss_anon'] / 2**20:.1f} MiB, peak {peak / 2**20:.1f}, after "
                      f"{after['rss_anon'] / 2**20:.1f} ({(after['rss_anon'] - idle['rss_anon']) / 2**20:+.1f} MiB; "
                      f"staging pool {idle['staging_pool'] >> 20} -> {after['staging_pool'] >> 20} MiB)", flush=True)
            kv = srv.kv()
            out["load"] = {"requests": args.requests, "clients": args.clients, "queue": args.queue,
                           "rounds": rounds, "idle": idle, "server": kv["server"],
                           "kv_budget_bytes": kv["budget_bytes"], "conversations": kv["conversations"]}
            print(json.dumps({k: v for k, v in out["load"].items() if k != "rounds"}, indent=1), flush=True)
        finally:
            srv.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF (default: the bundled Gemma-3-270M)")
    ap.add_argument("--parts", default="resume,load")
    ap.add_argument("-c", "--ctx-size", type=int, default=8192)
    ap.add_argument("--mem-budget", default="16M")
    ap.add_argument("--policy", default="direct")
    ap.add_argument("--history-words", type=int, default=3350, help="first message length (3,350 words: ~4,000 tokens)")
    ap.add_argument("--turns", type=int, default=2, help="later turns per conversation")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--queue", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2, help="load rounds, the server's memory settled after each")
    ap.add_argument("--tmp", default=None, help="where session directories go (default: the system's)")
    ap.add_argument("--json", help="write every figure here")
    args = ap.parse_args()
    common = ([args.model] if args.model else []) + ["-c", str(args.ctx_size), "--policy", args.policy,
                                                      "--mem-budget", args.mem_budget]
    out = {"args": vars(args), "cpus": os.cpu_count(), "uname": " ".join(os.uname())}
    for part in args.parts.split(","):
        {"resume": part_resume, "load": part_load}[part](args, common, out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
