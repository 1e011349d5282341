"""A conversation that saves after every reply, for the kill -9 test (tests/test_session_append.py).

    python append_worker.py '<json>'

json: {"model": path, "kw": Llama kwargs, "session": path, "step": tokens per reply, "seed": n}. Resumes the
session if there is one, then forever: evaluates `step` more prompt tokens, prints "saving N", saves, prints
"saved N <sha256 of llama.cpp's whole state>". Starts over (a save written whole) when the context is full.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from conftest import prompt_tokens  # noqa: E402


def state_digest(llm) -> str:
    """SHA-256 of llama.cpp's full state (every KV row, the cells, the last logits): what a resume must rebuild."""
    import llama_cpp

    n = llama_cpp.llama_state_get_size(llm.ctx)
    buf = (ctypes.c_uint8 * n)()
    got = llama_cpp.llama_state_get_data(llm.ctx, buf, n)
    return hashlib.sha256(bytes(buf)[:got]).hexdigest()


def main(spec: dict) -> None:
    from dualblade import Llama

    with closing(Llama(spec["model"], verbose=False, **spec["kw"])) as llm:
        prompt = prompt_tokens(llm, llm.n_ctx())
        if os.path.exists(spec["session"]):
            llm.load_session(spec["session"])
        step = spec["step"]
        while True:
            n = llm.n_tokens
            if n + step > llm.n_ctx() - 8:
                llm.reset()
                n = 0
            llm.eval(prompt[n: n + step])
            print(f"saving {llm.n_tokens}", flush=True)
            st = llm.save_session(spec["session"])
            print(f"saved {llm.n_tokens} {state_digest(llm)} {int(st['appended'])}", flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
