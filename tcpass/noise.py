"""Initial noise drawn per row from that row's own seed, so an image does not depend on its batch.

    noise = seeded_noise([7, 8, 9], (1, 32, 32))   # [3, 1, 32, 32] float32; row i from seed i alone

Drawing a batch's noise from one generator makes a row's noise depend on its position and on the
rows before it; a server that batches requests would then give a seed a different image under
load. numpy only (no torch), so the ONNX Runtime path uses the same noise as the torch path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_SEED = 2**63 - 1


def seeded_noise(seeds: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """Standard normal float32 noise [len(seeds), *shape]; row i depends on ``seeds[i]`` alone.

    Each row comes from its own ``numpy.random.default_rng(seed)`` (PCG64); seeds are 0..2**63-1.
    """
    for i, seed in enumerate(seeds):
        if not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"seeds[{i}] = {seed}: expected an integer in 0..{MAX_SEED}.")
    rows = [np.random.default_rng(int(seed)).standard_normal(tuple(shape), dtype=np.float32) for seed in seeds]
    return np.stack(rows) if rows else np.zeros((0, *shape), dtype=np.float32)
