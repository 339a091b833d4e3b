"""Loaders shared by the reference models: a diffusers DiT directory and a safetensors classifier."""

from __future__ import annotations

from pathlib import Path

from torch import nn


def load_dit(path: str | Path, train_module: str):
    """The DiT saved at ``path`` (diffusers ``save_pretrained`` format), in eval mode.

    Raises ``FileNotFoundError`` naming ``python -m <train_module>``, the command that writes it.
    """
    from diffusers import DiTTransformer2DModel

    from tcpass.adapters import quiet_load_kwargs

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no reference model at {path}; train it with `python -m {train_module} --out {path}`.")
    return DiTTransformer2DModel.from_pretrained(path, **quiet_load_kwargs()).eval()


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """``model`` with the safetensors state dict at ``path`` loaded, in eval mode."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))
    return model.eval()
