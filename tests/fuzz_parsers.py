"""Fuzz targets (atheris) for the parsers that take what a user types or a model file holds.

    python tests/fuzz_parsers.py sizes [libFuzzer flags, e.g. -runs=20000] [CORPUS_DIR...]
    python tests/fuzz_parsers.py gguf  [...]

sizes: parse_size, the items of bench's --budgets and KVConfig's mem_budget. gguf: model_info on a
file. Each may refuse an input only with the error it documents (one line); any other exception,
or a result outside what it promises, is a crash that atheris reports with the input (./crash-*).
Inputs are mostly built from the fuzzer's bytes in the shape of a size or a GGUF file, so that
runs get past the first check. Run with the installed package (tests/test_fuzz.py does).
"""
import os
import resource
import struct
import sys

import atheris

with atheris.instrument_imports(include=["dualblade"]):
    from dualblade.bench import parse_budgets
    from dualblade.config import KVConfig
    from dualblade.errors import ConfigError, DualbladeError
    from dualblade.gguf_header import CACHE_TYPES, model_info
    from dualblade.sizes import MAX_SIZE, format_size, parse_size

# ------------------------------------------------------------------------------------- sizes

UNITS = ["", "", "b", "B", "k", "K", "KiB", "kib", "KB", "kb", "M", "MiB", "MB", "g", "G", "GiB", "GB", "T", "TiB",
         "TB", "P", "PiB", "PB", "E", "EiB", "iB", "bb", "Gi", "%", "G%", "x"]
DIGITS = ["0123456789"] * 6 + ["٠١٢٣٤٥٦٧٨٩", "０１２３４５６７８９"]  # \d and int() take these too


def size_text(fdp) -> str:
    """Sign, digits (now and then hundreds), maybe a fraction, blanks, a unit."""
    alphabet = fdp.PickValueInList(DIGITS)

    def digits(most):
        pattern = "".join(alphabet[b % 10] for b in fdp.ConsumeBytes(6)) or alphabet[1]
        n = fdp.ConsumeIntInRange(0, most)
        return (pattern * n)[:n]

    number = digits(fdp.PickValueInList([3, 12, 40, 400]))
    if fdp.ConsumeBool():
        number += "." + digits(8)
    blank = fdp.PickValueInList(["", "", " ", "\t", "\n", "\u00a0"])
    return (blank + fdp.PickValueInList(["", "", "", "+", "-"]) + number + fdp.PickValueInList(["", " "])
            + fdp.PickValueInList(UNITS) + blank)


def one_line_message(e: Exception, echoed: object = "") -> None:
    """A message, on one line but for the line breaks of the input it quotes (the CLI joins those)."""
    msg = str(e)
    assert msg and msg.count("\n") <= str(echoed).count("\n"), f"{type(e).__name__}: bad message {msg!r}"


def fuzz_sizes(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    how = fdp.ConsumeIntInRange(0, 3)
    if how == 0:
        value = fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 9))
    elif how == 1:
        value = fdp.ConsumeUnicodeNoSurrogates(40)
    else:
        value = size_text(fdp)
    kv_total = fdp.ConsumeIntInRange(1, MAX_SIZE)

    try:
        n = parse_size(value, "size")
    except ValueError as e:  # its one documented refusal
        one_line_message(e, value)
        n = None
    else:
        assert type(n) is int and 1 <= n <= MAX_SIZE, (value, n)
        assert parse_size(str(n)) == n
        format_size(n)

    try:
        cfg = KVConfig.from_args(mem_budget=value)
    except ConfigError as e:  # ConfigError, not a bare ValueError: the API documents it
        one_line_message(e, value)
    else:
        assert cfg.budget_bytes == n, (value, cfg.budget_bytes, n)

    item = value if isinstance(value, str) else str(value)
    try:
        [(label, b)] = parse_budgets([item], kv_total)
    except ValueError as e:  # the CLI turns any ValueError into its one-line error
        one_line_message(e, item)
    else:
        assert type(b) is int, (item, b)
        if item.strip().endswith("%"):
            assert 0 <= b <= kv_total, (item, kv_total, b)
        else:
            assert b == parse_size(item), (item, b)

# -------------------------------------------------------------------------------------- gguf

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
SCALAR = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f",
          BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
INTS = [UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64]
ARCHS = ["llama", "gemma3", "gemma2", "cohere2", "qwen2", "mamba", "", "x" * 300]
KEYS = ["general.architecture", "general.name", "general.finetune", "general.basename", "general.alignment",
        "tokenizer.chat_template", "tokenizer.ggml.tokens", "{a}.block_count", "{a}.embedding_length",
        "{a}.attention.head_count", "{a}.attention.head_count_kv", "{a}.attention.key_length",
        "{a}.attention.value_length", "{a}.attention.sliding_window", "{a}.attention.sliding_window_pattern",
        "{a}.context_length"]
NEEDED = KEYS[:1] + KEYS[8:11]  # without these model_info stops early


def lie(fdp, n: int) -> int:
    """n, or now and then any count at all."""
    return n if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 2**64 - 1)


def gguf_string(fdp, s: bytes) -> bytes:
    return struct.pack("<Q", lie(fdp, len(s))) + s


def gguf_value(fdp, t: int, depth: int = 0) -> bytes:
    if t in SCALAR:
        fmt = SCALAR[t]
        if t in INTS and fdp.ConsumeIntInRange(0, 3):  # small numbers: the ones a model has
            lo, hi = (-8, 127) if fmt.islower() else (0, 255)
            return struct.pack(fmt, fdp.ConsumeIntInRange(lo, hi))
        return fdp.ConsumeBytes(struct.calcsize(fmt)).ljust(struct.calcsize(fmt), b"\0")
    if t == STRING:
        return gguf_string(fdp, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)))
    if t == ARRAY:
        et = fdp.PickValueInList(INTS * 3 + [STRING, BOOL, FLOAT32, ARRAY, 13]) if depth < 2 else UINT8
        n = fdp.ConsumeIntInRange(0, 40)
        return struct.pack("<IQ", et, lie(fdp, n)) + b"".join(gguf_value(fdp, et, depth + 1) for _ in range(n))
    return b""  # an unknown type has no value we could write


def gguf_file(fdp) -> bytes:
    """A GGUF file whose keys are mostly the ones model_info reads, with values of any type."""
    arch = fdp.PickValueInList(ARCHS)
    keys = NEEDED[:] if fdp.ConsumeBool() else []
    keys += [fdp.PickValueInList(KEYS) for _ in range(fdp.ConsumeIntInRange(0, 10))]
    kvs = []
    for key in keys:
        key = key.format(a=arch) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeUnicode(8)
        if key == "general.architecture" and fdp.ConsumeIntInRange(0, 7):
            t, value = STRING, gguf_string(fdp, arch.encode())
        else:
            t = fdp.PickValueInList(INTS + [UINT32, INT32, UINT64, ARRAY] * 4 + [STRING, BOOL, FLOAT32, FLOAT64, 13])
            value = gguf_value(fdp, t)
        kvs.append(gguf_string(fdp, key.encode("utf-8", "surrogatepass")) + struct.pack("<I", t) + value)
    tensors = []
    for i in range(fdp.PickValueInList([0, 0, 0, 1, 2])):  # the tensor table, then room for the data
        dims = [fdp.ConsumeIntInRange(0, 64) for _ in range(fdp.ConsumeIntInRange(0, 9))]
        tensors.append(gguf_string(fdp, b"t%d" % i) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims,
                       fdp.ConsumeIntInRange(0, 40), fdp.PickValueInList([0, 32, 4096, 2**64 - 1])))
    data = (b"GGUF" + struct.pack("<IQQ", fdp.PickValueInList([3] * 6 + [2, 1, 4]), lie(fdp, len(tensors)),
                                  lie(fdp, len(kvs))) + b"".join(kvs) + b"".join(tensors)
            + bytes(fdp.PickValueInList([0, 0, 64, 8192])))
    # then the damage a download or a disk does: cut short, a changed byte
    if fdp.ConsumeIntInRange(0, 7) == 0:
        data = data[:fdp.ConsumeIntInRange(0, len(data))]
    if data and fdp.ConsumeIntInRange(0, 7) == 0:
        at = fdp.ConsumeIntInRange(0, len(data) - 1)
        data = data[:at] + bytes([fdp.ConsumeIntInRange(0, 255)]) + data[at + 1:]
    return data


# the file, rewritten for each input: in memory, and gone with the process
FD = os.memfd_create("fuzz.gguf")
MODEL = f"/proc/self/fd/{FD}"


def fuzz_gguf(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    raw = fdp.ConsumeIntInRange(0, 4) == 0  # now and then the bytes as they come
    data = fdp.ConsumeBytes(1 << 16) if raw else gguf_file(fdp)
    os.ftruncate(FD, 0)
    os.pwrite(FD, data, 0)
    try:
        info = model_info(MODEL)
    except DualbladeError as e:  # ModelError (the documented one) or another of ours
        one_line_message(e)
        return
    # what `dualblade info` and the placement plan compute next from it
    assert isinstance(info.arch, str) and isinstance(info.name, str)
    assert info.chat_template is None or isinstance(info.chat_template, str), info.chat_template
    assert type(info.n_layer) is int and info.n_layer >= 0, info.n_layer
    for ct in CACHE_TYPES:
        for n_ctx in (1, 4096):
            sizes = info.layer_bytes(n_ctx, ct)
            assert all(type(b) is int and b >= 0 for b in sizes), (ct, sizes)
        per_token = info.kv_bytes_per_token(ct)
        assert type(per_token) is int and per_token >= 0, per_token


TARGETS = {"sizes": fuzz_sizes, "gguf": fuzz_gguf}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags] [corpus dirs]")
    target = TARGETS[sys.argv[1]]
    # an input that makes a parser allocate without bound fails as a MemoryError, before the machine
    # runs out of memory: 2 GiB more address space than the process has now. That is the only memory
    # guard: libFuzzer's own (-rss_limit_mb, 2048 by default) reads the peak RSS, ru_maxrss, which a
    # process started by vfork+exec (Python's subprocess, pytest's) inherits from its parent's peak, so
    # it fires at the first check in a child of a big test process. A flag given here still wins.
    mapped = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
    atheris.Setup([sys.argv[0], "-rss_limit_mb=0"] + sys.argv[2:], target)
    atheris.Fuzz()
