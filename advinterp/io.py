"""Files that survive a crash: atomic writes and safetensors checkpoints."""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from advinterp.errors import UserError


def cache_dir() -> Path:
    """Where advinterp keeps derived files: ``$ADVINTERP_CACHE``, else
    ``$XDG_CACHE_HOME/advinterp``, else ``~/.cache/advinterp``."""
    if os.environ.get("ADVINTERP_CACHE"):
        return Path(os.environ["ADVINTERP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "advinterp"


def out_folder(path: str | Path) -> Path:
    """``path`` as an output folder, created, checked writable before any work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file: give a folder (it is created when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write into --out {path}: {e.strerror or e}") from None
    return path


def atomic_replace(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    atomic_replace(path, write)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_replace(path, lambda tmp: save_file(tensors, tmp))


_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``/``.ckpt``.

    ``.pth``-style files are read with ``torch.load(weights_only=True)`` on the
    CPU; a checkpoint dict whose ``"state_dict"`` or ``"model"`` entry holds the
    weights is unwrapped, and a ``module.`` prefix (DataParallel/DDP) stripped.
    Raises :class:`UserError` when the file is missing, corrupt, or holds
    something other than tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ValueError …
            raise UserError(
                f"cannot read weights file {path} as safetensors ({_one_line(e)}); "
                "the file is corrupt or not safetensors: re-export it with "
                "safetensors.torch.save_file(model.state_dict(), path)"
            ) from None
    elif suffix in _TORCH_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "weights only" not in str(e).lower():
                raise UserError(
                    f"cannot read weights file {path} ({_one_line(e)}); the file is corrupt or "
                    "not a PyTorch checkpoint: save it again with torch.save(model.state_dict(), path)"
                ) from None
            raise UserError(
                f"weights file {path} holds objects other than tensors, which are never "
                "unpickled; save only the weights: torch.save(model.state_dict(), path), "
                "or use .safetensors"
            ) from None
        except Exception as e:  # zip errors, EOFError, KeyError, RuntimeError …
            raise UserError(
                f"cannot read weights file {path} ({_one_line(e)}); the file is corrupt "
                "or not a PyTorch checkpoint: save it again with torch.save(model.state_dict(), path)"
            ) from None
        state = _unwrap_checkpoint(state, path)
    else:
        raise UserError(
            f"unknown weights format '{path.suffix}' for {path}; use a .safetensors "
            "or .pth/.pt file"
        )
    if not isinstance(state, Mapping) or not state:
        raise UserError(f"weights file {path} holds no state dict; save model.state_dict() to it")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(
            f"weights file {path} holds non-tensor entries (e.g. {bad[0]!r}); "
            "save model.state_dict() to it"
        )
    keys = list(state)
    if all(k.startswith("module.") for k in keys):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def _unwrap_checkpoint(obj, path: Path):
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner:
                return inner
    if isinstance(obj, nn.Module):  # unreachable with weights_only, kept for clarity
        raise UserError(f"weights file {path} holds a whole module; save model.state_dict()")
    return obj


def load_weights(net: nn.Module, state: Mapping[str, torch.Tensor], *, what: str, source) -> None:
    """Load ``state`` into ``net`` strictly; on any mismatch raise a one-line :class:`UserError`.

    ``what`` names the model and ``source`` the file in the message.
    """
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:2])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})")
        if shapes:
            parts.append(f"{len(shapes)} tensors of another shape (e.g. {shapes[0]})")
        hint = "check the model name"
        if shapes and not missing and not unexpected:
            hint += " or pass num_classes to match the file"
        raise UserError(f"weights in {source} do not fit {what}: {'; '.join(parts)}; {hint}")
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"weights in {source} do not fit {what}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
