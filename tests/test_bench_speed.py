"""bench/speed.py's rows on CPU: the code the GPU matrix runs, on a tiny model (behaviour, not timing)."""

import pytest
import torch

import tcpass
from bench.speed import bench_row, ort_providers, parse_list
from tests.conftest import make_dit

PLAN = tcpass.CachePlan(keep_ratio=0.25, attention="cached_kv", schedule=tcpass.TPRRSchedule(boundary_timestep=500))
CPU = torch.device("cpu")


def tiny(dtype=torch.float32):
    return make_dit(num_layers=2).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_row_times_every_step_kind(dtype):
    row = bench_row("tiny", tiny(dtype), PLAN, steps=6, reps=1, executor="eager", batch=4, device=CPU)
    assert row["status"] == "ok" and row["dtype"] == str(dtype).removeprefix("torch.")
    steps = row["per_step"]
    assert steps["uncached"]["calls"] == 6
    assert steps["full"]["calls"] + steps["cached"]["calls"] == 6 and steps["cached"]["calls"] > 0
    assert row["steps_full_cached"] == [steps["full"]["calls"], steps["cached"]["calls"]]
    assert row["peak_gpu_memory_mib"] == {"baseline": None, "tcpass": None}  # CPU: not measured
    assert row["speedup"] > 0 and len(row["baseline_s"]["all"]) == 1


def test_reduce_overhead_row_compiles_once_and_matches_eager():
    row = bench_row("tiny", tiny(), PLAN, steps=4, reps=1, executor="reduce-overhead", batch=2, device=CPU)
    assert row["status"] == "ok", row["status"]
    assert row["graphs_compiled_after_first_generation"] == 0
    assert row["tcpass_vs_eager_transformed"]["max_rel_error"] <= 1e-3
    assert row["cudagraph_skips"] > 0 and row["cudagraphs"].startswith("not on CPU")


def test_ort_row_on_float16_and_refusals():
    row = bench_row("tiny", tiny(torch.float16), PLAN, steps=4, reps=1, executor="ort", batch=2, device=CPU)
    assert row["status"] == "ok" and row["per_step"]["cached"]["calls"] > 0
    with pytest.raises(TypeError, match="bfloat16"):  # main() records it as the row's skip reason
        bench_row("tiny", tiny(torch.bfloat16), PLAN, steps=4, reps=1, executor="ort", batch=2, device=CPU)
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            ort_providers(torch.device("cuda"))
    with pytest.raises(ValueError, match="batch 3"):
        bench_row("tiny", tiny(), PLAN, steps=4, reps=1, executor="eager", batch=3, device=CPU)


def test_list_options_name_the_bad_item():
    import argparse

    parser = argparse.ArgumentParser()
    assert parse_list(parser, "--batches", "2,16", convert=int) == [2, 16]
    with pytest.raises(SystemExit):
        parse_list(parser, "--executors", "eager,cudagraphs", ("eager", "inductor"))


def test_video_speed_tiny_times_every_arm_and_proves_the_peers_fired():
    """bench/video_speed.py end to end on the 2-layer narrow Wan, eagerly (behaviour, not timing)."""
    from bench.video_speed import make_parser, run

    args = make_parser().parse_args(["--tiny", "--steps", "8", "--executors", "eager"])
    payload = run(args, write=lambda _payload: None)
    rows = {r["arm"]: r for r in payload["rows"]}
    timed = [r for r in rows.values() if r["status"] != "ok" or "speedup" in r]
    assert len(timed) == 7 and rows["uncached"]["speedup"] == 1.0
    calls = {name: sum(k["calls"] for k in r["step_kinds"].values()) for name, r in rows.items() if "step_kinds" in r}
    assert set(calls.values()) == {8}  # every arm ran the whole generation
    assert rows["tcpass token"]["step_kinds"]["cached, phase 0"]["calls"] > 0
    assert rows["tcpass step"]["step_kinds"]["skip"]["calls"] == 4  # every other step
    assert {"full", "skip"} <= set(rows["tcpass composed"]["step_kinds"])
    for name in ("tcpass token", "tcpass step", "tcpass composed", "FirstBlockCache", "TaylorSeer"):
        assert rows[name]["status"] == "ok" and rows[name]["flop_ideal_speedup"] > 1.0, name
    assert rows["FirstBlockCache"]["computed_block_fraction"] < 1.0  # whole blocks skipped
    assert rows["TaylorSeer"]["computed_block_fraction"] == 1.0  # blocks run, their modules forecast
    assert rows["TaylorSeer"]["computed_module_fraction"] < 1.0
    dbcache = rows.get("cache-dit DBCache") or rows["dbcache"]  # the peers extra (cache-dit) may not be installed
    assert dbcache["status"] == "ok" or dbcache["status"].startswith("unavailable")
