"""Synthetic GGUF models: random weights, a real tokenizer, a named shape.

For tests and benchmarks of shapes no package ships (nothing is downloaded from a model hub).
The tokenizer comes from one of llama.cpp's vocab-only GGUF files, installed with dualblade.
Outputs are meaningless text, but deterministic: equal runs give equal tokens.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ConfigError

VOCAB_DIR = Path(__file__).parent / "data" / "vocab"


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    vocab: str  # vocab-only file: ggml-vocab-<vocab>.gguf
    n_ctx_train: int = 131072
    weights: str = "f16"  # f16 | q8_0


SHAPES = {
    # small and fast: for tests and smoke runs (dense GQA, llama architecture)
    "tiny": Shape("tiny", n_layer=8, n_embd=256, n_head=8, n_head_kv=2, n_ff=512, vocab="llama-spm",
                  n_ctx_train=32768),
    # KV-heavy: 32 KiB of f16 KV per token (like Llama-3.2-1B) on small weights: decode is I/O bound
    "kv-heavy": Shape("kv-heavy", n_layer=16, n_embd=512, n_head=4, n_head_kv=4, n_ff=512, vocab="llama-spm",
                      n_ctx_train=65536),
    # Llama-3.2-1B: 16 layers, 2048 embd, 32 heads, 8 KV heads, 8192 ff, 128256 vocab
    "llama-1b": Shape("llama-1b", n_layer=16, n_embd=2048, n_head=32, n_head_kv=8, n_ff=8192, vocab="llama-bpe",
                      weights="q8_0"),
}


def vocab_path(vocab: str) -> Path:
    p = VOCAB_DIR / f"ggml-vocab-{vocab}.gguf"
    if not p.exists():
        raise ConfigError(f"vocabulary {vocab!r} is not installed ({p}); choose one of "
                          f"{', '.join(sorted(q.name[11:-5] for q in VOCAB_DIR.glob('ggml-vocab-*.gguf')))}")
    return p


def _copy_tokenizer(writer, vocab_file: Path) -> int:
    import gguf

    reader = gguf.GGUFReader(vocab_file)
    n_vocab = 0
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(name, value)
            if name == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(name, value, vtype)
    return n_vocab


def write_model(path: str | os.PathLike, shape: Shape | str, seed: int = 0) -> Path:
    """Writes a model of the given shape to path (atomically) and returns the path."""
    import gguf

    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ConfigError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    path = Path(path)
    rng = np.random.default_rng(seed)
    head_dim = shape.n_embd // shape.n_head
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(f"dualblade synthetic {shape.name}")
        w.add_context_length(shape.n_ctx_train)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(head_dim)
        w.add_rope_freq_base(500000.0)
        qtype = gguf.GGMLQuantizationType.Q8_0 if shape.weights == "q8_0" else gguf.GGMLQuantizationType.F16
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if shape.weights == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        n_vocab = _copy_tokenizer(w, vocab_path(shape.vocab))
        w.add_vocab_size(n_vocab)

        def mat(name: str, rows: int, cols: int, scale: float = 0.02):
            a = (rng.standard_normal((rows, cols), dtype=np.float32) * scale)
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, a.astype(np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

        def norm(name: str, n: int):
            w.add_tensor(name, np.ones(n, dtype=np.float32))

        kv = shape.n_head_kv * head_dim
        mat("token_embd.weight", n_vocab, shape.n_embd, 1.0)
        for i in range(shape.n_layer):
            norm(f"blk.{i}.attn_norm.weight", shape.n_embd)
            mat(f"blk.{i}.attn_q.weight", shape.n_embd, shape.n_embd)
            mat(f"blk.{i}.attn_k.weight", kv, shape.n_embd)
            mat(f"blk.{i}.attn_v.weight", kv, shape.n_embd)
            mat(f"blk.{i}.attn_output.weight", shape.n_embd, shape.n_embd)
            norm(f"blk.{i}.ffn_norm.weight", shape.n_embd)
            mat(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
            mat(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
            mat(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
        norm("output_norm.weight", shape.n_embd)
        mat("output.weight", n_vocab, shape.n_embd)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cached_model(shape: str, seed: int = 0) -> Path:
    """The synthetic model of a named shape, written once into the cache directory."""
    from .models import cache_dir

    if shape not in SHAPES:
        raise ConfigError(f"unknown synthetic shape {shape!r}; choose one of {', '.join(SHAPES)}")
    d = cache_dir() / "synthetic"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{shape}-seed{seed}.gguf"
    if not path.exists():
        write_model(path, shape, seed=seed)
    return path
