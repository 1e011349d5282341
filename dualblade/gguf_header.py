"""Reads a GGUF file's header and metadata only (never the tensor data) and derives the KV-cache
geometry llama.cpp will allocate for it.

The geometry rules mirror llama.cpp's (llama-model.cpp, llama-kv-cache*.cpp at the locked commit);
tests check them against the geometry the patched llama.cpp reports to the C module.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError

GGUF_MAGIC = b"GGUF"

# GGUF value types
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = range(13)
_SCALAR = {_UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
           _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d"}

# bytes per block and elements per block of the KV cache types offered
CACHE_TYPES = {"f16": (2, 1), "q8_0": (34, 32), "q4_0": (18, 32)}
GGML_TYPE_IDS = {"f16": 1, "q4_0": 2, "q8_0": 8}
GGML_TYPE_NAMES = {v: k for k, v in GGML_TYPE_IDS.items()}

# llama.cpp pads the KV cache to whole 256-cell blocks
KV_PAD = 256


class _Reader:
    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path = f, size, path

    def read(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise ModelError(f"{self.path} is truncated (GGUF header ends early); download or copy it again")
        return b

    def scalar(self, t: int):
        fmt = _SCALAR[t]
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar(_UINT64)
        if n > self.size:
            raise ModelError(f"{self.path} has a corrupt GGUF header (string of {n} bytes); use an intact file")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, t: int, keep: bool):
        if t == _STRING:
            return self.string()
        if t in _SCALAR:
            return self.scalar(t)
        if t == _ARRAY:
            et = self.scalar(_UINT32)
            n = self.scalar(_UINT64)
            if et in _SCALAR:
                width = struct.calcsize(_SCALAR[et])
                if n * width > self.size:
                    raise ModelError(f"{self.path} has a corrupt GGUF header (array of {n}); use an intact file")
                raw = self.read(n * width)
                return list(struct.unpack(f"<{n}{_SCALAR[et][1]}", raw)) if keep else n
            if et == _STRING:
                if not keep:  # skip long string arrays (the vocabulary) without decoding
                    for _ in range(n):
                        ln = self.scalar(_UINT64)
                        if ln > self.size:
                            raise ModelError(f"{self.path} has a corrupt GGUF header; use an intact file")
                        self.f.seek(ln, os.SEEK_CUR)
                    return n
                return [self.string() for _ in range(n)]
            raise ModelError(f"{self.path} has an unsupported GGUF array type {et}")
        raise ModelError(f"{self.path} has an unknown GGUF value type {t}; is it a GGUF file from a newer tool?")


def read_metadata(path: str | os.PathLike) -> dict:
    """The GGUF key/value metadata; long arrays are replaced by their length except a few we need."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; give the path of a .gguf file")
    if path.is_dir():
        raise ModelError(f"{path} is a directory; give the path of a .gguf model file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ModelError(f"cannot open model file {path}: {e.strerror}; check its permissions") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        r = _Reader(f, size, path)
        if size == 0:
            raise ModelError(f"model file {path} is empty; download or copy it again")
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF model file (wrong magic); give a .gguf file "
                             "(convert other formats with llama.cpp's convert_hf_to_gguf.py)")
        if size < 24:
            raise ModelError(f"{path} is truncated (GGUF header ends early); download or copy it again")
        version = r.scalar(_UINT32)
        if version not in (2, 3):
            raise ModelError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported: give a "
                             "file written by a current llama.cpp (convert_hf_to_gguf.py)")
        n_tensors = r.scalar(_UINT64)
        n_kv = r.scalar(_UINT64)
        if n_kv > 1_000_000 or n_tensors > 10_000_000:
            raise ModelError(f"{path} has a corrupt GGUF header; use an intact file")
        meta: dict = {"GGUF.version": version, "GGUF.tensor_count": n_tensors}
        for _ in range(n_kv):
            key = r.string()
            t = r.scalar(_UINT32)
            keep = not key.startswith("tokenizer.ggml.")  # skip the vocabulary arrays
            meta[key] = r.value(t, keep)
        _check_tensor_data(r, meta, n_tensors)
        return meta


def _check_tensor_data(r: _Reader, meta: dict, n_tensors: int) -> None:
    """Raises ModelError when the file ends before the end of its last tensor's data (a cut download).
    Records each tensor's size in meta["GGUF.tensor_bytes"] (name -> bytes; types this reader does not
    know are left out)."""
    from gguf.constants import GGML_QUANT_SIZES

    end = 0
    sizes: dict[str, int] = {}
    meta["GGUF.tensor_bytes"] = sizes
    for _ in range(n_tensors):
        name = r.string()
        n_dims = r.scalar(_UINT32)
        if n_dims > 8:
            raise ModelError(f"{r.path} has a corrupt GGUF tensor table; use an intact file")
        n = 1
        for _ in range(n_dims):
            n *= r.scalar(_UINT64)
        ggml_type = r.scalar(_UINT32)
        offset = r.scalar(_UINT64)
        block = GGML_QUANT_SIZES.get(ggml_type)
        if block is not None:  # a type this reader does not know: llama.cpp will judge it
            sizes[name] = n // block[0] * block[1]
            end = max(end, offset + sizes[name])
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0:
        align = 32
    data_start = -(-r.f.tell() // align) * align
    meta["GGUF.data_start"] = data_start
    if n_tensors == 0:
        return  # a vocab-only file: no data section, nothing to be cut short
    if data_start + end > r.size:
        raise ModelError(f"{r.path} is truncated: its tensors end at byte {data_start + end}, the file has "
                         f"{r.size} bytes; download or copy it again")


@dataclass
class KVLayer:
    il: int
    swa: bool
    n_embd_k_gqa: int
    n_embd_v_gqa: int


@dataclass
class ModelInfo:
    path: Path
    arch: str
    name: str
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: list[int]
    head_dim_k: int
    head_dim_v: int
    n_swa: int
    file_bytes: int
    chat_template: str | None
    instruct: bool
    layers: list[KVLayer] = field(default_factory=list)
    tensor_bytes: dict[str, int] = field(default_factory=dict)
    n_vocab: int = 0  # tokens in the vocabulary (0: the file has none)
    n_ff: int = 0  # the feed-forward width (the largest layer's; 0: the file does not say)

    def weights_working_set(self, repacked_bytes: int = 0) -> int:
        """Bytes of the mmap'ed weights every token reads, which must stay in the page cache: every tensor but
        the token-embedding table (a token reads one row of it; unless it is also the output matrix, as when
        the file has no output.weight), less what llama.cpp repacked into anonymous memory at load."""
        total = sum(self.tensor_bytes.values())
        if "output.weight" in self.tensor_bytes:
            total -= self.tensor_bytes.get("token_embd.weight", 0)
        return max(total - repacked_bytes, 0)

    def kv_rows(self, layer: KVLayer, n_ctx: int, swa_full: bool = True, n_ubatch: int = 512) -> int:
        """Cells llama.cpp allocates for this layer at context n_ctx (one sequence)."""
        size = _pad(n_ctx)
        if layer.swa and not swa_full:
            size = min(size, _pad(self.n_swa + n_ubatch))
        return size

    def layer_kv_bytes(self, n_ctx: int, type_k: str = "f16", type_v: str | None = None, swa_full: bool = True,
                       n_ubatch: int = 512) -> list[tuple[int, int]]:
        """(K bytes, V bytes) per KV layer at context n_ctx, as llama.cpp allocates them."""
        type_v = type_v or type_k
        return [(self.kv_rows(l, n_ctx, swa_full, n_ubatch) * row_bytes(l.n_embd_k_gqa, type_k),
                 self.kv_rows(l, n_ctx, swa_full, n_ubatch) * row_bytes(l.n_embd_v_gqa, type_v))
                for l in self.layers]

    def layer_bytes(self, n_ctx: int, cache_type: str = "f16", swa_full: bool = True) -> list[int]:
        """K+V bytes per KV layer at context n_ctx."""
        return [k + v for k, v in self.layer_kv_bytes(n_ctx, cache_type, cache_type, swa_full)]

    def kv_bytes_per_token(self, cache_type: str = "f16") -> int:
        return sum(row_bytes(l.n_embd_k_gqa, cache_type) + row_bytes(l.n_embd_v_gqa, cache_type)
                   for l in self.layers)


_digests: dict = {}


def header_digest(path: str | os.PathLike) -> str:
    """What identifies a model for a saved session: SHA-256 of the GGUF's bytes up to the end of its tensor
    table (header, every metadata key, the tensor names, shapes, types and offsets), then ":" and the file's
    size. The weights are not hashed (a few MB are read, not the whole file). Cached per file version."""
    import hashlib

    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _digests:
        end = read_metadata(path)["GGUF.data_start"]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            left = end
            while left > 0:
                block = f.read(min(left, 1 << 20))
                if not block:
                    break
                h.update(block)
                left -= len(block)
        _digests[key] = f"{h.hexdigest()}:{st.st_size}"
    return _digests[key]


def _pad(n: int) -> int:
    return (n + KV_PAD - 1) // KV_PAD * KV_PAD


def row_bytes(n_elements: int, cache_type: str) -> int:
    block_bytes, block_elems = CACHE_TYPES[cache_type]
    return n_elements // block_elems * block_bytes


# sliding-window layouts llama.cpp hard-codes per architecture (set_swa_pattern)
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6, "cohere2": 4}
# architectures whose memory is recurrent or hybrid: no per-layer attention KV to place
RECURRENT_ARCHS = {"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7", "jamba", "falcon-h1",
                   "granitehybrid", "lfm2", "nemotron_h", "plamo2", "qwen3next"}


def model_info(path: str | os.PathLike, meta: dict | None = None) -> ModelInfo:
    """Architecture and KV geometry from the GGUF header alone (meta: its read_metadata, if read already)."""
    path = Path(path)
    if meta is None:
        meta = read_metadata(path)
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture; it is not a llama.cpp model file")
    if not arch.isprintable():  # the messages below show it
        raise ModelError(f"{path} has a general.architecture that is not a name ({arch!r:.60}); use an intact file")

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_layer = get("block_count")
    n_embd = get("embedding_length")
    n_head_raw = get("attention.head_count")
    if n_head_raw is None and arch in RECURRENT_ARCHS:
        n_head_raw = 0  # no attention at all
    if not isinstance(n_layer, int) or not isinstance(n_embd, int) or n_head_raw is None:
        raise ModelError(f"{path} lacks {arch}.block_count/embedding_length/attention.head_count; "
                         "it is not a complete model (a vocab-only file?)")

    # what llama.cpp would refuse when loading, refused here before anything is sized from it
    def count(key, v, least=0, most=2**32 - 1):  # llama.cpp reads a uint32
        if type(v) is not int or not least <= v <= most:  # (a bool is an int too)
            raise ModelError(f"{path} has {arch}.{key} = {v!r:.40}, not a count llama.cpp takes; use an intact file")
        return v

    def one_per_layer(key, v: list) -> list:  # an array, only with one value per layer
        if len(v) != n_layer:
            raise ModelError(f"{path} has {len(v)} values of {arch}.{key} for {n_layer} layers; use an intact file")
        return v

    def per_layer(key, v, default):
        if v is None:
            v = default
        return [count(key, x) for x in one_per_layer(key, v)] if isinstance(v, list) else [count(key, v)] * n_layer

    n_layer = count("block_count", n_layer, 1, 512)  # llama.cpp aborts outside 1..LLAMA_MAX_LAYERS
    n_embd = count("embedding_length", n_embd)
    n_head = per_layer("attention.head_count", n_head_raw, 0)
    n_head_kv = per_layer("attention.head_count_kv", get("attention.head_count_kv"), n_head)
    n_head0 = max(n_head) or 1
    n_ff = max(per_layer("feed_forward_length", get("feed_forward_length"), 0))
    head_k = count("attention.key_length", get("attention.key_length", n_embd // n_head0))
    head_v = count("attention.value_length", get("attention.value_length", n_embd // n_head0))
    n_swa = count("attention.sliding_window", get("attention.sliding_window", 0))
    pattern = _SWA_PATTERN.get(arch)
    swa_flags = get("attention.sliding_window_pattern")
    if isinstance(swa_flags, list):
        one_per_layer("attention.sliding_window_pattern", swa_flags)
    template = meta.get("tokenizer.chat_template")  # one of another type is no template
    layers = []
    for il in range(n_layer):
        if n_head_kv[il] == 0:
            continue  # no attention in this layer
        if isinstance(swa_flags, list):
            swa = bool(swa_flags[il])
        elif pattern and n_swa:
            swa = il % pattern < pattern - 1
        else:
            swa = False
        layers.append(KVLayer(il, swa, head_k * n_head_kv[il], head_v * n_head_kv[il]))
    return ModelInfo(path=path, arch=arch, name=str(meta.get("general.name", path.stem)), n_layer=n_layer,
                     n_ctx_train=count("context_length", get("context_length", 0)), n_embd=n_embd, n_head=n_head0,
                     n_head_kv=n_head_kv, head_dim_k=head_k, head_dim_v=head_v, n_swa=int(n_swa),
                     file_bytes=path.stat().st_size, chat_template=template if isinstance(template, str) else None,
                     instruct=_is_instruct(meta),
                     layers=layers, tensor_bytes=meta.get("GGUF.tensor_bytes", {}),
                     n_vocab=tokens if type(tokens := meta.get("tokenizer.ggml.tokens")) is int else 0, n_ff=n_ff)


def _is_instruct(meta: dict) -> bool:
    """Whether the file says it is instruction-tuned (general.finetune, or -it/instruct/chat in its name)."""
    import re

    words = " ".join(str(meta.get(k, "")) for k in ("general.finetune", "general.name", "general.basename"))
    return bool(re.search(r"(?i)(\b|[-_])(it|instruct|chat|sft|rlhf)(\b|[-_])", words))
