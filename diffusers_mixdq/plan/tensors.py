"""The plan's tensor sidecar: a safetensors file beside plan.json (never pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PlanFormatError


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise PlanFormatError(
            f"The plan names a tensor sidecar '{path.name}', but there is no such file beside it ({path}). "
            "Copy the .safetensors file together with plan.json."
        )
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise PlanFormatError(f"The plan's tensor sidecar {path} is not a valid safetensors file: {e}") from None
