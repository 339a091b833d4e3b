"""Contracts every layer agrees on, at the bottom of the import graph (no torch import here).

- `TensorSpec`: a graph input or output that is not a model input (a cache buffer, a kept-index
  tensor, a SKIP step's scale). The FULL, CACHED and SKIP graphs, both runtimes, the ONNX manifest
  and the cache selectors (`tcpass.selectors`) all name caches through it.
- `MANIFEST_VERSION`: the format of what `tcpass export` writes and `tcpass.export.ort_runtime` reads.

The cache layout (the order of the caches, `tcpass.passes.layout`): first ``stack.residual`` when the
plan skips steps (a forecasting SKIP graph also reads ``stack.residual.1``.., the residuals of
earlier computed steps, which executors keep by `history_moves`), then per cached block
``block{b}.delta`` and, with ``attention="cached_kv"``, ``block{b}.attn{j}.key``/``.value``, then
the caches the token selector adds per block (its ``block_caches``), then the selector's graph-wide
caches (its ``graph_caches``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

MANIFEST_VERSION = 2


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output that is not a model input: a cache or a kept-index tensor."""

    name: str  # "block{b}.{kind}" for a block's cache, e.g. block3.delta, block3.attn0.key
    block: int  # -1: not a block's (stack.residual, predictor.input, the SKIP scale)
    kind: str  # "delta" | "key" | "value" | "input" | "score" | "residual" | "kept_indices" | "scale" | ...
    shape: tuple[int, ...]
    dtype: torch.dtype
    node: str = ""  # the graph node it belongs to (the attention node for key/value)

    @property
    def placeholder_name(self) -> str:
        """The graph placeholder's name (FX node names cannot contain dots)."""
        return self.name.replace(".", "_")

    def example(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """A tensor of this spec's shape: zeros for caches, tokens 0..K-1 for kept indices."""
        import torch

        if self.kind == "kept_indices":
            return torch.arange(self.shape[1], device=device).expand(self.shape).contiguous()
        return torch.zeros(self.shape, dtype=self.dtype, device=device)

    @property
    def nbytes(self) -> int:
        import torch

        return int(torch.Size(self.shape).numel()) * torch.empty((), dtype=self.dtype).element_size()


def block_cache(block: int, kind: str) -> str:
    """The name of block ``block``'s cache of ``kind`` (``block_cache(3, "input") == "block3.input"``)."""
    return f"block{block}.{kind}"


STACK_RESIDUAL = "stack.residual"


def residual_history(depth: int) -> list[str]:
    """Names of the stack residuals a SKIP graph reads, newest first: ``stack.residual`` (written by
    every FULL and CACHED graph), then ``stack.residual.1`` .. ``stack.residual.{depth - 1}``, the
    residuals of the computed steps before it."""
    return [STACK_RESIDUAL] + [f"{STACK_RESIDUAL}.{k}" for k in range(1, depth)]


def history_moves(names: list[str]) -> list[tuple[str, str]]:
    """``(destination, source)`` assignments every executor applies, in order, *before* a FULL or
    CACHED graph writes a new ``names[0]``: each remembered residual moves one place older."""
    return [(names[k], names[k - 1]) for k in range(len(names) - 1, 0, -1)]


def register_into(registry: dict[str, type], what: str) -> Callable[[type], type]:
    """A class decorator that registers a class under its ``kind`` in ``registry`` (token selectors,
    forecasters); ``what`` names the registry in errors. A kind registered twice is an error."""

    def register(cls: type) -> type:
        kind = cls.__dict__.get("kind")
        if not isinstance(kind, str) or not kind:
            raise TypeError(f"{cls.__name__}: a registered {what} sets kind, a non-empty string.")
        if kind in registry and registry[kind] is not cls:
            raise ValueError(f"{what} kind {kind!r} is registered twice ({registry[kind].__name__}, {cls.__name__}).")
        registry[kind] = cls
        return cls

    return register
