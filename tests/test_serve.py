"""`dualblade serve` (issue 14): a real server process on a free loopback port, driven by the openai client and
by plain HTTP. The bundled Gemma-3-270M (a base model: the transcript chat format), greedy sampling."""
from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import threading
import time

import pytest

from conftest import PROMPT_TEXT, assert_user_error, dualblade_exe, kv_written, min_budget, run_cli

openai = pytest.importorskip("openai", reason="the test extra brings the openai client: pip install '.[test]'")
pytest.importorskip("fastapi", reason="the server extra is missing: pip install '.[test]' (or '.[server]')")

N_CTX = 2048
BUDGET = ["--policy", "direct", "--mem-budget", "8M"]  # most of the KV on the direct path
GREEDY = {"temperature": 0, "seed": 0}


class Server:
    """`dualblade serve ... --port 0` in a child process; its port read from the line it prints."""

    def __init__(self, *args: str, tmp, env: dict | None = None, n_ctx: int = N_CTX):
        self.session_dir = tmp / "sessions"
        cmd = [dualblade_exe(), "serve", "--port", "0", "-c", str(n_ctx), "--session-dir", str(self.session_dir),
               "--kv-dir", str(tmp), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.log = []
        deadline = time.monotonic() + 300
        while True:
            assert time.monotonic() < deadline, "the server did not start: " + "".join(self.log)
            ready, _, _ = select.select([self.proc.stderr], [], [], 1)
            if not ready:
                assert self.proc.poll() is None, "the server exited: " + "".join(self.log)
                continue
            line = self.proc.stderr.readline()
            assert line, "the server exited: " + "".join(self.log)
            self.log.append(line)
            m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                self.port = int(m.group(1))
                break
        self.base = f"http://127.0.0.1:{self.port}/v1"

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.base, api_key=key, max_retries=0, timeout=600)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        """(status, headers, parsed JSON or text) of one plain HTTP request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        return r.status, dict(r.getheaders()), parsed

    def send(self, path: str, body: dict) -> http.client.HTTPConnection:
        """A POST sent and left open: the caller reads the answer (conn.getresponse()) or hangs up."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        return conn

    def rss_anon(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    def kv(self, headers: dict | None = None) -> dict:
        status, _, body = self.request("GET", "/v1/kv", headers=headers)
        assert status == 200, body
        return body

    def wait_for(self, pred, what: str, headers: dict | None = None) -> dict:
        """Polls /v1/kv until pred(stats) holds (a generous deadline only to fail instead of hanging)."""
        deadline = time.monotonic() + 300
        while True:
            st = self.kv(headers)
            if pred(st):
                return st
            assert time.monotonic() < deadline, f"{what}: {st['server']}"
            time.sleep(0.1)

    def stop(self) -> str:
        """Stops it with SIGTERM; returns its stderr."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return "".join(self.log) + err


@pytest.fixture(scope="module")
def server(tmp_path_factory, gemma_path):
    s = Server("--queue", "1", "--max-body", "64K", *BUDGET, tmp=tmp_path_factory.mktemp("serve"))
    yield s
    log = s.stop()
    assert "Traceback" not in log, log
    assert s.proc.returncode == 0, log


def _model_id(gemma_path) -> str:
    return gemma_path.name[: -len(".gguf")]


def _chat(client, model, messages, **kw):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=kw.pop("max_tokens", 24),
                                          **GREEDY, **kw)


# --- endpoints ---------------------------------------------------------------------------------------------------

def test_health_and_models(server, gemma_path):
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body == {"status": "ok"}
    models = server.client().models.list()
    assert [m.id for m in models.data] == [_model_id(gemma_path)]
    assert server.client().models.retrieve(_model_id(gemma_path)).id == _model_id(gemma_path)


def test_completion(server, gemma_path):
    r = server.client().completions.create(model=_model_id(gemma_path), prompt="The capital of France is",
                                           max_tokens=8, **GREEDY)
    assert r.object == "text_completion" and r.model == _model_id(gemma_path)
    assert r.choices[0].text.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens >= 5
    assert str(gemma_path) not in r.model_dump_json()  # no file path goes out


def test_chat(server, gemma_path):
    r = _chat(server.client(), _model_id(gemma_path),
              [{"role": "user", "content": "What is the capital of France?"}])
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert "Paris" in r.choices[0].message.content
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_plain(server, gemma_path):
    model = _model_id(gemma_path)
    client = server.client()
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    plain = _chat(client, model, messages).choices[0].message.content
    chunks = list(_chat(client, model, messages, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1  # include_usage: the last chunk
    # completions stream too
    prompt = "Once upon a time"
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=12, **GREEDY).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=12, stream=True, **GREEDY))
    assert streamed == plain


@pytest.mark.parametrize("name", ["gpt-4o-mini", "local"])
def test_any_model_name_is_answered_by_the_model(server, gemma_path, name):
    """As llama_cpp.server and llama-server in single-model mode: the model a client names (its own default,
    anything) is the one model, and the response echoes the name it gave."""
    client = server.client()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    served = _chat(client, _model_id(gemma_path), messages).choices[0].message.content
    r = _chat(client, name, messages)
    assert r.model == name and r.choices[0].message.content == served
    chunks = list(_chat(client, name, messages, stream=True, stream_options={"include_usage": True}))
    assert {c.model for c in chunks} == {name}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == served
    c = client.completions.create(model=name, prompt="The capital of France is", max_tokens=8, **GREEDY)
    assert c.model == name and c.choices[0].text.strip()
    assert client.models.list().data[0].id == _model_id(gemma_path)  # /v1/models still lists the one model


def test_model_left_out_is_answered_by_the_model(server, gemma_path):
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
                       ("/v1/completions", {"prompt": "Hello"})):
        for stream in (False, True):
            status, _, res = server.request("POST", path, {**body, "max_tokens": 4, "stream": stream, **GREEDY})
            assert status == 200, res
            if stream:  # server-sent events: each chunk names the served model
                chunks = [json.loads(line[len("data: "):]) for line in res.splitlines()
                          if line.startswith("data: {")]
                assert chunks and {c["model"] for c in chunks} == {_model_id(gemma_path)}
            else:
                assert res["model"] == _model_id(gemma_path) and res["choices"]


def _long_generation(model: str, stream: bool) -> dict:
    # min_tokens holds EOS off: without the disconnect it would generate 1000 tokens
    return {"model": model, "prompt": "Count: 1, 2, 3,", "max_tokens": 1000, "min_tokens": 1000, "stream": stream,
            **GREEDY}


def test_disconnect_stops_generation(server, gemma_path):
    model = _model_id(gemma_path)
    before = server.kv()["server"]
    # streaming: read a few chunks, hang up
    conn = server.send("/v1/completions", _long_generation(model, True))
    r = conn.getresponse()
    assert r.status == 200
    for _ in range(5):
        assert r.fp.readline()
    conn.sock.shutdown(2)
    conn.close()
    st = server.wait_for(lambda s: s["server"]["cancelled"] > before["cancelled"], "stream not cancelled")
    assert st["server"]["context_tokens"] < 200  # stopped long before its 1000 tokens
    # not streaming: hang up while it generates
    conn = server.send("/v1/completions", _long_generation(model, False))
    server.wait_for(lambda s: s["server"]["context_tokens"] > 20, "the generation did not start")
    conn.sock.shutdown(2)
    conn.close()
    st = server.wait_for(lambda s: s["server"]["cancelled"] > before["cancelled"] + 1, "request not cancelled")
    assert st["server"]["context_tokens"] < 600
    # the server goes on
    assert server.client().completions.create(model=model, prompt="Hello", max_tokens=2, **GREEDY).choices


@pytest.mark.slow
def test_a_disconnect_stops_a_long_prompt_within_its_batch(tmp_path_factory, heavy_path):
    """On the CPU a long prompt is one batch of several ubatches, computed layer by layer in one llama_decode. A
    client that hangs up while it is evaluated stops it within the batch (Engine.cancel -> Llama.abort_eval): the
    server does not compute the rest of the prompt first, and none of the batch's tokens stay in the context (a
    check between batches would have evaluated all of them). The next request is served."""
    s = Server(str(heavy_path), "--queue", "1", "--policy", "direct", "--mem-budget",
               str(min_budget(heavy_path, 4096, "direct")), tmp=tmp_path_factory.mktemp("abort"), n_ctx=4096)
    try:
        model = _model_id(heavy_path)
        before = s.kv()
        conn = s.send("/v1/completions", {"model": model, "prompt": PROMPT_TEXT * 90, "max_tokens": 4, **GREEDY})
        s.wait_for(lambda st: kv_written(st) > kv_written(before), "the prompt's evaluation did not start")
        conn.sock.shutdown(2)
        conn.close()
        st = s.wait_for(lambda st: st["server"]["cancelled"] > before["server"]["cancelled"], "not cancelled")
        assert st["server"]["context_tokens"] == 0, st["server"]
        assert st["server"]["prompt_tokens_evaluated"] == before["server"]["prompt_tokens_evaluated"]
        assert s.client().completions.create(model=model, prompt="Hello", max_tokens=2, **GREEDY).choices
    finally:
        log = s.stop()
    assert "Traceback" not in log, log


def test_queue_full_is_503_with_retry_after(server, gemma_path):
    model = _model_id(gemma_path)
    before = server.kv()["server"]
    running = server.send("/v1/completions", _long_generation(model, True))
    r = running.getresponse()
    assert r.status == 200 and r.fp.readline()  # it runs: the queue (1 place) is empty
    waiting = server.send("/v1/completions", {"model": model, "prompt": "Hi", "max_tokens": 2})
    server.wait_for(lambda s: s["server"]["queued"] == 1, "the second request did not queue")
    status, headers, body = server.request("POST", "/v1/completions", {"model": model, "prompt": "Hi",
                                                                         "max_tokens": 2})
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert body["error"]["code"] == "queue_full" and body["error"]["message"]
    running.sock.shutdown(2)
    running.close()
    w = waiting.getresponse()  # the waiting one is served once the first is gone
    assert w.status == 200 and json.loads(w.read())["choices"]
    waiting.close()
    st = server.kv()["server"]
    assert st["rejected_queue_full"] == before["rejected_queue_full"] + 1 and st["queued"] == 0


# --- memory ------------------------------------------------------------------------------------------------------

def test_memory_goes_back_to_idle_after_a_burst(tmp_path_factory, gemma_path):
    """A burst of requests from several clients (sampled, streaming and not) leaves the server's anonymous memory
    where it was at idle: once the queue has been empty for a while the server gives back the direct path's
    staging pool (kept while requests come), the samplers' C buffers (held by uncollected cycles) and malloc's
    free pages. Without the release, 24 requests left 20-40 MiB behind; with it, but glibc's thresholds left to
    grow (serve fixes them: heap.fix_malloc_thresholds), 2-11 MiB in about one run of four: the top of the
    worker's malloc arena, which malloc_trim leaves."""
    s = Server("--queue", "4", *BUDGET, tmp=tmp_path_factory.mktemp("memory"))
    model = _model_id(gemma_path)

    def burst(numbers: list[int]) -> None:
        todo, errors = list(numbers), []

        def client():
            while todo:
                n = todo.pop()
                body = {"model": model, "messages": [{"role": "user", "content": f"Question {n}: name a fruit."}],
                        "max_tokens": 8 + n % 17, "temperature": 0.7, "seed": n, "stream": n % 2 == 0}
                while True:
                    status, headers, res = s.request("POST", "/v1/chat/completions", body)
                    if status != 503:
                        break
                    time.sleep(0.2)
                if status != 200:
                    errors.append((status, res))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    def settled() -> tuple[int, int]:
        """(RssAnon, staging pool bytes) once the server has given memory back after the last request."""
        st = s.wait_for(lambda st: st["server"]["released_after_requests"] == st["server"]["requests"],
                        "memory not given back at idle")
        return s.rss_anon(), st["staging"]["pool_bytes"]

    try:
        burst([0, 1])  # the first requests size llama.cpp's buffers: idle is after them
        idle, pool_idle = settled()
        burst(list(range(2, 26)))
        after, pool_after = settled()
        assert s.kv()["server"]["completed"] == 26
    finally:
        log = s.stop()
    assert "Traceback" not in log, log
    assert pool_idle == pool_after == 0  # the staging pool's pages went back too
    assert after - idle < 8 << 20, (f"{(after - idle) / 2**20:.1f} MiB left after the burst (idle "
                                    f"{idle / 2**20:.1f} MiB, after {after / 2**20:.1f} MiB)")


# --- conversations on storage ------------------------------------------------------------------------------------

CONV_A = [{"role": "user", "content": "My name is Ada and I like mountains. What is the capital of France?"}]
CONV_B = [{"role": "user", "content": "Tell me about the river that runs past the old mill in the valley."}]


def test_resume_from_storage_equals_one_process_run(server, gemma_path, tmp_path):
    from dualblade import Llama

    model, client = _model_id(gemma_path), server.client()
    a1 = _chat(client, model, CONV_A)
    b1 = _chat(client, model, CONV_B)  # the context now holds B: A must come back from storage
    assert b1.usage.prompt_tokens_details.cached_tokens < 8
    a_msgs = CONV_A + [{"role": "assistant", "content": a1.choices[0].message.content},
                       {"role": "user", "content": "And what is my name?"}]
    a2 = _chat(client, model, a_msgs)
    assert a2.usage.model_dump()["resumed_from_storage"] is True
    evaluated = a2.usage.prompt_tokens - a2.usage.prompt_tokens_details.cached_tokens
    assert a2.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens
    assert evaluated <= 24, a2.usage  # the new message (and the turn markers), not the history
    assert server.kv()["server"]["resumed"] >= 1

    # the same conversation in one process, one turn after the other, with the server's settings
    llm = Llama(str(gemma_path), n_ctx=N_CTX, chat_format="transcript", kv_policy="direct", mem_budget="8M",
                kv_dir=str(tmp_path), n_threads=os.cpu_count(), verbose=False)
    try:
        kw = dict(max_tokens=24, temperature=0, seed=0, repeat_penalty=1.0)
        r1 = llm.create_chat_completion(messages=CONV_A, **kw)["choices"][0]["message"]["content"]
        r2 = llm.create_chat_completion(messages=a_msgs, **kw)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    assert (a1.choices[0].message.content, a2.choices[0].message.content) == (r1, r2)


def _size_of_one(tmp_path_factory, gemma_path) -> int:
    s = Server("--session-disk", "1G", tmp=tmp_path_factory.mktemp("measure"))
    try:
        _chat(s.client(), _model_id(gemma_path), [{"role": "user", "content": "Eve is writing a letter to a friend "
                                                   "about the sea, the hills and the weather of the last week. Say "
                                                   "one word about it."}], max_tokens=6)
        return s.kv()["conversations"]["bytes"]
    finally:
        s.stop()


def test_lru_eviction_under_quota(tmp_path_factory, gemma_path):
    one = _size_of_one(tmp_path_factory, gemma_path)
    # with flash attention (serve keeps conversations with it) a file grows with its tokens: a second turn is
    # about 1.6x a first one, so the quota holds two first turns, or a first and a second, never three
    quota = int(one * 2.8)
    s = Server("--session-disk", str(quota), tmp=tmp_path_factory.mktemp("lru"))
    try:
        model, client = _model_id(gemma_path), s.client()

        names = {1: "Ada", 2: "Brian", 3: "Carla", 4: "Dmitri"}

        def conv(i):  # different from the first token on: nothing to share but the turn marker
            return [{"role": "user", "content": f"{names[i]} is writing a letter to a friend about the sea, the "
                                                "hills and the weather of the last week. Say one word about it."}]

        def turn2(i, first):
            return conv(i) + [{"role": "assistant", "content": first.choices[0].message.content},
                              {"role": "user", "content": "And another word?"}]

        first = {i: _chat(client, model, conv(i), max_tokens=6) for i in (1, 2, 3)}  # 1 is evicted
        st = s.kv()["conversations"]
        assert st["conversations"] == 2 and st["evicted"] == 1 and st["bytes"] <= quota
        r = _chat(client, model, turn2(2, first[2]), max_tokens=6)  # 2 is used again (and superseded by 2')
        assert r.usage.model_dump()["resumed_from_storage"] is True
        _chat(client, model, conv(4), max_tokens=6)  # the least recently used (3) goes
        st = s.kv()["conversations"]
        assert st["conversations"] == 2 and st["evicted"] == 2 and st["bytes"] <= quota
        files = sorted(p.name for p in next(s.session_dir.iterdir()).iterdir())
        assert len(files) == 2 and all(re.fullmatch(r"[0-9a-f]{64}\.dbkv", f) for f in files)
        assert _chat(client, model, turn2(3, first[3]), max_tokens=6).usage.model_dump()["resumed_from_storage"] \
            is False
        assert _chat(client, model, turn2(1, first[1]), max_tokens=6).usage.model_dump()["resumed_from_storage"] \
            is False
    finally:
        log = s.stop()
    assert "Traceback" not in log, log


# --- API key -----------------------------------------------------------------------------------------------------

def test_api_key(tmp_path_factory, gemma_path):
    s = Server("--session-disk", "0", tmp=tmp_path_factory.mktemp("key"), env={"DUALBLADE_API_KEY": "s3cret-key"})
    try:
        model = _model_id(gemma_path)
        assert s.request("GET", "/health")[0] == 200  # liveness needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"},
                        {"Authorization": "Bearer s3cret-ke"}, {"Authorization": "Bearer s3cret-keyy"}):
            for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/kv", None),
                                       ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 1})):
                status, hdrs, err = s.request(method, path, body, headers=headers)
                assert status == 401 and err["error"]["code"] == "invalid_api_key", (headers, path, err)
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("s3cret-key").models.list().data[0].id == model
        assert s.client("s3cret-key").completions.create(model=model, prompt="Hi", max_tokens=1).choices
        assert s.kv({"Authorization": "Bearer s3cret-key"})["conversations"] is None  # --session-disk 0
        assert not s.session_dir.exists()
    finally:
        log = s.stop()
    assert "s3cret-key" not in log


@pytest.mark.parametrize("args, word", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--host", "192.0.2.1"], "--api-key"),
    (["--host", "::"], "--api-key"),
    (["--api-key", " "], "--api-key"),
    (["--port", "70000"], "--port"),
    (["--queue", "0"], "--queue"),
    (["--session-disk", "lots"], "--session-disk"),
    (["--max-body", "10"], "--max-body"),
    (["-c", "0"], "--ctx-size"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--mem-budget", "1M", "--policy", "ram"], "--policy ram"),
])
def test_serve_bad_options_are_one_line_errors(args, word):
    p = run_cli("serve", "--port", "0", *args, timeout=120)
    assert_user_error(p, word)


def test_serve_without_the_server_extra_says_how_to_get_it(tmp_path):
    # a fastapi that cannot be imported, as in an install without the extra
    (tmp_path / "fastapi.py").write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")
    p = run_cli("serve", "--port", "0", timeout=120,
                env={"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))})
    assert_user_error(p, "dualblade[server]")
    assert "fastapi" in p.stderr


def test_serve_port_in_use_is_one_line_error(server):
    p = run_cli("serve", "--port", str(server.port), timeout=120)
    assert_user_error(p, "--port")


# --- bad requests ------------------------------------------------------------------------------------------------

def _bad_requests(model: str):
    chat, comp = "/v1/chat/completions", "/v1/completions"
    user = [{"role": "user", "content": "Hi"}]
    return [
        ("POST", chat, b"{not json", 400),
        ("POST", chat, b"", 400),
        ("POST", chat, b"[1, 2]", 400),
        ("POST", chat, b"\xff\xfe", 400),
        ("POST", chat, {"model": model}, 400),                                        # no messages
        ("POST", chat, {"messages": []}, 400),
        ("POST", chat, {"messages": "Hi"}, 400),
        ("POST", chat, {"messages": [{"role": "wizard", "content": "Hi"}]}, 400),
        ("POST", chat, {"messages": [{"role": "user", "content": 42}]}, 400),
        ("POST", chat, {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400),
        ("POST", chat, {"messages": user, "max_tokens": -5}, 400),
        ("POST", chat, {"messages": user, "max_tokens": "ten"}, 400),
        ("POST", chat, {"messages": user, "max_tokens": 10 ** 9}, 400),
        ("POST", chat, {"messages": user, "temperature": 7}, 400),
        ("POST", chat, {"messages": user, "temperature": "hot"}, 400),
        ("POST", chat, {"messages": user, "top_p": 2}, 400),
        ("POST", chat, {"messages": user, "n": 3}, 400),
        ("POST", chat, {"messages": user, "stream": [1]}, 400),
        ("POST", chat, {"messages": user, "stop": 5}, 400),
        ("POST", chat, {"messages": user, "logit_bias": {"abc": 1}}, 400),
        ("POST", chat, {"messages": user, "logit_bias": {"99999999": 1}}, 400),
        ("POST", chat, {"messages": user, "grammar": "root ::= ("}, 400),
        ("POST", chat, {"messages": [{"role": "user", "content": "word " * 3000}]}, 400),  # context overflow
        ("POST", comp, {"prompt": "word " * 3000, "stream": True}, 400),                  # ... streaming too
        ("POST", comp, {}, 400),                                                          # no prompt
        ("POST", comp, {"prompt": ["a", "b"]}, 400),
        ("POST", comp, {"prompt": 12}, 400),
        ("POST", comp, {"prompt": "Hi", "best_of": 3}, 400),
        ("POST", comp, b"x" * (100 << 10), 413),                                          # over --max-body
        ("GET", chat, None, 405),
        ("POST", "/v1/nothing", {}, 404),
        ("GET", "/v1/models/other-model", None, 404),
        ("GET", "/../../etc/passwd", None, 404),
    ]


def test_bad_requests_are_openai_errors(server, gemma_path):
    model = _model_id(gemma_path)
    cases = _bad_requests(model)
    assert len(cases) >= 20
    for method, path, body, want in cases:
        raw = body if isinstance(body, bytes) else None
        status, _, err = server.request(method, path, None if raw is not None else body, raw=raw)
        shown = (method, path, (raw if raw is not None else json.dumps(body).encode())[:80])
        assert status == want, (shown, status, err)
        assert isinstance(err, dict) and set(err) == {"error"}, (shown, err)
        e = err["error"]
        assert isinstance(e["message"], str) and e["message"] and e["type"], (shown, err)
        assert "Traceback" not in e["message"] and "/etc/passwd" not in json.dumps(err).replace(
            "../../etc/passwd", ""), (shown, err)
    overflow = server.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content":
                                                                             "word " * 3000}]})[2]
    assert overflow["error"]["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=10 ** 9)
    # the server goes on, and no client's mistake became a 500
    assert server.kv()["server"]["errors"] == 0
    assert _chat(server.client(), model, [{"role": "user", "content": "Hi"}], max_tokens=2).choices
