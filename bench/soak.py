"""Soak: many back-to-back generations on one transformed reference model.

Checks what a long-running server needs: resident memory (RSS) stays flat after warm-up, and
the same seed gives the same sample every time (no state leaks from one generation into the
next). Not a timing benchmark: run it alone or not, the checks do not depend on speed.

    python bench/soak.py                        # 1,000 generations, digits, 4 DDIM steps
    python bench/soak.py --generations 50       # a quick look

Writes bench/results/soak_<model>.json (and a PNG of RSS per generation); exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpass  # noqa: E402
from bench.common import RESULTS, machine, write_json  # noqa: E402
from tcpass.plan import load_plan  # noqa: E402
from tcpass.sampling import ddim_sample  # noqa: E402
from tcpass.zoo import REFERENCE_MODELS, reference  # noqa: E402


def rss_mib() -> float:
    """Current resident set size (MiB) from /proc/self/statm (not the peak)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="digits", choices=sorted(REFERENCE_MODELS))
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4, help="DDIM steps per generation")
    parser.add_argument("--warmup", type=int, default=50, help="generations before the RSS baseline is taken")
    parser.add_argument("--seeds", type=int, default=4, help="generations cycle through this many seeds")
    parser.add_argument("--tolerance", type=float, default=0.05, help="allowed RSS growth after warm-up (fraction)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.generations <= args.warmup:
        parser.error(f"--generations {args.generations} must exceed --warmup {args.warmup}")
    torch.set_num_threads(args.threads)

    ref = reference(args.model)
    model = ref.load_model(None)
    plan = load_plan(ref.default_plan)
    tm = tcpass.transform(model, plan)
    c, h, w = ref.image_shape
    first: dict[int, torch.Tensor] = {}
    mismatches, worst = 0, 0.0
    rss: list[float] = []
    start = time.perf_counter()
    for i in tqdm(range(args.generations), desc=f"soak {args.model}", unit="gen"):
        seed = i % args.seeds
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(1, c, h, w, generator=g)
        label = torch.tensor([seed % ref.num_classes])
        sample = ddim_sample(tm, noise, label, ref.null_label, num_steps=args.steps)
        if seed not in first:
            first[seed] = sample
        else:
            diff = float((sample - first[seed]).abs().max())
            worst = max(worst, diff)
            mismatches += diff != 0.0
        rss.append(rss_mib())
    seconds = time.perf_counter() - start
    baseline = max(rss[: args.warmup])
    final = max(rss[args.warmup :])
    growth = final / baseline - 1
    checks = {
        "identical_outputs": mismatches == 0,
        "rss_flat": growth <= args.tolerance,
    }
    payload = {
        "machine": machine(),
        "config": vars(args),
        "seconds": seconds,
        "step_counts": {k.value: n for k, n in tm.step_counts.items()},
        "rss_mib_after_warmup": baseline,
        "rss_mib_max_after": final,
        "rss_growth": growth,
        "outputs_differing": mismatches,
        "max_abs_difference_same_seed": worst,
        "checks": checks,
        "rss_mib": rss,
    }
    path = write_json(f"soak_{args.model}.json", payload)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(rss, lw=1)
        ax.axvline(args.warmup, color="gray", ls="--", lw=1, label="end of warm-up")
        ax.axhline(baseline * (1 + args.tolerance), color="red", ls=":", lw=1, label=f"+{args.tolerance:.0%}")
        ax.set_xlabel("generation")
        ax.set_ylabel("RSS (MiB)")
        ax.set_title(f"soak: {args.generations} generations of {args.model}, {args.steps} steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / f"soak_{args.model}.png", dpi=100)
    except ImportError:
        pass
    print(
        f"{args.generations} generations in {seconds:.0f} s; RSS {baseline:.0f} -> {final:.0f} MiB "
        f"({growth:+.1%}); same-seed outputs differing: {mismatches} (max |diff| {worst:g}); wrote {path}"
    )
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
