"""``static``: a score table per (block, timestep), chosen outside the graph.

Block ``b`` keeps the top-K tokens of its row at the nearest tabulated timestep (the same tokens for
every batch row). The table is a safetensors file (``scores`` [num_blocks, num_timesteps, N],
``timesteps`` [num_timesteps], ``blocks`` [num_blocks]) at ``selector.path``, guarded by
``selector.sha256``; the static Cache Predictor (`tcpass.predictor`) writes one. Top-K is a stable
descending sort (ties keep the lower token index), one definition for the torch runtime and the
ONNX Runtime one (which reads the table from the export as plain numpy).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tcpass.files import check_sha256
from tcpass.selectors.base import TokenSelector, register_selector


def _numpy(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


class StaticScoreSelector:
    """A score table ``scores[block, timestep, token]``; ``indices`` is the top-K of the nearest timestep's row.

    Accepts numpy arrays or torch tensors (kept as numpy: the numpy runtime uses it without torch).
    """

    def __init__(self, scores, timesteps, blocks) -> None:
        scores, timesteps, blocks = _numpy(scores, np.float32), _numpy(timesteps, np.float32), _numpy(blocks, np.int64)
        if scores.ndim != 3 or scores.shape[:2] != (len(blocks), len(timesteps)):
            raise ValueError(
                f"static scores have shape {tuple(scores.shape)}; expected "
                f"[{len(blocks)} blocks, {len(timesteps)} timesteps, num_tokens]."
            )
        self.scores, self.timesteps = scores, timesteps
        self.rows = {int(b): i for i, b in enumerate(blocks.tolist())}
        self._memo: dict[tuple, np.ndarray] = {}

    @property
    def blocks(self) -> list[int]:
        return sorted(self.rows, key=self.rows.get)

    @classmethod
    def load(cls, path: str | Path, sha256: str | None = None) -> StaticScoreSelector:
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"static selector scores file {path} does not exist.")
        if sha256 is not None:
            check_sha256(path, sha256, "the plan's selector.sha256")
        tensors = load_file(str(path))
        missing = {"scores", "timesteps", "blocks"} - set(tensors)
        if missing:
            raise ValueError(f"{path}: missing tensors {sorted(missing)} (need scores, timesteps, blocks).")
        return cls(tensors["scores"], tensors["timesteps"], tensors["blocks"])

    def save(self, path: str | Path) -> str:
        """Write the table as safetensors; returns its sha256 for ``SelectorSpec.sha256``."""
        from safetensors.numpy import save_file

        from tcpass.files import sha256_of

        blocks = np.asarray(self.blocks, dtype=np.int64)
        save_file(
            {"scores": np.ascontiguousarray(self.scores), "timesteps": self.timesteps, "blocks": blocks}, str(path)
        )
        return sha256_of(path)

    def indices(self, block: int, shape: tuple[int, int], num_tokens: int, timestep: float) -> np.ndarray:
        if block not in self.rows:
            raise ValueError(f"static scores have no row for block {block}; rows: {sorted(self.rows)}.")
        if self.scores.shape[2] != num_tokens:
            raise ValueError(f"static scores cover {self.scores.shape[2]} tokens; the model has {num_tokens}.")
        row = int(np.abs(self.timesteps - np.float32(timestep)).argmin())
        key = (block, row, tuple(shape))
        if key not in self._memo:
            batch, k = shape
            top = np.argsort(-self.scores[self.rows[block], row], kind="stable")[:k]
            self._memo[key] = np.ascontiguousarray(np.broadcast_to(top, (batch, k)), dtype=np.int64)
        return self._memo[key]


@register_selector
class StaticSelector(TokenSelector):
    kind = "static"
    file_role = "token scores"
    in_graph = False

    def __init__(self, spec, plan_dir=None, table: StaticScoreSelector | None = None) -> None:
        super().__init__(spec, plan_dir)
        self.table = table if table is not None else StaticScoreSelector.load(self.path, spec.sha256)

    def indices(self, block, shape, num_tokens, timestep):
        return self.table.indices(block, shape, num_tokens, timestep)

    def export(self, out_dir, file_entry):
        np.save(out_dir / "static_scores.npy", self.table.scores, allow_pickle=False)
        np.save(out_dir / "static_timesteps.npy", self.table.timesteps, allow_pickle=False)
        return {
            "blocks": self.table.blocks,
            "scores": file_entry(out_dir / "static_scores.npy"),
            "timesteps": file_entry(out_dir / "static_timesteps.npy"),
        }

    @classmethod
    def from_manifest(cls, spec, entry, directory):
        load = lambda field: np.load(directory / entry[field]["file"], allow_pickle=False)  # noqa: E731
        return cls(spec, directory, StaticScoreSelector(load("scores"), load("timesteps"), entry["blocks"]))
