"""``random``: K tokens drawn uniformly per batch row, outside the graph (the baseline every selector
must beat).

The generator (numpy's, seeded with ``selector.seed``) is reseeded at every new generation; each
CACHED call draws one [B, N] uniform matrix per cached block, in the graph's index-input order, and
keeps the K smallest per row. The torch runtime and the ONNX Runtime one use this same definition,
so they keep the same tokens.
"""

from __future__ import annotations

import numpy as np

from tcpass.selectors.base import TokenSelector, register_selector


@register_selector
class RandomSelector(TokenSelector):
    kind = "random"
    in_graph = False

    def __init__(self, spec, plan_dir=None) -> None:
        super().__init__(spec, plan_dir)
        self.reset()

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.spec.seed)

    def indices(self, block, shape, num_tokens, timestep):
        batch, k = shape
        return np.argsort(self.rng.random((batch, num_tokens)), axis=1)[:, :k].astype(np.int64)
