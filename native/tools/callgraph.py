#!/usr/bin/env python3
"""The C module's files call down only: build the file-level call graph from the object files and fail on a
cycle, naming it.

Each object file defines symbols (nm: T, D, B, R, ...) and needs others (U). File A -> file B when A needs a
symbol B defines. A cycle (A -> B -> ... -> A) means some file calls back up into a file that calls it: the
module no longer reads top to bottom. Function pointers (a method table, a work item) are not edges: that is
how a lower layer calls what is handed to it without naming it.

    callgraph.py [--root SRC] OBJ...   print the graph (deepest file last); exit 1 on a cycle
    callgraph.py --selftest            prove the check fails on two files that call each other
"""
import argparse
import os
import subprocess
import sys
import tempfile


def symbols(obj: str) -> tuple[set[str], set[str]]:
    out = subprocess.run(["nm", "--format=posix", obj], capture_output=True, text=True, check=True).stdout
    defined, needed = set(), set()
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if kind == "U":
            needed.add(name)
        elif kind.upper() in "TDBRVWG" and kind not in "tdbrvwg":  # global definitions only
            defined.add(name)
    return defined, needed


def name_of(obj: str, root: str | None) -> str:
    # CMake names objects <dir>/<file>.c.o under .../dualblade_obj.dir/src/
    base = obj
    marker = os.sep + "src" + os.sep
    if marker in obj:
        base = obj.rsplit(marker, 1)[1]
    for ext in (".o", ".obj"):
        if base.endswith(ext):
            base = base[: -len(ext)]
    return base


def graph(objs: list[str], root: str | None) -> dict[str, set[str]]:
    files = {name_of(o, root): symbols(o) for o in objs}
    owner = {}
    for f, (defined, _) in files.items():
        for s in defined:
            owner[s] = f
    return {f: {owner[s] for s in needed if s in owner and owner[s] != f} for f, (_, needed) in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of files [a, b, ..., a], or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = {f: WHITE for f in g}
    stack: list[str] = []

    def visit(f: str) -> list[str] | None:
        color[f] = GREY
        stack.append(f)
        for n in sorted(g[f]):
            if color[n] == GREY:
                return stack[stack.index(n):] + [n]
            if color[n] == WHITE:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        color[f] = BLACK
        return None

    for f in sorted(g):
        if color[f] == WHITE:
            found = visit(f)
            if found:
                return found
    return None


def depth(g: dict[str, set[str]]) -> dict[str, int]:
    memo: dict[str, int] = {}

    def d(f: str) -> int:
        if f not in memo:
            memo[f] = 0
            memo[f] = 1 + max((d(n) for n in g[f]), default=-1)
        return memo[f]

    return {f: d(f) for f in g}


def check(objs: list[str], root: str | None, quiet: bool = False) -> int:
    g = graph(objs, root)
    cycle = find_cycle(g)
    if cycle:
        calls = " -> ".join(cycle)
        print(f"callgraph: the C files call each other in a circle: {calls}", file=sys.stderr)
        for a, b in zip(cycle, cycle[1:]):
            print(f"  {a} calls {b}", file=sys.stderr)
        return 1
    if not quiet:
        levels = depth(g)
        for f in sorted(g, key=lambda f: (-levels[f], f)):
            print(f"{levels[f]:2d} {f:24s} -> {', '.join(sorted(g[f])) or '-'}")
        print(f"callgraph: {len(g)} files, no cycle")
    return 0


def selftest() -> int:
    """Two files that call each other must be reported; one that calls down must not."""
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory() as d:
        src = {"src/up.c": "void down(void); void up(void) { down(); }\n",
               "src/down.c": "void up(void); void down(void) { up(); }\n",
               "src/leaf.c": "int leaf(void) { return 1; }\n"}
        objs = []
        for path, text in src.items():
            c = os.path.join(d, path)
            os.makedirs(os.path.dirname(c), exist_ok=True)
            with open(c, "w") as f:
                f.write(text)
            o = c + ".o"
            subprocess.run([cc, "-c", c, "-o", o], check=True)
            objs.append(o)
        if check(objs, None, quiet=True) != 1:
            print("callgraph selftest: a cycle between up.c and down.c was not found", file=sys.stderr)
            return 1
        if check([objs[0], objs[2]], None, quiet=True) != 0:
            print("callgraph selftest: a graph without a cycle was reported", file=sys.stderr)
            return 1
    print("callgraph selftest: a back call is found, a tree passes")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="the source folder (for naming files)")
    ap.add_argument("--selftest", action="store_true")
    ap.add_argument("objs", nargs="*")
    a = ap.parse_args()
    if a.selftest:
        return selftest()
    objs = [o for arg in a.objs for o in arg.split(";") if o]  # CMake passes $<TARGET_OBJECTS> as one list
    if not objs:
        ap.error("give the object files")
    return check(objs, a.root)


if __name__ == "__main__":
    sys.exit(main())
