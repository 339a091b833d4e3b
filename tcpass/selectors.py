"""Token selectors that run outside the graph and feed it kept-index tensors [B, K].

The ``input_change`` selector lives inside the graph (see `tcpass.passes.cached_step`); the ones
here produce indices before a CACHED call: ``random`` (seeded per generation) and ``static`` (a
score table per block and timestep, the interface a trained static Cache Predictor fills).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tcpass.files import sha256_of
from tcpass.passes.layout import TensorSpec
from tcpass.plan import SelectorSpec


class RandomSelector:
    """K tokens per row, uniformly at random; the generator is reseeded at every new generation."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.generator = torch.Generator()
        self.reset()

    def reset(self) -> None:
        self.generator.manual_seed(self.seed)

    def indices(self, spec: TensorSpec, num_tokens: int, timestep: float, device: torch.device) -> torch.Tensor:
        batch, k = spec.shape
        noise = torch.rand(batch, num_tokens, generator=self.generator)
        return noise.topk(k, dim=1).indices.to(device)


class StaticScoreSelector:
    """Top-K of a fixed score table ``scores[block, timestep, token]``, nearest tabulated timestep.

    Indices are the same for every batch row and are computed once per (block, timestep, K).
    """

    def __init__(self, scores: torch.Tensor, timesteps: torch.Tensor, blocks: torch.Tensor) -> None:
        if scores.dim() != 3 or scores.shape[:2] != (len(blocks), len(timesteps)):
            raise ValueError(
                f"static scores have shape {tuple(scores.shape)}; expected "
                f"[{len(blocks)} blocks, {len(timesteps)} timesteps, num_tokens]."
            )
        self.scores = scores.float()
        self.timesteps = timesteps.float()
        self.rows = {int(b): i for i, b in enumerate(blocks.tolist())}
        self._memo: dict[tuple, torch.Tensor] = {}

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> StaticScoreSelector:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"static selector scores file {path} does not exist.")
        if sha256 is not None:
            digest = sha256_of(path)
            if digest != sha256:
                raise ValueError(f"{path}: sha256 {digest} does not match the plan's selector.sha256 {sha256}.")
        tensors = load_file(str(path))
        missing = {"scores", "timesteps", "blocks"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)} (need scores, timesteps, blocks).")
        return cls(tensors["scores"], tensors["timesteps"], tensors["blocks"])

    def save(self, path: str | Path) -> str:
        """Write the table as safetensors; returns its sha256 for ``SelectorSpec.sha256``."""
        blocks = torch.tensor(sorted(self.rows, key=self.rows.get), dtype=torch.long)
        save_file({"scores": self.scores.contiguous(), "timesteps": self.timesteps, "blocks": blocks}, str(path))
        return sha256_of(path)

    def reset(self) -> None:
        pass

    def indices(self, spec: TensorSpec, num_tokens: int, timestep: float, device: torch.device) -> torch.Tensor:
        if spec.block not in self.rows:
            raise ValueError(f"static scores have no row for block {spec.block}; rows: {sorted(self.rows)}.")
        if self.scores.shape[2] != num_tokens:
            raise ValueError(f"static scores cover {self.scores.shape[2]} tokens; the model has {num_tokens}.")
        t_row = int((self.timesteps - timestep).abs().argmin())
        key = (spec.block, t_row, spec.shape, device)
        if key not in self._memo:
            batch, k = spec.shape
            top = self.scores[self.rows[spec.block], t_row].topk(k).indices
            self._memo[key] = top.expand(batch, k).contiguous().to(device)
        return self._memo[key]


def make_selector(spec: SelectorSpec, plan_dir: Path | None = None) -> RandomSelector | StaticScoreSelector | None:
    """The out-of-graph selector for ``spec``, or ``None`` when selection happens inside the graph."""
    if spec.kind == "random":
        return RandomSelector(spec.seed)
    if spec.kind == "static":
        path = Path(spec.path)
        if not path.is_absolute() and plan_dir is not None:
            path = plan_dir / path
        return StaticScoreSelector.load(path, spec.sha256)
    return None
