"""The one parser for byte sizes (memory budgets), used by the Python API and the CLI.

Units: a bare number is bytes; K, M, G, T, P and KiB ... PiB are powers of 1024 (as for memory
everywhere in Linux tools); KB, MB, GB, TB, PB are powers of 1000. Case does not matter; a
fraction is allowed with a unit ("1.5G"). Zero, negative and absurd (> 1 PiB) sizes are refused.
"""
from __future__ import annotations

import re

MAX_SIZE = 1 << 50  # 1 PiB: no memory budget is larger; a bigger number is a typo

_BINARY = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_SIZE_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)$")
_HINT = "use e.g. 2G, 1.5GiB, 512M, 64MiB or a number of bytes"


def parse_size(value: int | str, what: str = "size") -> int:
    """Returns the number of bytes that value names; raises ValueError naming the problem."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} must be a number of bytes or a size string, not {type(value).__name__}; "
                         "give an int such as 2147483648 or a string such as '2G'")
    if isinstance(value, int):
        n = value
        shown = str(value)
    else:
        shown = value.strip()
        if not shown:
            raise ValueError(f"{what} is empty; {_HINT}")
        m = _SIZE_RE.match(shown)
        if not m:
            raise ValueError(f"{what} {value!r} is not a size; {_HINT}")
        sign, number, unit = m.groups()
        if sign == "-":
            raise ValueError(f"{what} {value!r} is negative; give a positive size, {_HINT}")
        factor = _unit_factor(unit)
        if factor is None:
            raise ValueError(f"{what} {value!r} has an unknown unit {unit!r}; units are K, M, G, T (powers of "
                             f"1024), KiB..TiB (also 1024) and KB..TB (powers of 1000)")
        # before float(): past some 300 digits it is inf, which int() refuses with an OverflowError
        if len(number.split(".")[0].lstrip("0")) > 30:
            raise ValueError(f"{what} {value!r} is absurdly large (more than 1 PiB); {_HINT}")
        if factor == 1 and "." in number and float(number) != int(float(number)):
            raise ValueError(f"{what} {value!r} is a fraction of a byte; {_HINT}")
        n = round(float(number) * factor) if "." in number else int(number) * factor
    if n < 0:
        raise ValueError(f"{what} {shown!r} is negative; give a positive size, {_HINT}")
    if n == 0:
        raise ValueError(f"{what} {shown!r} is zero; give a positive size, {_HINT}")
    if n > MAX_SIZE:
        raise ValueError(f"{what} {shown!r} is absurdly large (more than 1 PiB); {_HINT}")
    return n


def _unit_factor(unit: str) -> int | None:
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if len(u) == 1 or (len(u) == 3 and u.endswith("ib")):
        return _BINARY.get(u[0]) if u[0] != "b" else None
    if len(u) == 2 and u.endswith("b"):
        return _DECIMAL.get(u[0])
    return None


def format_size(n: int | float) -> str:
    """Bytes as a short binary-unit string: 512 B, 1.5 KiB, 2.00 GiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}" if n < 10 else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
