"""Runs one side of a persistent-session test in its own process (tests/test_sessions.py).

    python session_worker.py '<json>'

json: {"model": path, "kw": Llama kwargs, "steps": [...]}; each step is one of
    ["eval", n]            evaluate the first n tokens of the conftest prompt
    ["eval_from", a, b]    evaluate prompt tokens [a, b) (a suffix after a resume)
    ["greedy", n]          n greedy tokens, one eval each
    ["complete", text, n]  create_completion(text, max_tokens=n, temperature=0)
    ["save", path] / ["load", path]
Prints one JSON line: {"log": [...]}, where every step after a state change records the tokens and the
SHA-256 of the last logits' bytes, or {"error": type, "message": ...}.
"""
from __future__ import annotations

import hashlib
import json
import sys
from contextlib import closing
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from conftest import PROMPT_TEXT, last_logits, prompt_tokens  # noqa: E402


def main(spec: dict) -> dict:
    from dualblade import Llama

    log = []
    with closing(Llama(spec["model"], verbose=False, **spec["kw"])) as llm:
        prompt = prompt_tokens(llm, llm.n_ctx())

        def record(what):
            lg = last_logits(llm)
            log.append({"step": what, "n_tokens": llm.n_tokens,
                        "logits": hashlib.sha256(lg.tobytes()).hexdigest(), "argmax": int(np.argmax(lg))})

        for step in spec["steps"]:
            op = step[0]
            if op == "eval":
                llm.eval(prompt[: step[1]])
                record(op)
            elif op == "eval_from":
                llm.eval(prompt[step[1]: step[2]])
                record(op)
            elif op == "greedy":
                for _ in range(step[1]):
                    tok = int(np.argmax(last_logits(llm)))
                    llm.eval([tok])
                    record(f"greedy {tok}")
            elif op == "complete":
                text = PROMPT_TEXT * step[1] + step[2]
                out = llm.create_completion(text, max_tokens=step[3], temperature=0, seed=1)
                log.append({"step": "complete", "text": out["choices"][0]["text"], "n_tokens": llm.n_tokens,
                            "logits": hashlib.sha256(last_logits(llm).tobytes()).hexdigest()})
            elif op == "save":
                st = llm.save_session(step[1])
                log.append({"step": "save", "n_tokens": llm.n_tokens, "stats": st})
            elif op == "load":
                st = llm.load_session(step[1])
                st.pop("app", None)
                log.append({"step": "load", "n_tokens": llm.n_tokens, "stats": st,
                            "kv": llm.kv_stats()["bytes_read"]})
            elif op == "stats":
                log.append({"step": "stats", "kv": llm.kv_stats()})
        return {"log": log}


if __name__ == "__main__":
    try:
        result = main(json.loads(sys.argv[1]))
    except Exception as e:  # reported to the test, which asserts on it
        result = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(result))
