"""Checkpoints as safetensors with the model's full config in the metadata; never pickle.

A file holds a state dict plus ``{"flowmap_config": json}`` (schema in docs/architecture.md), so a
model is rebuilt from the file alone. Writes are atomic (temporary file, then ``os.replace``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

FORMAT = "flowmap"
VERSION = 1
CONFIG_KEY = "flowmap_config"


class CheckpointError(ValueError):
    """A file that is not a flowmap checkpoint, or one that does not fit the model."""


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then move the file into place, so a crash leaves nothing half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(path: str | Path, module: nn.Module, config: dict) -> Path:
    """Save ``module.state_dict()`` (cloned, contiguous, on CPU: safetensors refuses shared storage)."""
    config = {"format": FORMAT, "version": VERSION, **config}
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(config)}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))
    return Path(path)


def read_config(path: str | Path) -> dict:
    """The config stored in a flowmap safetensors file; one clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for foreign files
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({type(err).__name__}: {err})") from None
    if CONFIG_KEY not in meta:
        raise CheckpointError(f"{path}: a safetensors file without a flowmap config (was it written by flowmap.io.save_model?)")
    config = json.loads(meta[CONFIG_KEY])
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {config.get('format')!r}")
    return config


def read_state(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) of a flowmap safetensors file."""
    config = read_config(path)
    state: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            state[key] = f.get_tensor(key)
    return state, config


def load_state_strict(module: nn.Module, state: dict[str, Tensor], what: str = "checkpoint") -> None:
    """load_state_dict with one readable error naming missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise CheckpointError(f"{what} does not fit the network: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def load_matching(module: nn.Module, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """Copy every tensor of ``state`` whose name and shape fit ``module``; returns (copied, skipped).

    Used to initialize a student from a teacher: what does not fit keeps its own (zero) init."""
    own = module.state_dict()
    fit = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(fit))
    with torch.no_grad():
        for k, v in fit.items():
            own[k].copy_(v)
    return sorted(fit), skipped
