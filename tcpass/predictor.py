"""Cache Predictors: which tokens a cached block recomputes, learned from the frozen model.

Two kinds, both trained by `tcpass.calibrate.train_predictor` with the soft mixture
``out = w * fresh + (1 - w) * cached`` per token and block:

- `StaticPredictor` (TokenCache v1): ``g(block, timestep) -> logits [num_tokens]``. It sees no
  image content, so its top-K indices are tabulated per (block, timestep) ahead of time
  (`StaticPredictor.table`) and cost nothing at inference (selector kind ``static``).
- `DynamicPredictor` (TokenCache v2): a small network on the tokens entering the first block, how
  they changed since the last FULL step, and the timestep,
  ``(x0 [B, N, D], t [B], x0_ref [B, N, D]) -> logits [B, N, num_blocks]``. It runs inside the
  CACHED graph, followed by a fixed-K top-k (selector kind ``dynamic``).

Weights are safetensors with their configuration in the file's metadata; no pickle.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tcpass.files import check_sha256, sha256_of

NUM_FREQUENCIES = 8  # sinusoidal timestep features: 2 * NUM_FREQUENCIES values
TIMESTEP_RANGE = 1000.0  # timesteps are read in [0, TIMESTEP_RANGE)


def timestep_features(t: torch.Tensor, num_frequencies: int = NUM_FREQUENCIES) -> torch.Tensor:
    """``t`` [B] (model timestep units) -> [B, 2 * num_frequencies] low-frequency sin/cos features."""
    t = t.float().reshape(-1, 1) / TIMESTEP_RANGE
    freqs = math.pi * torch.arange(1, num_frequencies + 1, device=t.device, dtype=torch.float32)
    angles = t * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


class StaticPredictor(nn.Module):
    """Token logits per (block, timestep), independent of the image: ``logits = table(features(t))``.

    Args:
        num_blocks: transformer blocks of the model (one row of scores each).
        num_tokens: image tokens N.
        device: where its parameters live (the model's device when training it).
    """

    kind = "static"

    def __init__(self, num_blocks: int, num_tokens: int, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_blocks, self.num_tokens = num_blocks, num_tokens
        self.bias = nn.Parameter(torch.zeros(num_blocks, num_tokens, device=device))
        self.weight = nn.Parameter(torch.zeros(num_blocks, 2 * NUM_FREQUENCIES, num_tokens, device=device))

    def forward(self, x0: torch.Tensor | None, t: torch.Tensor, x0_ref: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, N, num_blocks] (``x0``/``x0_ref`` are ignored: the same interface as the dynamic one)."""
        feats = timestep_features(t)  # [B, F]
        logits = self.bias + torch.einsum("bf,lfn->bln", feats, self.weight)  # [B, L, N]
        return logits.transpose(1, 2)

    def config(self) -> dict:
        return {"num_blocks": self.num_blocks, "num_tokens": self.num_tokens}

    @torch.no_grad()
    def table(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Scores [num_blocks, len(timesteps), N] for `tcpass.selectors.StaticScoreSelector`."""
        return self.forward(None, timesteps).permute(2, 0, 1).contiguous()


class DynamicPredictor(nn.Module):
    """Token logits from the current tokens and their change since the last FULL step.

    With ``c = x0 - x0_ref`` (``x0_ref``: block 0's input at the last FULL step)::

        h = silu(W_in · layer_norm(x0) + W_c · c / rms(c) + W_t · features(t))
        logits = W_out · h + gain * centred(log(|c|^2 + eps))   # [B, N, num_blocks]

    At initialisation (``W_out = 0``, ``gain = 1``) it ranks tokens by how much their input changed,
    a strong training-free choice; training learns per-block corrections. About
    ``width * (2 * hidden_size + num_blocks + 16)`` parameters (width 32, hidden 1152: 75 k).

    Args:
        hidden_size: token width D of the model.
        num_blocks: transformer blocks of the model.
        width: hidden width of the MLP.
        device: where its parameters live (the model's device when training it).
    """

    kind = "dynamic"

    def __init__(
        self, hidden_size: int, num_blocks: int, width: int = 32, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.hidden_size, self.num_blocks, self.width = hidden_size, num_blocks, width
        self.inp = nn.Linear(hidden_size, width, device=device)
        self.change = nn.Linear(hidden_size, width, bias=False, device=device)
        self.time = nn.Linear(2 * NUM_FREQUENCIES, width, device=device)
        self.out = nn.Linear(width, num_blocks, device=device)
        self.gain = nn.Parameter(torch.ones(num_blocks, device=device))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x0: torch.Tensor, t: torch.Tensor, x0_ref: torch.Tensor) -> torch.Tensor:
        x = nn.functional.layer_norm(x0, (self.hidden_size,))
        c = x0 - x0_ref
        energy = (c * c).sum(-1, keepdim=True)  # [B, N, 1]
        rms = (energy.mean(dim=1, keepdim=True) / self.hidden_size + 1e-12).sqrt()
        h = self.inp(x) + self.change(c / rms) + self.time(timestep_features(t).to(x.dtype)).unsqueeze(1)
        log_energy = torch.log(energy + 1e-6)
        log_energy = log_energy - log_energy.mean(dim=1, keepdim=True)  # centred per row: w ~ 0.5 at init
        return self.out(nn.functional.silu(h)) + self.gain * log_energy

    def config(self) -> dict:
        return {"hidden_size": self.hidden_size, "num_blocks": self.num_blocks, "width": self.width}


KINDS = {"static": StaticPredictor, "dynamic": DynamicPredictor}


def save_predictor(predictor: DynamicPredictor, path: str | Path) -> str:
    """Write a dynamic predictor as safetensors (config in metadata); returns the file's sha256."""
    tensors = {k: v.detach().float().contiguous() for k, v in predictor.state_dict().items()}
    meta = {"tcpass_predictor": predictor.kind, "config": json.dumps(predictor.config())}
    save_file(tensors, str(path), metadata=meta)
    return sha256_of(path)


def load_predictor(
    path: str | Path, sha256: str | None, *, hidden_size: int | None = None, num_blocks: int | None = None
) -> DynamicPredictor:
    """Load a dynamic predictor written by `save_predictor`, checking checksum and model fit.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: checksum mismatch, not a tcpass predictor file, or made for another model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"predictor weights file {path} does not exist (plan selector.path); re-run `tcpass calibrate` "
            "or copy the file next to the plan."
        )
    if sha256 is not None:
        check_sha256(path, sha256, "the plan's selector.sha256")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if meta.get("tcpass_predictor") != "dynamic":
        raise ValueError(
            f"{path}: not a tcpass dynamic predictor file (metadata tcpass_predictor={meta.get('tcpass_predictor')!r})."
        )
    config = json.loads(meta["config"])
    for name, want in (("hidden_size", hidden_size), ("num_blocks", num_blocks)):
        if want is not None and config[name] != want:
            raise ValueError(f"{path}: predictor {name} = {config[name]} but the model has {name} = {want}.")
    predictor = DynamicPredictor(**config, device="cpu")  # where safetensors loaded the weights
    predictor.load_state_dict(tensors)
    return predictor.eval().requires_grad_(False)
