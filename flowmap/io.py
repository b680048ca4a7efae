"""Checkpoints as safetensors with the model's full config in the metadata; never pickle.

A file holds a state dict plus ``{"flowmap_config": json}`` (schema in docs/architecture.md), so a
model is rebuilt from the file alone. Writes are atomic (temporary file, then ``os.replace``).

The one loading policy for files that enter flowmap: safetensors (``read_state``), or a torch zip
container read by ``load_torch_file`` with ``weights_only=True`` forced here, whatever the torch version
or the environment (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``). Anything else is refused with one line.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import random
import re
import stat
import struct
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


_TEMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?$")  # ".<name>.<8 random>.tmp[.ext]"
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"
_NAMES = random.SystemRandom()  # not the global generator: a seeded run's random stream stays untouched


def _open_temp(path: Path, suffix: str) -> tuple[str, int]:
    """Create ``.<name>.<8 random>.tmp<suffix>`` next to ``path`` with mode 0o666 & ~umask (the kernel applies the
    process umask as for any new file); returns (path, that mode). ``mkstemp``'s 0o600 would hide artefacts from
    the other users of a shared server."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{''.join(_NAMES.choices(_ALPHABET, k=8))}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return str(tmp), stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")


def atomic_write(path: str | Path, write, suffix: str = "") -> None:
    """Call ``write(tmp_path)`` then move the file into place, so a crash leaves nothing half-written.

    The temporary file ``.<name>.<8 random>.tmp<suffix>`` (``suffix`` for writers that want an extension, e.g.
    ``.pt2``) ends with the mode a new file gets under the process umask, also when ``write`` recreates it with
    its own mode (safetensors writes 0o600). A write killed midway leaves it behind for ``remove_stale_temps``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _open_temp(path, suffix)
    try:
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temps(folder: str | Path, target: str = "*") -> list[Path]:
    """Delete the temporary files that ``atomic_write`` left in ``folder`` when a write was killed, for targets whose
    name matches the glob ``target`` (``"*.ckpt"``, or one file's name); anything else is left alone.

    Call it at the start of a run, before that run writes: a temp file is stale once its writer is gone."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        match = _TEMP.match(entry.name)
        if match and fnmatch.fnmatchcase(match["name"], target) and entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:  # gone already
                pass
    return removed


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
        raise CheckpointError(
            f"{path}: a safetensors file without a flowmap config (was it written by flowmap.io.save_model?)"
        )
    try:
        config = json.loads(meta[CONFIG_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: the {CONFIG_KEY} metadata is not valid JSON ({err}); the file is damaged"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the {CONFIG_KEY} metadata is not a JSON object; the file is damaged")
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
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
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


def file_kind(path: str | Path) -> str:
    """'safetensors', 'torch-zip' (torch.save's container), 'pickle' (a bare pickle stream) or 'unknown',
    from the first bytes of the file (never from its name)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= path.stat().st_size - 8:
        return "safetensors"  # u64 header length, then the JSON header
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


@contextlib.contextmanager
def _no_unsafe_load_override():
    """Hide ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` (which some torch versions let override ``weights_only``)."""
    saved = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = saved


def load_torch_file(path: str | Path, expected: str, map_location="cpu") -> dict:
    """A dict from a ``torch.save`` zip file read with ``weights_only=True`` (tensors and plain containers
    only: no code of the file can run). Anything else raises one CheckpointError naming ``path`` and ``expected``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; expected {expected}")
    kind = file_kind(path)
    if kind != "torch-zip":
        found = {"safetensors": "a safetensors file", "pickle": "a bare pickle stream (never loaded)"}
        what = found.get(kind, "not a PyTorch file")
        raise CheckpointError(f"{path}: {what}; expected {expected}")
    try:
        with _no_unsafe_load_override():
            data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: refused: the file holds pickled Python objects other than tensors and plain containers, or is "
            f"damaged ({first}); it was read with torch.load(weights_only=True), so none of its code was run. "
            f"Expected {expected}"
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{path}: a PyTorch file holding a {type(data).__name__}, not a dict; expected {expected}"
        )
    return data


def nonfinite_tensors(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding a NaN or an infinity."""
    return [
        k
        for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def fingerprint(state: dict[str, Tensor]) -> str:
    """A short content hash of a state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for key in sorted(state):
        v = state[key]
        if not torch.is_tensor(v):
            continue
        v = v.detach().to("cpu").contiguous()
        h.update(f"{key}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()[:16]
