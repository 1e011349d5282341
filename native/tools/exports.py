#!/usr/bin/env python3
"""libdualblade exports exactly its public API: the functions the two public headers declare (DBLADE_API),
the symbols dualblade.map lists, and what `nm -D` finds defined in the library are the same three sets.

    exports.py LIB.so dualblade.map HEADER...
"""
import re
import subprocess
import sys


def main() -> int:
    lib, mapfile, *headers = sys.argv[1:]
    declared = set()
    for h in headers:
        text = open(h).read()
        declared |= set(re.findall(r"DBLADE_API[^;(]*?\b(dblade_\w+)\s*\(", text))
    listed = set(re.findall(r"^\s+(dblade_\w+);", open(mapfile).read(), re.M))
    out = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1].split("@")[0] for line in out.splitlines() if line.split()[1:2] and line.split()[1] in "TDBRVW"}
    exported = {s for s in exported if not s.startswith("_")}
    ok = True
    for what, a, b in (("declared in the headers but not in dualblade.map", declared, listed),
                       ("in dualblade.map but declared in no header", listed, declared),
                       ("exported but not in dualblade.map", exported, listed),
                       ("in dualblade.map but not exported (not defined?)", listed, exported)):
        extra = sorted(a - b)
        if extra:
            ok = False
            print(f"exports: {what}: {', '.join(extra)}", file=sys.stderr)
    if ok:
        print(f"exports: {len(exported)} functions, as the headers and dualblade.map say")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
