"""What switching a LoRA costs on a transformed model: with a re-trace, and without one.

A LoRA change through diffusers' methods (``load_lora_adapter``, ``set_adapters`` on unmerged layers,
``fuse_lora``, ...) changes the model's Python structure or flags, so tcpass traces its graphs again on
the next call.
Switching fused adapters (``unfuse_lora``, ``set_adapters``, ``fuse_lora``) and weights changed in
place (two LoRAs fused ahead of time, switched by copying the fused weights in) need none: a merged
LoRA layer runs its base layer alone, and the graphs read the parameters when they run. Tracing cost
grows with the number of blocks, not their width, so the model is SD3-medium's depth (24 joint
blocks; or Flux-dev's 19 + 38 with ``--family flux``) at a reduced width; the step itself is timed
too, for scale. Each figure: median, min and max of ``--repeats`` runs, in seconds.

    python bench/retrace_cost.py --family sd3 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import peft
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

import tcpass
from tcpass import CachePlan

TEXT = 16


def model_and_inputs(family: str):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if family == "sd3":
        model = SD3Transformer2DModel(
            sample_size=32, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
            pooled_projection_dim=64, out_channels=16, pos_embed_max_size=32,
        )  # fmt: skip
        inputs = {
            "hidden_states": torch.randn(2, 16, 32, 32, generator=g),
            "encoder_hidden_states": torch.randn(2, TEXT, 64, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g),
            "timestep": torch.full((2,), 900.0),
        }
    else:
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=19, num_single_layers=38, attention_head_dim=64,
            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, guidance_embeds=True,
            axes_dims_rope=(16, 24, 24),
        )  # fmt: skip
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(16.0), torch.arange(16.0), indexing="ij"), -1)
        inputs = {
            "hidden_states": torch.randn(2, 256, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, TEXT, 64, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g),
            "timestep": torch.full((2,), 0.9),
            "img_ids": ids.reshape(256, 3),
            "txt_ids": torch.zeros(TEXT, 3),
            "guidance": torch.full((2,), 3.5),
        }
    return model.eval(), inputs


class Sampler:
    """Calls a model as a 25-step sampler does: the timestep falls call by call (a new generation after
    the last), so plans cache as they would in a pipeline."""

    def __init__(self, inputs: dict, scale: float) -> None:
        self.inputs, self.scale, self.calls = inputs, scale, {}

    def __call__(self, model) -> None:
        i = self.calls.get(id(model), 0)
        self.calls[id(model)] = i + 1
        t = (980.0 - 40.0 * (i % 25)) * self.scale
        model(**{**self.inputs, "timestep": torch.full_like(self.inputs["timestep"], t)})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {
        "median_s": round(statistics.median(values), 3),
        "min_s": round(min(values), 3),
        "max_s": round(max(values), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=["sd3", "flux"], default="sd3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/retrace_cost_<family>.json)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, inputs = model_and_inputs(args.family)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = peft.LoraConfig(r=16, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    plans = {"no_cache": CachePlan.no_cache(), "default": CachePlan()}
    step = Sampler(inputs, 1.0 if args.family == "sd3" else 1 / 1000)
    rows = {}
    with torch.no_grad():
        for plan_name, plan in plans.items():
            names = (
                "transform",
                "step",
                "set_adapters_then_step",
                "fused_switch_then_step",
                "in_place_switch_then_step",
            )
            cost: dict[str, list[float]] = {k: [] for k in names}
            for _ in range(args.repeats):
                m = copy.deepcopy(model)
                cost["transform"].append(timed(lambda m=m, plan=plan: tcpass.transform(m, plan, example_inputs=inputs)))
                tm = tcpass.transform(m, plan, example_inputs=inputs)
                for _ in range(3):  # warm: FULL and CACHED graphs have run
                    step(tm)
                cost["step"].append(timed(lambda tm=tm: step(tm)))
                # LoRA through diffusers' methods: a re-trace on the next call
                torch.manual_seed(0)
                tm.add_adapter(config, adapter_name="a")
                torch.manual_seed(1)
                tm.add_adapter(config, adapter_name="b")
                tm.set_adapters(["a"])
                step(tm)
                switched = timed(lambda tm=tm: (tm.set_adapters(["b"], [0.8]), step(tm)))
                cost["set_adapters_then_step"].append(switched)
                # fused adapters switched (unfuse, set_adapters, fuse): merged layers need no re-trace
                tm.set_adapters(["a"])
                tm.fuse_lora()
                step(tm)
                graphs = tm.step_graphs()

                def fused_switch(tm=tm):
                    tm.unfuse_lora()
                    tm.set_adapters(["b"], [0.8])
                    tm.fuse_lora()
                    step(tm)

                cost["fused_switch_then_step"].append(timed(fused_switch))
                assert tm.step_graphs() is graphs, "a fused switch re-traced"
                # two LoRAs fused ahead of time, switched by copying weights in place: no re-trace
                plain = copy.deepcopy(model)
                tp = tcpass.transform(plain, plan, example_inputs=inputs)
                fused = []
                for seed in (0, 1):
                    donor = copy.deepcopy(model)
                    torch.manual_seed(seed)
                    donor.add_adapter(config, adapter_name="x")
                    donor.fuse_lora()
                    donor.unload_lora()
                    fused.append([p.detach().clone() for p in donor.parameters()])
                params = list(plain.parameters())

                def switch(weights, params=params, tp=tp):
                    for p, w in zip(params, weights, strict=True):
                        p.copy_(w)
                    step(tp)

                for _ in range(3):
                    switch(fused[0])
                cost["in_place_switch_then_step"].append(timed(lambda switch=switch, w=fused[1]: switch(w)))
            rows[plan_name] = {k: summary(v) for k, v in cost.items()}
            print(plan_name, json.dumps(rows[plan_name]), flush=True)
    blocks = {"sd3": 24, "flux": "19 + 38"}[args.family]
    report = {"family": args.family, "blocks": blocks, "repeats": args.repeats, "torch": torch.__version__}
    report["rows"] = rows
    out = args.out or Path(f"bench/results/retrace_cost_{args.family}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
