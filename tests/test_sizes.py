"""The one size parser: good values, bad values with clear messages, and properties."""
import pytest
from hypothesis import given, strategies as st

from dualblade import parse_size
from dualblade.config import KVConfig
from dualblade.errors import ConfigError
from dualblade.sizes import MAX_SIZE, format_size


@pytest.mark.parametrize("text,expected", [
    ("2G", 2 << 30), ("2g", 2 << 30), ("1.5GiB", 3 << 29), ("512M", 512 << 20), ("64MiB", 64 << 20),
    ("64 MiB", 64 << 20), ("1k", 1024), ("1KB", 1000), ("3GB", 3 * 10**9), ("4096", 4096), ("4096B", 4096),
    (" 2G ", 2 << 30), ("1T", 1 << 40), ("1P", 1 << 50), (".5G", 1 << 29), (123, 123),
])
def test_good(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad,words", [
    ("2X", "unknown unit"), ("-1G", "negative"), ("", "empty"), ("   ", "empty"), ("0", "zero"), ("0G", "zero"),
    ("2PiB", "absurdly large"), ("99999T", "absurdly large"), ("1" + "0" * 40, "absurdly large"),
    ("G", "not a size"), ("1.2.3G", "not a size"), ("nan", "not a size"), ("inf", "not a size"),
    ("1e9", "not a size"), ("0.5", "fraction of a byte"), ("2 G B", "not a size"), (-5, "negative"),
    (0, "zero"), (True, "must be a number"), (1.5, "must be a number"), (None, "must be a number"),
])
def test_bad(bad, words):
    with pytest.raises(ValueError) as e:
        parse_size(bad, "memory budget")
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert msg.startswith("memory budget")


@given(st.integers(min_value=1, max_value=MAX_SIZE))
def test_ints_roundtrip(n):
    assert parse_size(n) == n
    assert parse_size(str(n)) == n


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(["K", "M", "G", "KiB", "MiB", "GiB"]))
def test_binary_units(n, unit):
    factor = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit[0]]
    if n * factor <= MAX_SIZE:
        assert parse_size(f"{n}{unit}") == n * factor
        assert parse_size(f"{n}{unit.lower()}") == n * factor


@given(st.text(max_size=12))
def test_never_crashes(text):
    # any string: a size or a ValueError, never another exception
    try:
        n = parse_size(text)
    except ValueError as e:
        assert str(e)
    else:
        assert 0 < n <= MAX_SIZE


def test_format_size():
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.50 KiB"
    assert format_size(18 << 20) == "18.0 MiB"


def test_api_uses_the_same_parser():
    assert KVConfig.from_args("64MiB").budget_bytes == 64 << 20
    with pytest.raises(ConfigError, match="unknown unit"):
        KVConfig.from_args("2X")
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        KVConfig.from_args("1000T")
