"""Our model artifacts on disk: safetensors for tensors, small JSON files for settings.

    from dalipipe.models.artifacts import save_state, load_state, write_config, read_config
    save_state("prefix.safetensors", {"prefix": tensor})

Nothing is pickled (DEVELOPING.md); official CAV-MAE files are the one exception and are read
with `torch.load(weights_only=True)` in `dalipipe.models.cavmae`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dalipipe.common import atomic_path


def save_state(
    path: str | Path, state: dict[str, torch.Tensor], metadata: dict | None = None
) -> None:
    """Write tensors atomically; shared or strided tensors are copied to contiguous storage."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return load_file(str(path), device=str(device))
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def write_config(path: str | Path, config: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config
