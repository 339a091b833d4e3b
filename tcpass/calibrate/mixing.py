"""Block hooks on the frozen model: block sensitivity (which blocks to cache) and Cache Predictor
training (soft mixing of fresh and cached residuals per token, top-K error)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from tcpass.adapters import adapter_for
from tcpass.calibrate.data import CalibrationData, model_call, rel_err, step_pairs
from tcpass.plan import keep_count
from tcpass.predictor import DynamicPredictor, StaticPredictor


# 2./3. Block hooks: record residuals, mix fresh and cached ------------------------------------------
class BlockHooks:
    """Forward hooks on a model's transformer blocks (the adapter's, in call order), on their image
    stream (`tcpass.adapters.ModelAdapter.block_image`: joint blocks' text stream passes through).

    ``mode="record"``: store each block's input and residual (``output - input``).
    ``mode="mix"``: block ``b`` in ``weights`` outputs ``x + w * (out - x) + (1 - w) * cached_delta[b]``,
    ``w`` [R, N] from ``weights[b]`` (a tensor, or a callable of block 0's input ``x0`` returning
    ``{block: w}`` evaluated once per call).
    """

    def __init__(self, model: nn.Module) -> None:
        self.adapter = adapter_for(model)
        self.blocks = self.adapter.blocks(model)
        self.mode = "off"
        self.inputs: dict[int, torch.Tensor] = {}
        self.deltas: dict[int, torch.Tensor] = {}
        self.cached: dict[int, torch.Tensor] = {}
        self.weights: dict[int, torch.Tensor] | Callable | None = None
        self._w: dict[int, torch.Tensor] = {}
        self._handles: list = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[BlockHooks]:
        self._handles = [
            blk.register_forward_hook(self._hook(b), with_kwargs=True) for b, blk in enumerate(self.blocks)
        ]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def _hook(self, b: int):
        def hook(block, args, kwargs, output):
            x = self.adapter.block_input(args, kwargs)
            image = self.adapter.block_image(output)
            if self.mode == "record":
                self.inputs[b], self.deltas[b] = x.detach(), (image - x).detach()
                return output
            if self.mode != "mix":
                return output
            if b == 0:
                self._w = self.weights(x) if callable(self.weights) else dict(self.weights or {})
            w = self._w.get(b)
            if w is None:
                return output
            w = w.unsqueeze(-1)
            return self.adapter.with_block_image(output, x + w * (image - x) + (1 - w) * self.cached[b])

        return hook


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """[R, N] 0/1 mask of each row's ``k`` highest scores."""
    return torch.zeros_like(score).scatter_(1, score.topk(k, dim=1).indices, 1.0)


@torch.no_grad()
def block_sensitivity(
    model: nn.Module,
    data: CalibrationData,
    keep_ratio: float = 0.25,
    num_pairs: int = 8,
    max_offset: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Relative output error [num_blocks] when each block alone is token-cached at ``keep_ratio``.

    Tokens kept: the top-K by change of the block input since the refresh step (input_change).
    """
    hooks = BlockHooks(model)
    device = data.inputs.device
    rows = torch.arange(data.inputs.shape[1], device=device)
    pairs = step_pairs(data.num_steps, max_offset, num_pairs, torch.Generator().manual_seed(seed))
    errors = torch.zeros(len(hooks.blocks), device=device)
    with hooks.attached():
        for s, t in tqdm(pairs, desc="block sensitivity", disable=not progress, leave=False):
            hooks.mode = "record"
            model_call(model, data, s, rows)
            cached, inputs = dict(hooks.deltas), dict(hooks.inputs)
            hooks.cached = cached
            target = data.outputs[t]
            hooks.mode = "record"
            model_call(model, data, t, rows)  # every block's input at t under full compute
            now = dict(hooks.inputs)
            for b in range(len(hooks.blocks)):
                x_now = now[b]
                k = keep_count(keep_ratio, x_now.shape[1])
                score = ((x_now - inputs[b]) ** 2).sum(-1)
                mask = topk_mask(score, k)
                hooks.mode, hooks.weights = "mix", {b: mask}
                errors[b] += rel_err(model_call(model, data, t, rows), target)
    hooks.mode = "off"
    return errors / len(pairs)


@dataclass
class TrainResult:
    predictor: nn.Module
    losses: list[float]  # normalised error per iteration (see `predictor_loss`)
    mean_w: list[float]


def predictor_loss(
    model: nn.Module,
    hooks: BlockHooks,
    predictor: nn.Module,
    data: CalibrationData,
    pair: tuple[int, int],
    rows: torch.Tensor,
    blocks: tuple[int, ...],
    hard_keep: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised error, mean w) of the soft mixture for one (refresh step, later step) pair.

    ``hard_keep``: binarise w by top-K in the forward pass (K = hard_keep * N) and pass the sigmoid's
    gradient straight through, so training sees exactly what inference does.

    The error is the relative MSE of the model output vs full compute, divided by the same error when
    every token of every block in ``blocks`` is cached (w = 0): 1 means no better than caching
    everything, 0 means exact. This keeps the loss on one scale across steps.
    """
    s, t = pair
    target = data.outputs[t, rows]
    with torch.no_grad():
        hooks.mode = "record"
        model_call(model, data, s, rows)
        hooks.cached = dict(hooks.deltas)
        x0_ref = hooks.inputs[0]
        ref = hooks.cached[blocks[0]]
        hooks.mode, hooks.weights = "mix", {b: torch.zeros(ref.shape[:2], device=ref.device) for b in blocks}
        err_all_cached = rel_err(model_call(model, data, t, rows), target).clamp_min(1e-12)
    timestep = data.model_timestep(t, len(rows))
    ws: list[torch.Tensor] = []

    def weights(x0):
        logits = predictor(x0, timestep, x0_ref)  # [R, N, L]
        w = {b: torch.sigmoid(logits[..., b]) for b in blocks}
        ws.extend(w.values())
        if hard_keep is not None:
            k = keep_count(hard_keep, logits.shape[1])
            for b, soft in w.items():
                hard = topk_mask(soft.detach(), k)
                w[b] = hard + soft - soft.detach()
        return w

    hooks.mode, hooks.weights = "mix", weights
    out = model_call(model, data, t, rows)
    hooks.mode = "off"
    return rel_err(out, target) / err_all_cached, torch.stack(ws).mean()


@torch.no_grad()
def topk_error(
    model: nn.Module,
    data: CalibrationData,
    scorer: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | str,
    keep_ratio: float = 0.25,
    blocks: tuple[int, ...] | None = None,
    num_pairs: int = 12,
    max_offset: int = 5,
    seed: int = 99,
) -> float:
    """Normalised output error (as in `predictor_loss`) with hard top-K token selection in every block.

    ``scorer(x0, x0_ref, timestep, block) -> scores [R, N]`` (``x0_ref``: block 0's input at the
    refresh step), or ``"random"`` / ``"input_change"``.
    """
    blocks = tuple(range(adapter_for(model).fingerprint(model).num_blocks)) if blocks is None else blocks
    hooks = BlockHooks(model)
    device = data.inputs.device
    rows = torch.arange(data.inputs.shape[1], device=device)
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    pairs = step_pairs(data.num_steps, max_offset, num_pairs, g)
    with hooks.attached():
        for s, t in pairs:
            target = data.outputs[t]
            hooks.mode = "record"
            model_call(model, data, s, rows)
            hooks.cached, refresh_inputs = dict(hooks.deltas), dict(hooks.inputs)
            n = hooks.cached[blocks[0]].shape[1]
            k = keep_count(keep_ratio, n)
            hooks.mode, hooks.weights = "mix", {b: torch.zeros(len(rows), n, device=device) for b in blocks}
            err0 = rel_err(model_call(model, data, t, rows), target)
            timestep = data.model_timestep(t, len(rows))

            def masks(x0, n=n, k=k, refresh_inputs=refresh_inputs, timestep=timestep):
                out = {}
                for b in blocks:
                    if scorer == "random":
                        score = torch.rand(len(rows), n, generator=g, device=g.device).to(device)
                    else:
                        score = scorer(x0, refresh_inputs[0], timestep, b)
                    out[b] = topk_mask(score, k)
                return out

            if scorer == "input_change":
                hooks.mode = "record"
                model_call(model, data, t, rows)
                now = dict(hooks.inputs)
                weights = {}
                for b in blocks:
                    score = ((now[b] - refresh_inputs[b]) ** 2).sum(-1)
                    weights[b] = topk_mask(score, k)
                hooks.weights = weights
            else:
                hooks.weights = masks
            hooks.mode = "mix"
            total += float(rel_err(model_call(model, data, t, rows), target) / err0)
    return total / len(pairs)


def predictor_scorer(predictor: nn.Module) -> Callable:
    def score(x0, x0_ref, timestep, block):
        return predictor(x0, timestep, x0_ref)[..., block]

    return score


def train_predictor(
    model: nn.Module,
    data: CalibrationData,
    kind: str = "dynamic",
    blocks: tuple[int, ...] | None = None,
    keep_ratio: float = 0.25,
    iterations: int = 150,
    rows_per_iteration: int = 16,
    max_offset: int = 5,
    lr: float | None = None,
    dual_step: float = 0.05,
    budget_weight: float = 0.0,
    hard_fraction: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> TrainResult:
    """Train a `StaticPredictor` or `DynamicPredictor` for ``blocks`` (default all) with the model frozen.

    Loss per iteration: `predictor_loss` + ``lam * mean(w)`` (the L1 budget term; w >= 0). ``lam``
    starts at ``budget_weight`` and moves by ``dual_step * (mean(w) - keep_ratio)`` after each step.
    The last ``hard_fraction`` of the iterations binarise w by top-K in the forward pass
    (straight-through gradient), matching inference.
    """
    torch.manual_seed(seed)
    adapter = adapter_for(model)
    fingerprint = adapter.fingerprint(model)
    num_blocks, hidden = fingerprint.num_blocks, fingerprint.hidden_size
    blocks = tuple(range(num_blocks)) if blocks is None else tuple(blocks)
    num_tokens = adapter.image_tokens(model, adapter.example_inputs(model, 1))
    if kind == "static":
        predictor: nn.Module = StaticPredictor(num_blocks, num_tokens, device=data.inputs.device)
    elif kind == "dynamic":
        predictor = DynamicPredictor(hidden, num_blocks, device=data.inputs.device)
    else:
        raise ValueError(f"predictor kind {kind!r}: expected 'static' or 'dynamic'.")
    lr = lr if lr is not None else (0.05 if kind == "static" else 1e-3)
    opt = torch.optim.Adam(predictor.parameters(), lr=lr)
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    hooks = BlockHooks(model)
    g = torch.Generator().manual_seed(seed)
    pairs = step_pairs(data.num_steps, max_offset, iterations, g)
    n_rows = data.inputs.shape[1]
    lam, losses, mean_w = budget_weight, [], []
    try:
        with hooks.attached():
            bar = tqdm(pairs, desc=f"training {kind} predictor", disable=not progress, leave=False)
            for it, pair in enumerate(bar):
                rows = torch.randperm(n_rows, generator=g, device=g.device)[: min(rows_per_iteration, n_rows)]
                hard = keep_ratio if it >= (1 - hard_fraction) * iterations else None
                mse, w = predictor_loss(model, hooks, predictor, data, pair, rows, blocks, hard)
                loss = mse + lam * w
                opt.zero_grad()
                loss.backward()
                opt.step()
                # dual ascent on the budget: raise lam while the mean of w exceeds keep_ratio
                lam = max(0.0, lam + dual_step * (float(w.detach()) - keep_ratio))
                losses.append(float(mse.detach()))
                mean_w.append(float(w.detach()))
                bar.set_postfix(err=f"{losses[-1]:.3f}", w=f"{mean_w[-1]:.2f}")
    finally:
        for p, r in zip(model.parameters(), frozen, strict=True):
            p.requires_grad_(r)
    return TrainResult(predictor.eval().requires_grad_(False), losses, mean_w)
