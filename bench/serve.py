"""Serving: throughput and latency of `tcpass serve` vs clients and batch size, tcpass vs uncached.

The shipped digits reference model behind the same Ray Serve application (a local Ray instance this script
starts and stops, HTTP on loopback), variants one after another: the TokenCache-transformed model and the
untransformed model (``--uncached``), alternating, for each batching mode (``--batching``) and batch size
(``--max-batch``, images per model batch): ``pad`` (every model batch padded to the batch size: bit-identical
images under any load), ``sizes`` (powers of two below it traced too: a batch runs at the smallest that holds it)
and ``off`` (batch size 1: one image per model batch, whatever ``--max-batch`` says). At each number of clients
C, C client threads send ``--requests-per-client`` requests each, back to back; a request's latency is measured by
its client (send to last byte), throughput is images answered / wall time of the whole point. Reported per point:
images/s and latency p50 / p95 / p99; plotted (matplotlib) against clients, one line per variant.

    python bench/serve.py                                  # 2 replicas x 1 thread, 20 steps, C = 1, 4, 8, batch 4
    python bench/serve.py --steps 50 --concurrency 1 8 16 --requests-per-client 4 --max-batch 2 4
    python bench/serve.py --batching pad --max-batch 2 --concurrency 1 --requests-per-client 1 --steps 2 \\
        --out serve_smoke.json                             # a smoke run (seconds of load; Ray start-up dominates)

Writes bench/results/serve_digits.json (every latency, per point and variant), a plot next to it (.png) and
prints a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, machine, write_json  # noqa: E402
from tcpass.serve import APP_NAME, DeployConfig, ServeConfig, build_app, local_replica_env, start  # noqa: E402

BATCHING = ("pad", "sizes", "off")  # pad every batch to --max-batch | trace 1, 2, 4, .. too | one image per batch


def variants(batching_modes: list[str], max_batches: list[int]) -> list[tuple[str, bool, str, int]]:
    """(name, uncached, batching, max_batch) in the order run: tcpass and uncached alternate, so each pair compared
    is measured close together on a machine whose load drifts; ``off`` runs once, at batch size 1."""
    runs = []
    for batching in batching_modes:
        for max_batch in [1] if batching == "off" else max_batches:
            runs += [
                (name, uncached, batching, max_batch) for name, uncached in (("tcpass", False), ("uncached", True))
            ]
    return runs


def batch_sizes(batching: str, max_batch: int) -> tuple[int, ...]:
    """The smaller sizes traced besides ``max_batch`` (powers of two) for the ``sizes`` mode."""
    return tuple(2**i for i in range(max_batch.bit_length()) if 2**i < max_batch) if batching == "sizes" else ()


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def load_point(url: str, concurrency: int, per_client: int, steps: int, timeout: float) -> dict:
    """``concurrency`` clients, ``per_client`` requests each; latencies, failures, images/s, batch sizes."""
    latencies: list[float] = []
    batch_images: list[int] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        session = requests.Session()
        for r in range(per_client):
            body = {"class_label": (c + r) % 10, "seed": 1000 * c + r, "steps": steps}
            sent = time.perf_counter()
            try:
                answer = session.post(url + "/generate/json", json=body, timeout=timeout)
                ok = answer.status_code == 200
                detail = answer.json()["batch"]["images"] if ok else f"{answer.status_code}: {answer.text[:120]}"
            except requests.RequestException as e:
                ok, detail = False, repr(e)
            seconds = time.perf_counter() - sent
            with lock:
                if ok:
                    latencies.append(seconds)
                    batch_images.append(detail)
                else:
                    failures.append(detail)

    start_time = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - start_time
    return {
        "concurrency": concurrency,
        "requests": concurrency * per_client,
        "failed": len(failures),
        "failures": failures,
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
        "p50_s": percentile(latencies, 50) if latencies else None,
        "p95_s": percentile(latencies, 95) if latencies else None,
        "p99_s": percentile(latencies, 99) if latencies else None,
        "mean_batch_images": statistics.mean(batch_images) if batch_images else None,
        "latencies_s": latencies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per request (CFG 4.0)")
    parser.add_argument(
        "--max-batch", type=int, nargs="+", default=[4], help="images per model batch with batching on (each is run)"
    )
    parser.add_argument("--batching", nargs="+", choices=BATCHING, default=list(BATCHING), help="batching modes")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--out", default="serve_digits.json")
    args = parser.parse_args()
    if min(args.max_batch) < 1 or min(args.concurrency) < 1 or args.requests_per_client < 1:
        parser.error("--max-batch, --concurrency and --requests-per-client take integers >= 1")

    import ray
    from ray import serve

    load_before = os.getloadavg()
    points = []
    url = None
    bench_start = time.perf_counter()
    try:
        for name, uncached, batching, max_batch in variants(args.batching, args.max_batch):
            config = ServeConfig(
                uncached=uncached,
                max_batch=max_batch,
                batch_sizes=batch_sizes(batching, max_batch),
                batch_wait_s=args.batch_wait_ms / 1000,
                threads=args.threads,
            )
            deploy = DeployConfig(
                replicas=args.replicas,
                replica_cpus=args.threads,
                max_ongoing_requests=max(8, 2 * max_batch),  # the next batch fills while one runs
                max_queued_requests=-1,  # closed-loop clients: the queue never holds more than the clients
                request_timeout_s=args.timeout,
            )
            deployed = time.perf_counter()
            if url is None:
                url = start(config, deploy, port=args.port)
            else:
                serve.delete(APP_NAME)
                serve.run(build_app(config, deploy, local_replica_env()), name=APP_NAME, route_prefix="/")
            deploy_s = time.perf_counter() - deployed
            load_point(url, args.replicas, 1, args.steps, args.timeout)  # warm-up: one request per replica
            for concurrency in args.concurrency:
                point = load_point(url, concurrency, args.requests_per_client, args.steps, args.timeout)
                sizes = sorted({*config.batch_sizes, config.max_batch})
                point.update(variant=name, batching=batching, max_batch=max_batch, batch_sizes=sizes, deploy_s=deploy_s)
                points.append(point)
                print(f"{row(point)}", flush=True)
    finally:
        if url is not None:
            serve.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()

    print(f"\n{HEADER}")
    for p in points:
        print(row(p))
    speedups = {}
    for p in points:
        if p["variant"] == "tcpass":
            base = next(q for q in points if q["variant"] == "uncached" and same_setting(p, q))
            key = f"batching {p['batching']}, batch {p['max_batch']}, C={p['concurrency']}"
            speedups[key] = p["images_per_s"] / base["images_per_s"] if base["images_per_s"] else None
    print("\ntcpass / uncached throughput: " + ", ".join(f"{k}: {v or 0:.2f}x" for k, v in speedups.items()))
    path = write_json(
        args.out,
        {
            "machine": machine(),
            "conditions": (
                "local Ray instance on this machine, HTTP on loopback, client threads in the same machine; "
                "the machine's CPUs are shared with other work (load averages below)"
            ),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": load_after,
            "cpu_count": os.cpu_count(),
            "args": vars(args),
            "guidance": 4.0,
            "total_s": time.perf_counter() - bench_start,
            "throughput_speedup_tcpass_vs_uncached": speedups,
            "points": points,
        },
    )
    print(f"wrote {path}")
    try:
        print(f"wrote {plot(points, (RESULTS / args.out).with_suffix('.png'))}")
    except ImportError:
        print("(no plot: matplotlib is not installed; pip install 'tcpass[plots]')")
    return 0 if all(p["failed"] == 0 for p in points) else 1


HEADER = (
    f"{'variant':9} {'batching':8} {'batch':>5} {'C':>3} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'p99 s':>7} "
    f"{'in batch':>8} {'failed':>6}"
)


def row(p: dict) -> str:
    """One point as a line of the table under `HEADER`."""
    latency = " ".join(f"{p[k]:7.2f}" if p[k] is not None else f"{'-':>7}" for k in ("p50_s", "p95_s", "p99_s"))
    in_batch = f"{p['mean_batch_images']:8.2f}" if p["mean_batch_images"] is not None else f"{'-':>8}"
    return (
        f"{p['variant']:9} {p['batching']:8} {p['max_batch']:>5} {p['concurrency']:>3} {p['images_per_s']:9.2f} "
        f"{latency} {in_batch} {p['failed']:>6}"
    )


def same_setting(p: dict, q: dict) -> bool:
    return all(p[k] == q[k] for k in ("batching", "max_batch", "concurrency"))


def plot(points: list[dict], path: Path) -> Path:
    """images/s and latency (p50, p95 shaded up to p99) against clients, one line per variant and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    lines = sorted({(p["batching"], p["max_batch"], p["variant"]) for p in points})
    colors = {setting: f"C{i}" for i, setting in enumerate(sorted({line[:2] for line in lines}))}
    for batching, max_batch, variant in lines:
        ps = sorted(
            (p for p in points if (p["batching"], p["max_batch"], p["variant"]) == (batching, max_batch, variant)),
            key=lambda p: p["concurrency"],
        )
        clients = [p["concurrency"] for p in ps]
        style = {
            "color": colors[batching, max_batch],
            "ls": "-" if variant == "tcpass" else "--",
            "marker": "o" if variant == "tcpass" else "s",
        }
        label = f"{variant}, {batching}, batch {max_batch}"
        speed.plot(clients, [p["images_per_s"] for p in ps], label=label, **style)
        latency.plot(clients, [p["p50_s"] for p in ps], label=label, **style)
        latency.fill_between(
            clients, [p["p95_s"] for p in ps], [p["p99_s"] for p in ps], color=style["color"], alpha=0.12
        )
        latency.plot(clients, [p["p95_s"] for p in ps], color=style["color"], ls=":", lw=1)
    speed.set(xlabel="clients (closed loop)", ylabel="images/s", title="throughput (up is better)")
    latency.set(
        xlabel="clients (closed loop)",
        ylabel="latency, s",
        title="latency: p50 (markers), p95 (dotted) to p99 (shaded)",
    )
    for ax in (speed, latency):
        ax.set_xticks(sorted({p["concurrency"] for p in points}))
    speed.legend(fontsize=7)
    fig.suptitle("tcpass serve, digits model: tcpass (solid) vs uncached (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
