"""Per-family differences, in one table: where the blocks are, what the model is called with.

The passes never look at model classes; everything family-specific is a row here. To support a new
family, add a `ModelAdapter` to `ADAPTERS` (and a golden test for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tcpass.plan import ModelFingerprint


@dataclass(frozen=True)
class ModelAdapter:
    """How tcpass drives one model family.

    Attributes:
        class_name: the diffusers class this row serves.
        block_prefixes: ModuleList attribute(s) holding the transformer blocks, in call order.
        input_names: the tensor inputs of ``forward`` that become graph inputs, in order.
        timestep_input: which input carries the timestep the TPRR schedule is keyed on.
        example_inputs: builds example inputs ``{name: tensor}`` from the model's config.
        fingerprint: what a plan records about the model (block count, hidden size).
    """

    class_name: str
    block_prefixes: tuple[str, ...]
    input_names: tuple[str, ...]
    timestep_input: str
    example_inputs: Callable[[nn.Module, int], dict[str, torch.Tensor]]
    fingerprint: Callable[[nn.Module], ModelFingerprint]


def _dit_example_inputs(model: nn.Module, batch: int) -> dict[str, torch.Tensor]:
    cfg = model.config
    p = next(model.parameters())
    size = cfg.sample_size
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, size, size, dtype=p.dtype, device=p.device),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=p.device),
        "class_labels": torch.zeros(batch, dtype=torch.long, device=p.device),
    }


def _dit_fingerprint(model: nn.Module) -> ModelFingerprint:
    cfg = model.config
    return ModelFingerprint(
        model_class=type(model).__name__,
        num_blocks=cfg.num_layers,
        hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
    )


ADAPTERS: dict[str, ModelAdapter] = {
    "DiTTransformer2DModel": ModelAdapter(
        class_name="DiTTransformer2DModel",
        block_prefixes=("transformer_blocks",),
        input_names=("hidden_states", "timestep", "class_labels"),
        timestep_input="timestep",
        example_inputs=_dit_example_inputs,
        fingerprint=_dit_fingerprint,
    ),
}


def adapter_for(model: object) -> ModelAdapter:
    """The adapter row for ``model``; ``TypeError`` listing the supported families otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise TypeError(
            f"tcpass does not support {name}; supported model classes: {sorted(ADAPTERS)}. "
            "To add a family, add a ModelAdapter row to tcpass.adapters.ADAPTERS naming its block "
            "list(s) and forward inputs."
        )
    return ADAPTERS[name]


def load_transformer(path: str) -> nn.Module:
    """Load a supported diffusers transformer with ``from_pretrained`` (a local directory or a hub id).

    The class comes from the ``_class_name`` in its ``config.json``; a pipeline directory with a
    ``transformer/`` subfolder works too.
    """
    import json
    from pathlib import Path

    import diffusers

    root = Path(path)
    subfolder = "transformer" if (root / "transformer" / "config.json").is_file() else None
    config_file = root / (subfolder or "") / "config.json"
    if config_file.is_file():
        class_name = json.loads(config_file.read_text()).get("_class_name")
    else:  # a hub id: let diffusers resolve it
        from huggingface_hub import hf_hub_download

        class_name = json.loads(Path(hf_hub_download(str(path), "config.json")).read_text()).get("_class_name")
    if class_name not in ADAPTERS:
        raise TypeError(f"{path}: model class {class_name!r} is not supported; supported: {sorted(ADAPTERS)}.")
    return getattr(diffusers, class_name).from_pretrained(path, subfolder=subfolder).eval()
