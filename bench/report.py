"""The benchmark tables of the README and the docs, generated from the JSON in bench/results (one script).

    python bench/report.py            # rewrite every generated table (and redraw the peers plots)
    python bench/report.py --check    # exit 1 naming each table that no longer matches its JSON

A generated table sits between two markers in a Markdown file (README.md, docs/*.md)::

    <!-- table: frontier bench/results/peers_digits_forecast.json -->
    ... what the renderer writes ...
    <!-- /table -->

The first word names the renderer (`RENDERERS`), the rest are its JSON files (paths from the repository
root). Every table ends with its provenance: the command that wrote the JSON, the machine and versions it
records, and the date (the JSON's own ``command``/``date`` where the bench recorded them, else `LEGACY`,
transcribed once from the run notes and the file's git history). Nothing in a table is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- table: (?P<spec>[^>]*?) -->\n(?P<body>.*?)<!-- /table -->", re.S)

EMOJI = "--model tcpass/zoo/emoji_dit --batch 36 --samples 18 --sample-range -1 1 "
# Results written before the benches recorded their command and date: (command, date of the run's commit).
LEGACY = {
    "speed_dit_s_executors.json": (
        "python bench/speed.py --models dit-s --executors eager,inductor,ort --reps 5 --out speed_dit_s_executors.json",
        "2026-11-24",
    ),
    "speed_dit_xl_executors.json": (
        "python bench/speed.py --models dit-xl --executors ort,eager,inductor --reps 3 "
        "--out speed_dit_xl_executors.json",
        "2026-11-24",
    ),
    "speed_families.json": ("taskset -c 0 python bench/families.py --reps 2 --threads 1", "2026-11-24"),
    "quality.json": (
        "python bench/quality.py --plan bench/plans/digits_2x.json --plan bench/plans/digits_3x.json",
        "2026-11-24",
    ),
    "serve_digits.json": ("python bench/serve.py", "2026-11-26"),
    "peers_digits_forecast.json": (
        "python bench/peers.py --model digits --seeds 3 --per-class 2 --steps 50 --threads 2 "
        "--methods steps,magcache --settings-per-method 4 --plan bench/plans/digits_forecast_2x.json "
        "--plan bench/plans/digits_forecast_3x.json --out peers_digits_forecast",
        "2026-11-26",
    ),
    "peers_emoji_split.json": (
        "python bench/peers.py --model emoji --seeds 3 --per-class 2 --steps 50 --threads 2 "
        "--methods steps,steps_split,magcache --settings-per-method 4 --plan bench/plans/emoji_interval_2x.json "
        "--plan bench/plans/emoji_interval_3x.json --plan bench/plans/emoji_interval_2x_split.json "
        "--plan bench/plans/emoji_interval_3x_split.json --out peers_emoji_split",
        "2026-11-26",
    ),
    # step calibrations of 2026-12-04 (calibration seed 1234, 20 stratified labels; sidecars of that day's code
    # recorded no command): written to /tmp/cal and copied to bench/plans under these names
    **{
        f"{name}.calibration.json": (
            f"tcpass calibrate steps --batch 40 --samples 20 {args} -o bench/plans/{name}.json",
            "2026-12-04",
        )
        for name, args in (
            ("digits_forecast_4x", "--target-speedup 4"),
            ("digits_forecast_4x_spread", "--target-speedup 4"),
            ("digits_dpm25_4x", "--target-speedup 2.2 --sampler dpmpp --steps 25"),
            ("digits_forecast_6x", "--target-speedup 6"),
            ("digits_dpm25_6x", "--target-speedup 3.3 --sampler dpmpp --steps 25"),
        )
    },
    **{
        f"{name}.calibration.json": (
            f"tcpass calibrate steps --model tcpass/zoo/emoji_dit --batch 36 --samples 18 --sample-range -1 1 {args} "
            f"-o bench/plans/{name}.json",
            "2026-12-04",
        )
        for name, args in (
            ("emoji_dpm25_4x", "--target-speedup 2.0 --sampler dpmpp --steps 25"),
            ("emoji_dpm25_6x", "--target-speedup 3.0 --sampler dpmpp --steps 25"),
        )
    },
    # 2026-12-05: scored against 50 DDIM steps (--reference)
    **{
        f"{name}.calibration.json": (
            f"tcpass calibrate steps {model}{args} --sampler dpmpp --steps 25 --reference ddim 50 "
            f"-o bench/plans/{name}.json",
            "2026-12-05",
        )
        for name, model, args in (
            ("digits_dpm25_4x_ref", "", "--batch 40 --samples 20 --target-speedup 2.2"),
            ("digits_dpm25_6x_ref", "", "--batch 40 --samples 20 --target-speedup 3.3"),
            ("emoji_dpm25_4x_ref", EMOJI, "--target-speedup 2.0"),
            ("emoji_dpm25_6x_ref", EMOJI, "--target-speedup 3.0"),
        )
    },
}


def load(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


def provenance(path: str, data: dict) -> str:
    """The table's caption: command, machine and versions, date, and the file."""
    command, date = data.get("command"), data.get("date")
    if command is None or date is None:
        legacy_command, legacy_date = LEGACY.get(Path(path).name, (None, None))
        command, date = command or legacy_command, date or legacy_date
    m = data.get("machine", {})
    versions = ", ".join(f"{k} {m[k]}" for k in ("torch", "diffusers", "onnxruntime") if m.get(k))
    where = f"{m.get('cpu', '?')}, {m.get('threads', '?')} threads" + (f"; {versions}" if versions else "")
    where = f" · {where}" if m else ""  # calibration sidecars record no machine
    link = f"[`{path}`]({path})" if path.startswith("bench/results/") else f"`{path}`"  # the docs reach results/ only
    return f"*`{command or 'command not recorded'}`{where} · {date or 'date not recorded'} · {link}*"


def _cell(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def render_speed(*paths: str) -> str:
    """Whole generations, tcpass vs the same executor's baseline (`bench/speed.py`)."""
    rows, captions = [], []
    for path in paths:
        data = load(path)
        captions.append(provenance(path, data))
        for r in data["results"]:
            b, t = r["baseline_s"], r["tcpass_s"]
            rows.append(
                [
                    r["model"],
                    r["executor"],
                    f"{b['median']:.2f} [{b['min']:.2f}–{b['max']:.2f}]",
                    f"{t['median']:.2f} [{t['min']:.2f}–{t['max']:.2f}]",
                    f"**{r['speedup']:.2f}x**",
                    f"{r['flop_ideal_speedup']:.2f}x",
                    f"{r['measured_over_ideal']:.2f}",
                ]
            )
    header = [
        "model",
        "executor",
        "baseline s (median [min–max])",
        "tcpass s",
        "speedup",
        "FLOP-ideal",
        "measured/ideal",
    ]
    return _table(header, rows) + "\n\n" + "\n".join(captions)


def render_families(path: str) -> str:
    """Single steps of published-size PixArt, SD3 and Flux, composed into a generation (`bench/families.py`)."""
    data = load(path)
    rows = []
    for r in data["results"]:
        s = {k: v["median"] for k, v in r["step_s"].items()}
        rows.append(
            [
                f"{r['model']} ({r['parameters_m']:.0f}M)",
                f"{r['image_tokens']}+{r['text_tokens']}",
                f"{r['steps']} ({r['steps_full_cached'][0]}/{r['steps_full_cached'][1]})",
                f"{s['baseline']:.2f} / {s['full']:.2f} / {s['cached']:.2f}",
                f"**{r['speedup_composed']:.2f}x**",
                f"{r['flop_ideal_speedup']:.2f}x",
            ]
        )
    header = [
        "model (params)",
        "image+text tokens",
        "steps (FULL/CACHED)",
        "s/step base / FULL / CACHED",
        "speedup (composed)",
        "FLOP-ideal",
    ]
    return _table(header, rows) + "\n\n" + provenance(path, data)


def render_quality(path: str) -> str:
    """Token plans against the baselines at their measured speed (`bench/quality.py`)."""
    data = load(path)
    rows = [
        [
            r["variant"],
            f"{r['speedup_median']:.2f}x [{r['speedup_min_max'][0]:.2f}–{r['speedup_min_max'][1]:.2f}]",
            "—" if math.isinf(r["psnr_db_mean"]) else f"{r['psnr_db_mean']:.2f} ± {r['psnr_db_std']:.2f}",
            f"{r['ssim_mean']:.4f} ± {r['ssim_std']:.4f}",
            f"{r['class_acc_mean']:.1%}",
            f"{r['frechet_vs_heldout']:.1f}",
        ]
        for r in data["results"]
    ]
    header = ["variant", "measured speedup", "PSNR dB vs full", "SSIM vs full", "class accuracy", "Fréchet to real"]
    note = f"Fréchet real vs real: {data['frechet_real_vs_real']:.1f}."
    return _table(header, rows) + f"\n\n{note}\n\n" + provenance(path, data)


def render_peers(path: str) -> str:
    """Every arm of a peers run (`bench/peers.py`)."""
    data = load(path)
    rows = []
    for r in data["results"]:
        lo, hi = r["speedup_min_max"]
        psnr = (
            "exact"
            if not math.isfinite(r["psnr_db_mean"]) or r["psnr_db_mean"] > 60
            else (f"{r['psnr_db_mean']:.2f} ± {r['psnr_db_std']:.2f}")
        )
        rows.append(
            [
                r["method"],
                r["setting"] or "—",
                f"{r['speedup_median']:.2f}x ({lo:.2f}–{hi:.2f})",
                psnr,
                f"{r['ssim_mean']:.4f}",
                f"{r['class_acc_mean']:.1%}",
                f"{r['frechet_vs_heldout']:.1f}",
            ]
        )
    header = ["method", "setting", "measured speedup (min–max)", "PSNR dB vs full", "SSIM", "class acc", "Fréchet"]
    return _table(header, rows) + "\n\n" + provenance(path, data)


def _plan_name(arm: str) -> str:
    """A tcpass arm's plan file stem, its method after it unless plain ``tcpass``: "tcpass (digits_2x)" ->
    "digits_2x", "tcpass calibrated timesteps (emoji_dpm8)" -> "emoji_dpm8 (calibrated timesteps)"."""
    match = re.fullmatch(r"(?P<method>.*) \((?P<stem>[^()]*)\)", arm)
    if match is None:
        return arm
    method = match["method"].removeprefix("tcpass").strip()
    return match["stem"] + (f" ({method})" if method else "")


def render_frontier(*paths: str) -> str:
    """Each tcpass plan against the best peer measured at the plan's own speed (`bench/peers.py`)."""
    rows, captions = [], []
    for path in paths:
        data = load(path)
        captions.append(provenance(path, data))
        peers = sorted(m for m in data["frontier"]["psnr_db_at_speedup"] if not m.startswith("tcpass"))
        for p in data["frontier"]["tcpass_plans"]:
            best = p["best_peer"] or {}
            rows.append(
                [
                    data["config"]["model"],
                    _plan_name(p["plan"]),
                    f"{p['speedup']:.2f}x",
                    f"{p['psnr_db']:.2f} ± {p['psnr_db_std']:.2f}",
                    f"{best.get('method', 'none at that speed')}: {_cell(best.get('psnr_db'), '.2f')}",
                    _cell(p.get("margin_db"), "+.2f"),
                    "; ".join(peers),
                ]
            )
    header = ["model", "plan", "measured speedup", "PSNR dB", "best peer there", "margin dB", "peers run"]
    return _table(header, rows) + "\n\n" + "\n".join(captions)


def render_at_speed(path: str) -> str:
    """Each method's PSNR interpolated at round speedups between its measured settings (`bench/peers.py`)."""
    data = load(path)
    at = data["frontier"]["psnr_db_at_speedup"]
    speeds = sorted({s for row in at.values() for s in row}, key=float)
    rows = [[method] + [_cell(row.get(s), ".2f") for s in speeds] for method, row in at.items()]
    best = data["frontier"]["best_peer"]
    rows.append(
        ["**best peer**"] + [f"{b['method']}: {b['psnr_db']:.2f}" if b else "—" for b in (best[s] for s in speeds)]
    )
    header = ["PSNR dB at"] + [f"{float(s):g}x" for s in speeds]
    note = "— : the method's measured settings do not bracket that speed (never extrapolated)."
    return _table(header, rows) + f"\n\n{note}\n\n" + provenance(path, data)


GRANULARITIES = {  # column of the granularity table -> {candidate family: what the cell says of it}
    "fewer steps": {"fewer steps": ""},
    "skip tables (steps only)": {
        "skip, reuse": "reuse",
        "skip, scaled reuse": "scaled",
        "skip, forecast": "forecast",
        "spread output": "spread output",
        "spread stack": "spread stack",
    },
    "skip + blocks": {"skip + block reuse": "reuse", "skip + block forecast": "forecast"},
    "skip + tokens": {"skip + token caching": "reuse", "skip + token forecast": "forecast"},
}


def _best_per_granularity(candidates: list[dict], reach: float) -> dict[str, str]:
    """Per `GRANULARITIES` column, the best calibration PSNR among ``candidates`` predicted at ``reach`` or
    faster, and which kind of that granularity scored it."""
    cells = {}
    for column, kinds in GRANULARITIES.items():
        scored = [
            (c["psnr_db"], kinds[c["family"]])
            for c in candidates
            if c["family"] in kinds and c["psnr_db"] is not None and c["predicted_speedup"] >= reach
        ]
        if scored:
            psnr, kind = max(scored)
            cells[column] = f"{psnr:.2f}" + (f" ({kind})" if kind else "")
    return cells


def _scored_against(sidecar: dict) -> str:
    """``"; scored vs ddim 50"`` for a calibration scored against another full compute (``--reference``)."""
    ref = sidecar.get("scored_against")
    return f"; scored vs {ref['sampler']} {ref['steps']}" if ref else ""


def render_granularity(*paths: str) -> str:
    """Per calibration (`tcpass calibrate steps` sidecars): the chosen plan, and per granularity (fewer sampler
    steps; skip tables alone; skip tables with whole blocks or with tokens cached at the computed calls) the
    best calibration PSNR among candidates predicted to reach the target (predicted speed corrected by the
    calibration's measured bias, less its speed tolerance): what each granularity could do at that speed."""
    rows, captions = [], []
    for path in paths:
        d = load(path)
        captions.append(provenance(path, d))
        reach = d["target_speedup"] / d.get("speed_bias", 1.0) * (1 - d.get("speed_tolerance", 0.0))
        chosen = next(c for c in d["candidates"] if c["name"] == d["chosen"])
        best = _best_per_granularity(d["candidates"], reach)
        try:  # the plan written: its sampler is set after the choice
            plan = load(path.replace(".calibration.json", ".json"))
        except FileNotFoundError:
            plan = chosen["plan"]
        sampler = plan.get("sampler") or "ddim"
        steps = plan.get("sampler_steps") or (plan.get("notes") or {}).get("steps", "?")
        rows.append(
            [
                Path(path).name.removesuffix(".calibration.json"),
                f"{d['target_speedup']:g}x",
                f"{chosen['family']} ({_cell(d.get('measured_speedup'), '.2f')}x measured)",
                f"{chosen['psnr_db']:.2f}",
            ]
            + [best.get(column, "—") for column in GRANULARITIES]
            + [f"{sampler}, {steps} steps" + _scored_against(d)]
        )
    header = ["calibration", "target", "chosen", "its PSNR dB", *GRANULARITIES, "sampler"]
    note = (
        "PSNR: calibration samples vs full compute under the calibration's own sampler (or the one it was scored "
        "against), best of each granularity "
        "(which kind in brackets: plain or scaled reuse, a fitted forecast, evenly spread skips); skip + blocks: "
        "the least sensitive half of the blocks not run at CACHED calls; skip + tokens: a quarter of the tokens "
        "recomputed at CACHED calls; — : no candidate of that granularity was predicted to reach the target."
    )
    return _table(header, rows) + f"\n\n{note}\n\n" + "\n".join(captions)


def render_serve(path: str) -> str:
    """Throughput and latency behind `tcpass serve` (`bench/serve.py`)."""
    data = load(path)
    rows = [
        [
            p["variant"],
            f"{p['batching']} ({', '.join(map(str, p['batch_sizes']))})",
            str(p["concurrency"]),
            f"{p['images_per_s']:.2f}",
            f"{p['p50_s']:.2f} s",
            f"{p['p95_s']:.2f} s",
            f"{p['p99_s']:.2f} s" if "p99_s" in p else "—",
            f"{p['mean_batch_images']:.2f}",
        ]
        for p in data["points"]
    ]
    header = ["model", "batching", "clients", "images/s", "p50 latency", "p95 latency", "p99 latency"]
    header.append("images per batch")
    ratios = ", ".join(f"{k}: {v:.2f}x" for k, v in data.get("throughput_speedup_tcpass_vs_uncached", {}).items())
    ratios = f"\n\ntcpass / uncached images/s: {ratios}." if ratios else ""
    return _table(header, rows) + ratios + "\n\n" + provenance(path, data)


def render_ort_memory(path: str) -> str:
    """ONNX Runtime RSS and step times with and without shared weights (`bench/ort_memory.py`)."""
    data = load(path)
    speed = data["speed"]
    rows = []
    for m in data["memory"]:
        share = m["share_weights"]
        key = "shared_ms" if share else "unshared_ms"
        rows.append(
            [
                "one shared copy" if share else "a copy per step graph",
                f"{m['rss_loaded_mib']:.0f}",
                f"{m['rss_after_calls_mib']:.0f}",
                f"{m['peak_rss_mib']:.0f}",
                f"{m['load_s']:.1f}",
                f"{speed['full'][key]:.0f}",
                f"{speed['cached'][key]:.0f}",
            ]
        )
    header = [
        "weights",
        "RSS loaded MiB",
        "RSS after FULL+CACHED MiB",
        "peak RSS MiB",
        "load s",
        "FULL ms",
        "CACHED ms",
    ]
    return _table(header, rows) + "\n\n" + provenance(path, data)


def render_refit(path: str) -> str:
    """Compositions of forecast tables, weights fitted on the table alone vs on the composed plan (`bench/refit.py`)."""
    data = load(path)
    rows = [
        [
            r["name"],
            f"{r['predicted_speedup']:.2f}x",
            f"{r['recorded_psnr_db']:.2f}",
            f"{r['table_fit_psnr_db']:.2f}",
            f"{r['composed_fit_psnr_db']:.2f}",
            f"{r['composed_fit_psnr_db'] - r['table_fit_psnr_db']:+.2f}",
        ]
        for r in data["rows"]
    ]
    header = ["composition", "predicted", "recorded dB", "fitted alone dB", "fitted composed dB", "gain"]
    gains = data["summary"]["gains_db"]
    median = f"median gain {statistics.median(gains):+.2f} dB, range {min(gains):+.2f} to {max(gains):+.2f}"
    return _table(header, rows) + f"\n\n{median}\n\n" + provenance(path, data)


def render_video_speed(path: str) -> str:
    """Whole generations of a published-width video DiT, tcpass and peers in lockstep (`bench/video_speed.py`)."""
    data = load(path)
    model, sampler = data["model"], data["sampler"]
    rows = []
    for r in data["rows"]:
        if r.get("status") != "ok":
            rows.append([r["arm"], r["executor"], r.get("status", "?"), "", "", "", ""])
            continue
        # tcpass: FULL / CACHED phase / SKIP; peers: "30 blocks, 30 self-attn, ..." (blocks computed) -> "30 blocks"
        kinds = [k.split(",")[0] if "blocks" in k else k for k in r["step_kinds"]]
        kinds = kinds if len(set(kinds)) == len(kinds) else list(r["step_kinds"])  # TaylorSeer: modules differ
        mix = "; ".join(f"{k}: {v['calls']}" for k, v in zip(kinds, r["step_kinds"].values(), strict=True))
        seconds = {k: v["median_s"] for k, v in r["step_kinds"].items()}
        rows.append(
            [
                r["arm"],
                r["executor"],
                f"{r['generation_s']:.0f}",
                mix,
                " / ".join(f"{v:.2f}" for v in seconds.values()),
                f"**{r['speedup']:.2f}x**" + ("" if r["baseline"] == "uncached" else f" (vs {r['baseline']})"),
                f"{r['flop_ideal_speedup']:.2f}x ({r['measured_over_ideal']:.2f})",
            ]
        )
    f, h, w = model["latent_frames_height_width"]
    head = (
        f"{model['class']} at {model['config']} ({model['parameters_m']:.0f}M, random weights, {model['dtype']}), "
        f"latent {f} x {h} x {w} = {model['video_tokens']} video + {model['text_tokens']} text tokens, "
        f"batch {model['batch']}, {sampler['steps']} {sampler['kind']} steps (shift {sampler['shift']:g})."
    )
    header = [
        "arm",
        "executor",
        "generation s",
        "calls by kind",
        "s/call by kind",
        "speedup",
        "FLOP-ideal (measured/ideal)",
    ]
    return head + "\n\n" + _table(header, rows) + "\n\n" + provenance(path, data)


RENDERERS: dict[str, Callable[..., str]] = {
    "speed": render_speed,
    "families": render_families,
    "video-speed": render_video_speed,
    "quality": render_quality,
    "peers": render_peers,
    "frontier": render_frontier,
    "granularity": render_granularity,
    "serve": render_serve,
    "at-speed": render_at_speed,
    "ort-memory": render_ort_memory,
    "refit": render_refit,
}


def render(spec: str, page: str = "README.md") -> str:
    """The table ``spec`` names, with links relative to ``page`` (docs/ reaches the results as results/)."""
    name, *paths = spec.split()
    if name not in RENDERERS:
        raise ValueError(f"unknown table {name!r}; known: {sorted(RENDERERS)}")
    table = RENDERERS[name](*paths)
    return table.replace("](bench/results/", "](results/") if page.startswith("docs/") else table


def regenerate(text: str, page: str) -> str:
    """``text`` (of ``page``) with every generated table rendered anew from its JSON."""
    return MARKER.sub(lambda m: f"<!-- table: {m['spec']} -->\n{render(m['spec'], page)}\n<!-- /table -->", text)


def stale_tables(pages: list[str] = PAGES) -> list[str]:
    """``page: spec`` for every generated table whose text differs from what its JSON renders."""
    stale = []
    for page in pages:
        text = (ROOT / page).read_text()
        for m in MARKER.finditer(text):
            if m["body"] != render(m["spec"], page) + "\n":
                stale.append(f"{page}: {m['spec']}")
    return stale


def redraw_plots() -> list[Path]:
    """The peers plots the pages show, drawn again from their JSON (`bench.peers.plot`)."""
    from bench.peers import plot

    drawn: list[Path] = []
    for page in PAGES:
        for name in re.findall(r"\((?:bench/)?results/(peers_[a-z0-9_]+)\.png\)", (ROOT / page).read_text()):
            data = load(f"bench/results/{name}.json")
            drawn.append(plot(data["results"], ROOT / "bench/results" / f"{name}.png", data["config"]["model"]))
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report tables that differ from their JSON")
    args = parser.parse_args()
    if args.check:
        stale = stale_tables()
        for entry in stale:
            print(f"stale: {entry} (run python bench/report.py)")
        return 1 if stale else 0
    for page in PAGES:
        path = ROOT / page
        text = path.read_text()
        new = regenerate(text, page)
        if new != text:
            path.write_text(new)
            print(f"rewrote the tables of {page}")
    for png in redraw_plots():
        print(f"drew {png.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
