"""Cost of the dynamic Cache Predictor inside a CACHED step (issue goal: under 5% of the step).

    python bench/predictor_overhead.py                     # digits (batch 40), DiT-S/2, DiT-XL/2 (batch 2)

Two measurements per model, both at the same K, interleaved over many rounds:
- A/B: the CACHED graph with the dynamic predictor vs the same graph fed precomputed indices (static
  selector, zero selection cost); overhead = (t_dynamic - t_static) / t_dynamic.
- Direct: the predictor call and the per-block top-k alone at the step's shapes, as a share of the
  dynamic CACHED step.
The predictor's weights do not change its cost; DiT-S/XL use untrained predictors of the real size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import machine, write_json  # noqa: E402
from bench.speed import example_inputs, load_model  # noqa: E402
from tcpass.predictor import DynamicPredictor, save_predictor  # noqa: E402
from tcpass.selectors import StaticScoreSelector  # noqa: E402


def bench(name: str, images: int, keep: float, rounds: int) -> dict:
    model = load_model(name)
    inputs = example_inputs(model, 2 * images)  # CFG: 2 rows per image
    values = list(inputs.values())
    cfg = model.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    num_blocks = cfg.num_layers
    tmp = Path(tempfile.mkdtemp(prefix="tcpass-overhead-"))
    predictor = DynamicPredictor(hidden, num_blocks)
    digest = save_predictor(predictor, tmp / "p.safetensors")
    n_tokens = (cfg.sample_size // cfg.patch_size) ** 2
    table = StaticScoreSelector(torch.randn(num_blocks, 1, n_tokens), torch.zeros(1), torch.arange(num_blocks))
    static_digest = table.save(tmp / "s.safetensors")
    base = tcpass.CachePlan(keep_ratio=keep, attention="cached_kv")
    plans = {
        "dynamic": tcpass.CachePlan(
            **{
                **base.__dict__,
                "selector": tcpass.SelectorSpec(kind="dynamic", path=str(tmp / "p.safetensors"), sha256=digest),
            }
        ),
        "static": tcpass.CachePlan(
            **{
                **base.__dict__,
                "selector": tcpass.SelectorSpec(kind="static", path=str(tmp / "s.safetensors"), sha256=static_digest),
            }
        ),
    }
    calls = {}
    for kind, plan in plans.items():
        tm = tcpass.transform(model, plan, example_inputs=inputs)
        graphs = tm.step_graphs()
        caches = graphs.caches
        with torch.no_grad():
            graphs.full(*values, *caches)
        g = graphs.cached[0]
        indices = [torch.from_numpy(tm.selector.indices(s.block, s.shape, n_tokens, 500.0)) for s in g.index_specs]
        calls[kind] = lambda g=g, caches=caches, indices=indices: g(*values, *caches, *indices)
    x0 = torch.randn(2 * images, n_tokens, hidden)
    t = inputs["timestep"]
    k = max(1, round(keep * n_tokens))

    def predictor_only():
        scores = predictor(x0, t, x0 + 0.1)
        for b in range(num_blocks):
            scores[..., b].topk(k, dim=1)

    calls["predictor+topk"] = predictor_only
    times = {n: [] for n in calls}
    with torch.no_grad():
        for fn in calls.values():
            fn()
        for _ in range(rounds):
            for n, fn in calls.items():
                start = time.perf_counter()
                fn()
                times[n].append(time.perf_counter() - start)
    med = {n: statistics.median(v) for n, v in times.items()}
    ab = statistics.median((d - s) / d for d, s in zip(times["dynamic"], times["static"], strict=True))
    return {
        "model": name,
        "batch": 2 * images,
        "keep_ratio": keep,
        "predictor_params": sum(p.numel() for p in predictor.parameters()),
        "cached_step_ms": {n: 1e3 * v for n, v in med.items()},
        "overhead_ab_share": ab,
        "overhead_direct_share": med["predictor+topk"] / med["dynamic"],
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits:20,dit-s:1,dit-xl:1", help="name:images, comma-separated")
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for item in args.models.split(","):
        name, images = item.split(":")
        rows.append(bench(name, int(images), args.keep, args.rounds))
        r = rows[-1]
        ms = r["cached_step_ms"]
        print(
            f"{r['model']:7} batch {r['batch']:3}: CACHED dynamic {ms['dynamic']:.2f} ms, "
            f"static {ms['static']:.2f} ms, "
            f"predictor+top-k alone {ms['predictor+topk']:.2f} ms -> overhead A/B {r['overhead_ab_share']:.1%}, "
            f"direct {r['overhead_direct_share']:.1%} ({r['predictor_params']:,} params)",
            flush=True,
        )
    print(f"wrote {write_json('predictor_overhead.json', {'machine': machine(), 'results': rows})}")


if __name__ == "__main__":
    main()
