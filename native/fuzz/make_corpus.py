"""Writes the seed corpus of fuzz_header (corpus/header/): python3 native/fuzz/make_corpus.py

The header is encoded here a second time, independently of header.c (layout in its comment), so a
seed that stops decoding points at a change of format.
"""
import struct
from pathlib import Path

OUT = Path(__file__).resolve().parent / "corpus" / "header"


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def header(version=1, device=1 << 30, offset=1 << 20, data=256 << 20, align=4096, seal=True) -> bytes:
    b = bytearray(4096)
    b[0:16] = b"DUALBLADE-KV-v1\0"
    struct.pack_into("<II16sQQQIIQQ", b, 16, version, 4096, b"0123456789abcdef", device, offset,
                     data, align, 0, 0x1234567890ABCDEF, 1700000000)
    struct.pack_into("<I", b, 4092, crc32c(bytes(b[:4092])) if seal else 0)
    return bytes(b)


def at(size: int, *pieces: tuple[int, bytes]) -> bytes:
    b = bytearray(size)
    for off, what in pieces:
        b[off:off + len(what)] = what
    return bytes(b)


SEEDS = {
    "valid": header(),
    "other-version": header(version=2),
    "bad-crc": header(seal=False),
    "data-past-end": header(data=2 << 30),
    # accepted before the decoder compared without a wrapping sum (data_offset + data_bytes)
    "wrapping-offset": header(offset=2**64 - 4096),
    "zeros": bytes(4096),
    "magic-only": b"DUALBLADE-KV-v1\0",
    "empty": b"",
    "ext4": at(1082, (1080, b"\x53\xef")),
    "gpt": at(520, (510, b"\x55\xaa"), (512, b"EFI PART")),
    "swap": at(4096, (4086, b"SWAPSPACE2")),
    "luks": b"LUKS\xba\xbe",
}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (OUT / name).write_bytes(data)
    print(f"{len(SEEDS)} seeds in {OUT}")
