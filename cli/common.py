"""Pieces both commands use: resolving the model argument, errors that name the fix."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from dualblade.errors import ConfigError, ModelError
from dualblade.gguf_header import ModelInfo, model_info
from dualblade.models import bundled_model_path


def resolve_model(model: Optional[Path]) -> tuple[Path, ModelInfo]:
    """The model path (bundled one if None) and its header, validated before any weight is read."""
    path = bundled_model_path() if model is None else Path(model).expanduser()
    if model is not None and not path.exists():
        raise ModelError(f"model file {path} does not exist; give the path of a .gguf file "
                         "(or no MODEL for the bundled Gemma-3-270M)")
    return path, model_info(path)


def check_ctx(ctx_size: int, info: ModelInfo) -> None:
    if ctx_size <= 0:
        raise ConfigError(f"context size {ctx_size} is not positive; give a positive --ctx-size such as 4096")
    if info.n_ctx_train and ctx_size > info.n_ctx_train:
        raise ConfigError(f"context size {ctx_size} exceeds the model's training context ({info.n_ctx_train}); "
                          f"give --ctx-size {info.n_ctx_train} or less")
