"""`TokenSelector`: everything one way of choosing kept tokens contributes, in one class.

A CACHED step recomputes K of a cached block's N tokens. A selector decides which, and owns all that
this takes:

- ``check(spec)``: what its `SelectorSpec` fields must hold (a file and its sha256, a seed...).
- Caches: ``block_caches`` (per cached block, after the block's delta and K/V caches) and
  ``graph_caches`` (once per graph, after all blocks' caches), in the layout both graphs share.
- FULL graph: ``full_values``/``graph_full_values``, the nodes those caches are filled from.
- CACHED graph, in the graph: ``begin_cached`` (once per graph, before the blocks), ``kept_score``
  (a [B, N] score per block, whose top-K the pass keeps), ``after_keep`` (its caches' updates).
  ``kept_score`` returning ``None`` means the indices come from outside the graph.
- Outside the graph (``in_graph = False``): ``indices``, one numpy definition used by the torch
  runtime and the ONNX Runtime one alike, and ``export``/``from_manifest`` for the export.

Graph hooks import torch when called, so that this package (and the numpy runtime that uses its
``indices``) imports without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from tcpass.contracts import TensorSpec, register_into
from tcpass.files import resolve_path

if TYPE_CHECKING:
    from torch import fx, nn

    from tcpass.passes.emit import Emitter
    from tcpass.passes.token_axis import TokenAxes
    from tcpass.plan import SelectorSpec
    from tcpass.trace import BlockSpan


SELECTORS: dict[str, type[TokenSelector]] = {}


register_selector = register_into(SELECTORS, "token selector")
"""Class decorator: registers a class under its ``kind`` (a kind registered twice is an error)."""


class TokenSelector:
    """Base selector: every hook does nothing. Subclasses set ``kind`` and override what they need."""

    kind: ClassVar[str]
    # a selector.path + selector.sha256 the selector reads ("token scores", "predictor weights"), or None
    file_role: ClassVar[str | None] = None
    # True: kept indices are chosen inside the CACHED graph; False: by ``indices`` outside it
    in_graph: ClassVar[bool] = True

    def __init__(self, spec: SelectorSpec, plan_dir: str | Path | None = None) -> None:
        self.spec = spec
        self.plan_dir = plan_dir

    @classmethod
    def check(cls, spec: SelectorSpec) -> None:
        """Raise ``ValueError`` naming the field if ``spec`` does not configure this selector."""
        if cls.file_role and not spec.path:
            raise ValueError(
                f"selector.kind = {spec.kind!r} needs selector.path: a safetensors file of {cls.file_role} "
                "(written by `tcpass calibrate`)."
            )
        if cls.file_role and not spec.sha256:
            raise ValueError(
                f"selector.kind = {spec.kind!r} needs selector.sha256, the checksum of selector.path "
                "(`tcpass calibrate` writes it; `sha256sum FILE` prints it): a plan never reads a file unchecked."
            )

    @property
    def path(self) -> Path | None:
        """The selector's file, resolved against the plan's directory (None without one)."""
        return None if not self.spec.path else resolve_path(self.spec.path, self.plan_dir)

    # Graph build ------------------------------------------------------------------------------
    def module(self, hidden_size: int, num_blocks: int) -> nn.Module | None:
        """A module the CACHED graph calls (the dynamic predictor), loaded and checked; None if none."""
        return None

    def block_caches(self, span: BlockSpan, ta: TokenAxes) -> list[TensorSpec]:
        """Caches this selector adds to cached block ``span`` (after its delta and K/V caches)."""
        return []

    def graph_caches(self, spans: list[BlockSpan]) -> list[TensorSpec]:
        """Caches this selector adds once per graph, after every block's caches."""
        return []

    def full_values(self, em: Emitter, span: BlockSpan, ta: TokenAxes) -> dict[str, fx.Node]:
        """FULL graph: the node each of ``block_caches(span)`` is filled from."""
        return {}

    def graph_full_values(self, spans: list[BlockSpan]) -> dict[str, fx.Node]:
        """FULL graph: the node each of ``graph_caches`` is filled from."""
        return {}

    def begin_cached(self, gm: fx.GraphModule, spans: list[BlockSpan], caches: dict, updated: dict, ctx: dict) -> None:
        """CACHED graph, once before the blocks. ``caches``: cache name -> its input node; write a
        cache's new value into ``updated[name]``. ``ctx``: this graph's scratch space (holds
        ``keep``, block -> K, and ``timestep_input``, the timestep's input name)."""

    def kept_score(self, em: Emitter, span: BlockSpan, x_in: fx.Node, caches: dict, ctx: dict) -> fx.Node | None:
        """CACHED graph: [B, N] scores for block ``span`` (its top-K is kept), or None: indices are a
        graph input chosen by ``indices``. ``x_in``: the block's input in this graph."""
        return None

    def after_keep(
        self, em: Emitter, span: BlockSpan, idx: fx.Node, x_kept: fx.Node, caches: dict, updated: dict, ctx: dict
    ) -> None:
        """CACHED graph, after block ``span`` ran on kept tokens ``idx`` [B, K] (``x_kept``: their
        input rows [B, K, D]): write this selector's cache updates into ``updated`` (a cache left out
        keeps its value)."""

    # Outside the graph (in_graph False) -------------------------------------------------------
    def reset(self) -> None:
        """A new generation starts."""

    def indices(self, block: int, shape: tuple[int, int], num_tokens: int, timestep: float) -> np.ndarray:
        """Kept token indices [B, K] (int64) for ``block`` at ``timestep``: one definition, used by the
        torch runtime and by the numpy one."""
        raise NotImplementedError(f"selector {self.kind!r} chooses its tokens inside the graph.")

    def export(self, out_dir: Path, file_entry) -> dict[str, Any]:
        """Fields this selector adds to the manifest's ``selector`` entry; may write files into ``out_dir``
        (``file_entry(path)`` records one with its size and sha256)."""
        return {}

    @classmethod
    def from_manifest(cls, spec: SelectorSpec, entry: dict, directory: Path) -> TokenSelector:
        """The selector for the numpy runtime, from the manifest's ``selector`` entry."""
        return cls(spec, directory)
