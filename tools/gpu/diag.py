"""GPU smoke steps, each in a process of its own (a crash in one leaves the others' results):
stock llama_cpp on the GPU, dualblade without and with a VRAM budget. Prints one line per step."""
import os
import subprocess
import sys
import tempfile

STEPS = {
    "stock": "import llama_cpp as m; L = m.Llama",
    "dualblade-stock": "import dualblade as m; L = m.Llama",
    "dualblade-streamed": "import dualblade as m; L = lambda p, **k: m.Llama(p, vram_budget=V, **k)",
    "dualblade-streamed-direct": ("import dualblade as m; L = lambda p, **k: m.Llama(p, vram_budget=V, "
                                  "kv_policy='direct', mem_budget=H, kv_dir=D, **k)"),
}
BODY = """
import sys, faulthandler; faulthandler.enable()
from contextlib import closing
from dualblade.synthetic import write_model
V, H, D = sys.argv[2], sys.argv[3], sys.argv[4]
p = str(write_model(D + '/m.gguf', sys.argv[1], seed=3))
{setup}
with closing(L(p, n_ctx=32768, n_gpu_layers=-1, flash_attn=True, verbose=bool(int(sys.argv[5])), seed=1)) as llm:
    out = llm.create_completion('The history of computing is the story of memory', max_tokens=16, temperature=0)
    st = llm.kv_stats()['vram'] if hasattr(llm, 'kv_stats') else None
    print('RESULT', repr(out['choices'][0]['text']), st, flush=True)
"""

shape = sys.argv[1] if len(sys.argv) > 1 else "tiny"
out = os.environ.get("OUT", "/tmp")
for name, setup in STEPS.items():
    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, "-c", BODY.format(setup=setup), shape, "16M", "32M", d, os.environ.get("VERBOSE", "1")]
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        log = f"{out}/diag-{shape}-{name}.log"
        open(log, "w").write(r.stdout + r.stderr)
        res = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
        print(f"{shape} {name}: rc={r.returncode} {res[0] if res else (r.stderr.strip().splitlines() or [''])[-1]}")
        if r.returncode < 0 and os.path.exists("/usr/local/cuda/bin/cuda-gdb"):
            g = subprocess.run(["/usr/local/cuda/bin/cuda-gdb", "-q", "-batch", "-ex", "run", "-ex", "bt 30",
                                "--args", *args], capture_output=True, text=True, timeout=300)
            bt = [l for l in g.stdout.splitlines() if l.startswith("#")]
            open(f"{out}/gdb-{shape}-{name}.log", "w").write(g.stdout + g.stderr)
            print("\n".join(bt[:25]))
