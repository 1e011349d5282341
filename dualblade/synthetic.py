"""Synthetic GGUF models: random weights, a real tokenizer, a named shape.

For tests and benchmarks of shapes no package ships (nothing is downloaded from a model hub).
Two architectures: llama (dense GQA) and gemma3 (interleaved sliding-window attention: most layers see only
the last n_swa tokens, every swa_pattern-th layer sees all of them).
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
    arch: str = "llama"  # llama | gemma3
    head_dim: int | None = None  # None: n_embd // n_head (gemma3 decouples them: attention.key_length)
    n_swa: int = 0  # gemma3: the sliding window in tokens (0: every layer global)
    swa_pattern: int = 6  # gemma3: every swa_pattern-th layer is global (6: llama.cpp's default, no key written)

    @property
    def n_embd_head(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    def is_swa(self, il: int) -> bool:
        """Whether layer il attends within the sliding window (llama.cpp's set_swa_pattern)."""
        return self.n_swa > 0 and il % self.swa_pattern < self.swa_pattern - 1


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
    # iSWA, small and fast: 8 layers, 6 with a 128-token window and 2 global (3 and 7); 4 heads on 1 KV head of
    # 128 dims (wider than n_embd / n_head, as in Gemma 3): 512 bytes of f16 KV per token and layer
    "gemma3-tiny": Shape("gemma3-tiny", n_layer=8, n_embd=256, n_head=4, n_head_kv=1, n_ff=512, vocab="llama-spm",
                         n_ctx_train=32768, arch="gemma3", head_dim=128, n_swa=128, swa_pattern=4),
    # Gemma-3-1B: 26 layers (5, 11, 17, 23 global), 1152 embd, 4 heads, 1 KV head of 256 dims, 6912 ff, a
    # 512-token window; the tokenizer is llama-spm's 32000 tokens, not Gemma's 262144 (the weights are 0.8 GB)
    "gemma3-1b": Shape("gemma3-1b", n_layer=26, n_embd=1152, n_head=4, n_head_kv=1, n_ff=6912, vocab="llama-spm",
                       n_ctx_train=32768, weights="q8_0", arch="gemma3", head_dim=256, n_swa=512),
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
    if shape.arch not in ("llama", "gemma3"):
        raise ConfigError(f"synthetic models are of the llama or gemma3 architecture, not {shape.arch!r}")
    path = Path(path)
    rng = np.random.default_rng(seed)
    head_dim = shape.n_embd_head
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, shape.arch)
        w.add_name(f"dualblade synthetic {shape.name}")
        w.add_context_length(shape.n_ctx_train)
        w.add_embedding_length(shape.n_embd)
        w.add_block_count(shape.n_layer)
        w.add_feed_forward_length(shape.n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head_kv)
        if shape.arch == "gemma3":
            w.add_layer_norm_rms_eps(1e-6)
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_rope_freq_base(1000000.0)  # global layers; the window's layers: llama.cpp's 10000
            if shape.n_swa:
                w.add_sliding_window(shape.n_swa)
                if shape.swa_pattern != 6:
                    # as one flag per layer: the form every reader of the header (gguf_header) understands
                    w.add_sliding_window_pattern([shape.is_swa(il) for il in range(shape.n_layer)])
        else:
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

        def norm(name: str, n: int, value: float = 1.0):
            w.add_tensor(name, np.full(n, value, dtype=np.float32))

        q = shape.n_head * head_dim
        kv = shape.n_head_kv * head_dim
        if shape.arch == "gemma3":
            # the output is this matrix too (tied, as in Gemma 3). llama.cpp scales the input by sqrt(n_embd):
            # rows of norm 0.1 enter the residual at rms 0.1, below what each layer adds (its post-norms give
            # rms 1), so a token does not predict itself over and over; the logits' spread is about 0.1
            mat("token_embd.weight", n_vocab, shape.n_embd, 0.1 * shape.n_embd ** -0.5)
        else:
            mat("token_embd.weight", n_vocab, shape.n_embd, 1.0)
        for i in range(shape.n_layer):
            norm(f"blk.{i}.attn_norm.weight", shape.n_embd)
            mat(f"blk.{i}.attn_q.weight", q, shape.n_embd)
            mat(f"blk.{i}.attn_k.weight", kv, shape.n_embd)
            mat(f"blk.{i}.attn_v.weight", kv, shape.n_embd)
            mat(f"blk.{i}.attn_output.weight", shape.n_embd, q)
            norm(f"blk.{i}.ffn_norm.weight", shape.n_embd)
            mat(f"blk.{i}.ffn_gate.weight", shape.n_ff, shape.n_embd)
            mat(f"blk.{i}.ffn_up.weight", shape.n_ff, shape.n_embd)
            mat(f"blk.{i}.ffn_down.weight", shape.n_embd, shape.n_ff)
            if shape.arch == "gemma3":
                # the RMS norms of q and k per head, and after attention and the feed-forward (GGUF holds
                # Gemma's 1 + w: ones are the identity). q's norm of 3 spreads the attention scores (std ~3,
                # not ~1): with ones, 26 layers that each average a long context flatten every position to
                # the same state and the greedy text repeats one token
                norm(f"blk.{i}.attn_q_norm.weight", head_dim, 3.0)
                norm(f"blk.{i}.attn_k_norm.weight", head_dim)
                norm(f"blk.{i}.post_attention_norm.weight", shape.n_embd)
                norm(f"blk.{i}.post_ffw_norm.weight", shape.n_embd)
        norm("output_norm.weight", shape.n_embd)
        if shape.arch != "gemma3":
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
