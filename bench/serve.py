"""Serving: throughput and latency of `tcpass serve` vs concurrency, batching on/off, tcpass vs uncached.

The shipped digits reference model behind the same Ray Serve application (a local Ray instance this script
starts and stops, HTTP on loopback), six variants one after another: the TokenCache-transformed model and the
untransformed model (``--uncached``), alternating, each with three batching modes: ``pad`` (every model batch padded to
``--max-batch`` images, default 4: bit-identical images under any load), ``sizes`` (batch sizes 1, 2, 4 traced:
a batch runs at the smallest that holds it) and ``off`` (``--max-batch 1``: one image per model batch). At each
concurrency C, C client threads send ``--requests-per-client`` requests each, back to back; a request's latency
is measured by its client (send to last byte), throughput is images answered / wall time of the whole point.

    python bench/serve.py                                  # 2 replicas x 1 thread, 20 steps, C = 1, 4, 8
    python bench/serve.py --steps 50 --concurrency 1 8 16 --requests-per-client 4

Writes bench/results/serve_digits.json (every latency, per point and variant) and prints a table.
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

from bench.common import machine, write_json  # noqa: E402
from tcpass.serve import APP_NAME, ServeConfig, build_app, local_replica_env, start  # noqa: E402

BATCHING = ("pad", "sizes", "off")  # pad every batch to --max-batch | trace 1, 2, 4, .. too | one image per batch
# tcpass and uncached alternate, so each pair compared is measured close together on a machine whose load drifts
VARIANTS = [
    (name, uncached, batching) for batching in BATCHING for name, uncached in (("tcpass", False), ("uncached", True))
]


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
        "mean_batch_images": statistics.mean(batch_images) if batch_images else None,
        "latencies_s": latencies,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per request (CFG 4.0)")
    parser.add_argument("--max-batch", type=int, default=4, help="images per model batch with batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=50.0)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    parser.add_argument("--out", default="serve_digits.json")
    args = parser.parse_args()

    import ray
    from ray import serve

    load_before = os.getloadavg()
    points = []
    url = None
    bench_start = time.perf_counter()
    try:
        for name, uncached, batching in VARIANTS:
            config = ServeConfig(
                uncached=uncached,
                max_batch=args.max_batch if batching != "off" else 1,
                batch_sizes=batch_sizes(batching, args.max_batch),
                batch_wait_s=args.batch_wait_ms / 1000,
                threads=args.threads,
            )
            deployed = time.perf_counter()
            if url is None:
                url = start(config, args.replicas, args.threads, port=args.port, request_timeout_s=args.timeout)
            else:
                serve.delete(APP_NAME)
                app = build_app(config, args.replicas, args.threads, local_replica_env())
                serve.run(app, name=APP_NAME, route_prefix="/")
            deploy_s = time.perf_counter() - deployed
            load_point(url, args.replicas, 1, args.steps, args.timeout)  # warm-up: one request per replica
            for concurrency in args.concurrency:
                point = load_point(url, concurrency, args.requests_per_client, args.steps, args.timeout)
                sizes = sorted({*config.batch_sizes, config.max_batch})
                point.update(variant=name, batching=batching, batch_sizes=sizes, deploy_s=deploy_s)
                points.append(point)
                print(
                    f"{name:9} batching {batching:5} C={concurrency:<3} "
                    f"{point['images_per_s']:6.2f} images/s  p50 {point['p50_s']:6.2f} s  p95 {point['p95_s']:6.2f} s  "
                    f"mean batch {point['mean_batch_images']:.2f}  failed {point['failed']}",
                    flush=True,
                )
    finally:
        if url is not None:
            serve.shutdown()
        ray.shutdown()
    load_after = os.getloadavg()

    print(
        f"\n{'variant':9} {'batching':8} {'C':>3} {'images/s':>9} {'p50 s':>7} {'p95 s':>7} {'batch':>6} {'failed':>6}"
    )
    for p in points:
        print(
            f"{p['variant']:9} {p['batching']:8} {p['concurrency']:>3} {p['images_per_s']:9.2f} "
            f"{p['p50_s']:7.2f} {p['p95_s']:7.2f} {p['mean_batch_images']:6.2f} {p['failed']:>6}"
        )
    speedups = {}
    for p in points:
        if p["variant"] == "tcpass":
            base = next(
                q
                for q in points
                if q["variant"] == "uncached"
                and q["batching"] == p["batching"]
                and q["concurrency"] == p["concurrency"]
            )
            key = f"batching {p['batching']}, C={p['concurrency']}"
            speedups[key] = p["images_per_s"] / base["images_per_s"]
    print("\ntcpass / uncached throughput: " + ", ".join(f"{k}: {v:.2f}x" for k, v in speedups.items()))
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
    return 0 if all(p["failed"] == 0 for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
