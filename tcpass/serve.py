"""`tcpass serve`: a class-conditional DiT or a text-to-image pipeline behind Ray Serve, with its request batching.

    tcpass serve                                 # the shipped digits model and plan, torch, a local Ray
    curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"class_label": 7, "seed": 1}' -o 7.png
    tcpass serve --model saved-pixart-pipeline --plan plan.json   # PixArt-alpha/Sigma, SD3, Flux: prompts
    curl -s localhost:8000/generate -H 'content-type: application/json' -d '{"prompt": "a red car"}' -o car.png

What a replica serves: a class-conditional DiT directory (``class_label`` requests), or a saved diffusers
text-to-image pipeline (a directory with ``model_index.json``: PixArt-alpha/Sigma, SD3, Flux; ``prompt`` and
``negative_prompt`` requests), its transformer TokenCache-transformed (`PipelineSampler`); with ``--runtime ort``,
a `tcpass export` directory, and for a PixArt export the pipeline whose text encoder and VAE run around it
(`OrtPipelineSampler`).

Two deployments: ``TokenCacheIngress`` (one replica, no CPU reserved) takes the HTTP requests, validates them and
calls ``TokenCacheServer`` through a deployment handle; each ``TokenCacheServer`` replica holds one sampler: the
TokenCache-transformed model (``--runtime torch``, or the untransformed model with ``--uncached``) or one
`OrtTokenCacheRuntime` over a `tcpass export` directory (``--runtime ort``). Requests are collected by
``@serve.batch`` and run as model batches of exactly the size the graphs were traced (torch) or exported (ort)
for: ``max_batch`` images, CFG doubling the model batch (torch can trace smaller sizes too, ``batch_sizes``). A
batch that is not full is padded and padding rows are dropped. Every image's noise comes from its own seed
(`tcpass.noise.seeded_noise`) and every row of a batch is computed independently, so a seed gives the same image
whether it was served alone, batched with others at any position, or generated directly at the same batch size.
Requests with different ``steps`` or ``guidance`` cannot share a model batch (other timesteps, other CFG); one
Ray batch runs them one model batch per (steps, guidance) group, in turn.

Endpoints (POST bodies are `GenerateRequest` JSON):

- ``POST /generate``: ``image/png`` (``num_images`` > 1: the images side by side, seeds ``seed``, ``seed+1``, ...)
- ``POST /generate/json``: ``{"images": [base64 PNG, ...], "seeds", "request_id", "timings", "batch", "attempts"}``
- ``GET /health``: the served model (runtime, plan, conditioning ``class`` or ``text``, classes, image shape,
  batch size) and the deployment's limits

Statuses (every error body is ``{"error": ..., "fields": [...]}``): 400 malformed JSON, 415 not JSON, 422 an
invalid field (named), all before the request reaches a replica; 503 with ``Retry-After`` when the queue is full
(`DeployConfig.max_queued_requests`); 504 when the request is not answered within
`DeployConfig.request_timeout_s`; 500 when its batch failed. A request whose replica dies (killed, crashed, out of
memory) is sent again, to another replica, up to `DeployConfig.max_retries` times: its seeds fix its images, so
the answer is the one it would have had, given once.
"""

import asyncio
import base64
import io
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tcpass.noise import MAX_SEED, seeded_noise

SERVE_EXTRA = 'pip install "tcpass[serve]" (from a checkout: pip install -e ".[serve]")'
try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from ray import serve
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
except ImportError as e:
    raise ImportError(f"tcpass serve needs the serve extra ({e.name} is missing): {SERVE_EXTRA}") from e

APP_NAME = "tcpass"
DEPLOYMENT_NAME = "TokenCacheServer"  # the replicas that hold a model
INGRESS_NAME = "TokenCacheIngress"  # the HTTP front: validation, retries, deadlines, backpressure
logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What one replica serves and how it batches.

    Attributes:
        model: a diffusers DiT directory (torch; default: the shipped digits model) or a `tcpass export`
            directory (ort).
        plan: the plan JSON (torch: default the shipped digits plan; ort: optional, the export must match it).
        runtime: ``"torch"`` or ``"ort"``.
        uncached: torch only: serve the untransformed model (full compute), the baseline.
        max_batch: images per model batch (torch: the batch it is traced for; ort: fixed by the export, the
            exported model batch / 2 with CFG). ``None``: 4 for torch, the export's for ort.
        batch_sizes: torch only: smaller batch sizes (images) to trace as well; a group of requests then runs
            at the smallest size that holds it instead of being padded to ``max_batch``. Faster at low load;
            a seed's image is then bit-identical only between requests that ran at the same size (across sizes
            it differs by float rounding). ``()``: only ``max_batch``.
        batch_wait_s: how long ``@serve.batch`` waits for a batch to fill after its first request.
        threads: torch / ONNX Runtime intra-op threads per replica.
        max_steps: the largest ``steps`` a request may ask for.
        device: torch only: where the model runs, ``"cpu"`` or ``"cuda"`` (a replica then needs
            `DeployConfig.replica_gpus`; Ray shows a replica only the GPUs it reserved).
        height, width: text-to-image pipelines: the image size in pixels every request gets (``None``: the
            pipeline's default). PixArt runs at exactly this size (no resolution binning).
        max_sequence_length: text-to-image pipelines: prompt tokens (``None``: the pipeline's default).
        pipeline: ort only: the saved PixArt pipeline (``model_index.json``) whose tokenizer, text encoder and VAE
            run around a text-conditioned export (the export stands in for its transformer).
    """

    model: str | None = None
    plan: str | None = None
    runtime: str = "torch"
    uncached: bool = False
    max_batch: int | None = None
    batch_sizes: tuple[int, ...] = ()
    batch_wait_s: float = 0.05
    threads: int = 1
    max_steps: int = 250
    device: str = "cpu"
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    pipeline: str | None = None


@dataclass(frozen=True)
class DeployConfig:
    """How many `TokenCacheServer` replicas run, on which resources, and which requests they admit.

    Attributes:
        replicas: a fixed replica count (default 1); not with autoscaling.
        min_replicas, max_replicas: autoscale between these counts (Ray Serve's ``autoscaling_config``); setting
            ``max_replicas`` turns autoscaling on, ``min_replicas`` defaults to 1.
        target_ongoing_requests: autoscaling: the requests per replica (running or waiting in it) Ray Serve
            scales to keep (default 4); about one batch (``max_batch``) keeps batches full without a long wait.
        replica_cpus: CPUs Ray reserves per replica (``None``: `ServeConfig.threads`; a fraction is allowed).
        replica_gpus: GPUs Ray reserves per replica (torch with ``ServeConfig(device="cuda")``; a fraction shares
            one GPU between replicas).
        max_ongoing_requests: requests one replica holds at a time, running or waiting for its next batch; at
            least 2 x ``max_batch`` lets the next batch fill while one runs.
        max_queued_requests: requests waiting for a replica beyond those (in the one `TokenCacheIngress`); one
            more is refused with 503 and ``Retry-After``. ``-1``: unbounded.
        retry_after_s: the ``Retry-After`` a refused request is sent, seconds (rounded up).
        request_timeout_s: a request not answered within this (waiting, retried and generated), seconds, gets
            504; the batch it is in, if it started, still runs to the end.
        max_retries: how many times a request whose replica died is sent again, to another replica.
    """

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    replica_cpus: float | None = None
    replica_gpus: float = 0.0
    max_ongoing_requests: int = 8
    max_queued_requests: int = 64
    retry_after_s: float = 1.0
    request_timeout_s: float = 300.0
    max_retries: int = 2

    def __post_init__(self) -> None:
        autoscaled = [
            name
            for name in ("min_replicas", "max_replicas", "target_ongoing_requests")
            if getattr(self, name) is not None
        ]
        if autoscaled and self.max_replicas is None:
            raise ValueError(f"{autoscaled[0]} = {getattr(self, autoscaled[0])}: autoscaling needs max_replicas too.")
        if autoscaled and self.replicas is not None:
            raise ValueError(
                f"replicas = {self.replicas} with {autoscaled[0]} = {getattr(self, autoscaled[0])}: "
                "give a fixed replica count or autoscaling bounds (min_replicas, max_replicas), not both."
            )
        for name in ("replicas", "min_replicas", "max_replicas", "max_ongoing_requests"):
            _check(name, getattr(self, name), lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1")
        for name in ("target_ongoing_requests", "replica_cpus", "request_timeout_s"):
            _check(name, getattr(self, name), lambda v: v is None or (_finite(v) and v > 0), "a number > 0")
        for name in ("replica_gpus", "retry_after_s"):
            _check(name, getattr(self, name), lambda v: _finite(v) and v >= 0, "a number >= 0")
        _check("max_retries", self.max_retries, lambda v: _integer(v) and v >= 0, "an integer >= 0")
        _check(
            "max_queued_requests",
            self.max_queued_requests,
            lambda v: _integer(v) and (v >= 0 or v == -1),
            "an integer >= 0, or -1 (unbounded)",
        )
        if self.max_replicas is not None and (self.min_replicas or 1) > self.max_replicas:
            raise ValueError(
                f"min_replicas = {self.min_replicas or 1} > max_replicas = {self.max_replicas}: "
                "expected min_replicas <= max_replicas."
            )

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @property
    def most_replicas(self) -> int:
        """The most replicas this config may run at once."""
        return self.max_replicas if self.autoscaling else (self.replicas or 1)


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check(name: str, value, valid, expected: str) -> None:
    if not valid(value):
        raise ValueError(f"{name} = {value!r}: expected {expected}.")


class GenerateRequest(BaseModel):
    """One request: ``num_images`` images of class ``class_label`` (a class-conditional model) or of ``prompt``
    (a text-to-image pipeline), image i from seed ``seed + i``."""

    model_config = ConfigDict(extra="forbid")

    class_label: int | None = Field(default=None, ge=0, description="class-conditional models: 0..num_classes-1")
    prompt: str | None = Field(default=None, max_length=4000, description="text-to-image pipelines: the prompt")
    negative_prompt: str = Field(default="", max_length=4000, description="text-to-image: the unconditional text")
    seed: int = Field(default=0, ge=0, le=MAX_SEED - 1024, description="noise seed of the first image")
    steps: int | None = Field(
        default=None,
        ge=1,
        description="sampler steps (at most the server's max_steps); default: the plan's sampler_steps, else 50",
    )
    guidance: float = Field(default=4.0, ge=1.0, le=50.0, allow_inf_nan=False, description="CFG scale; 1: none")
    num_images: int = Field(default=1, ge=1, le=1024, description="images, seeds seed..seed+num_images-1")
    request_id: str | None = Field(default=None, max_length=128, description="echoed back in /generate/json")


@dataclass
class Job:
    """A validated request waiting for a batch; ``received`` is ``time.perf_counter()`` at arrival.

    A class-conditional model's jobs have ``class_label``, a text-to-image pipeline's ``prompt``."""

    class_label: int | None
    seed: int
    steps: int
    guidance: float
    num_images: int
    prompt: str | None = None
    negative_prompt: str = ""
    received: float = field(default_factory=time.perf_counter)
    started: bool = False  # set when its batch starts (see `BatchGate`)


@dataclass
class Done:
    """A job's result: one PNG per image, in seed order."""

    pngs: list[bytes]
    samples: np.ndarray  # [num_images, C, H, W] float32: model samples (unclamped), a pipeline's images in [-1, 1]
    timings: dict  # seconds: queued (arrival at its replica to its model batch), generate (its model batch)
    batch: dict  # its model batch: requests, images, padding rows
    replica_pid: int = field(default_factory=os.getpid)  # the replica process that generated it


@dataclass
class Failed:
    error: str


class ClassSampler:
    """A class-conditional sampler: a batch's noise from the images' seeds (`tcpass.noise.seeded_noise`)."""

    conditioning = "class"
    image_shape: tuple[int, ...]

    def sample(self, noise: np.ndarray, labels: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        raise NotImplementedError

    def generate(self, seeds: list[int], jobs: list[Job | None], steps: int, guidance: float) -> np.ndarray:
        """Samples [len(seeds), C, H, W] of a model batch: row i from ``seeds[i]`` and ``jobs[i]`` (``None``: a
        padding row, class 0)."""
        labels = np.array([0 if job is None else job.class_label for job in jobs], dtype=np.int64)
        return self.sample(seeded_noise(seeds, self.image_shape), labels, steps, guidance)


class TorchSampler(ClassSampler):
    """The plan's sampler (``sampler``: DDIM, DPM-Solver++(2M), through its ``sampler_timesteps`` if it has them;
    DDIM without a plan) + CFG (`tcpass.sampling.ddim_sample`) on a DiT, TokenCache-transformed unless
    ``uncached``; a shipped reference model's weights sample with its guidance interval
    (`tcpass.zoo.ReferenceModel.guidance_interval`)."""

    def __init__(self, config: ServeConfig) -> None:
        import torch

        import tcpass
        from tcpass.adapters import load_transformer
        from tcpass.zoo import reference, sampler_for

        torch.set_num_threads(config.threads)
        self.device = _torch_device(config)
        digits = reference("digits")
        shipped = sampler_for(config.model)  # a shipped reference model samples with its own guidance interval
        self.guidance_interval = None if shipped is None else shipped.guidance_interval
        model = load_transformer(str(config.model or _digits_dir())).to(self.device)
        cfg = model.config
        if getattr(cfg, "num_embeds_ada_norm", None) is None or type(model).__name__ != "DiTTransformer2DModel":
            raise ValueError(
                f"--model {config.model}: a transformer directory must hold a class-conditional DiT "
                f"(DiTTransformer2DModel with num_embeds_ada_norm); got {type(model).__name__}. Serve a text-to-image "
                "model as its saved pipeline (the directory with model_index.json)."
            )
        self.num_classes = int(cfg.num_embeds_ada_norm)
        self.null_label = self.num_classes  # DiT's label table reserves row num_classes for CFG
        self.image_shape = _pixel_shape(config, (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size)))
        self.max_batch, self.batch_sizes = _torch_batch_sizes(config)
        self.plan = None
        if not config.uncached:
            plan_path = Path(config.plan) if config.plan else digits.default_plan
            self.plan = tcpass.load_plan(plan_path)
            model = tcpass.transform(model, self.plan, plan_dir=plan_path.parent)
        self.model = model

    def images_per_batch(self, guided: bool, images: int) -> int:
        """The model batch (in images) ``images`` images run at: the smallest traced size that holds them."""
        return _smallest_holding(self.batch_sizes, images)

    def sample(self, noise: np.ndarray, labels: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        import torch

        from tcpass.sampling import ddim_sample

        out = ddim_sample(
            self.model,
            torch.from_numpy(noise).to(self.device),
            torch.from_numpy(labels).to(self.device),
            self.null_label,
            steps,
            guidance,
            guidance_interval=self.guidance_interval,
            sampler=(self.plan.sampler if self.plan is not None else None) or "ddim",
        )
        return out.cpu().numpy()


class OrtSampler(ClassSampler):
    """numpy DDIM or DPM-Solver++ (the export's plan's) + CFG (`tcpass.export.ort_runtime.generate`) on an exported
    model; no torch."""

    def __init__(self, config: ServeConfig) -> None:
        if config.pipeline is not None:
            raise ValueError("--pipeline is for a text-conditioned export; this sampler serves class labels.")
        self.runtime, manifest = _ort_runtime(config)
        inputs = {i["name"]: i["shape"] for i in manifest["conditioning_inputs"]}
        if self.runtime.null_label is None or "class_labels" not in inputs:
            raise ValueError(f"--model {config.model}: not a class-conditional export (no class_labels input).")
        self.model_batch = int(inputs["hidden_states"][0])
        self.split = self.runtime.plan.guidance_reuse  # split guidance: the export runs one stream's rows
        if self.model_batch % 2 and not self.split:
            raise ValueError(
                f"--model {config.model} was exported for model batch {self.model_batch}; CFG needs an even batch "
                "(2 x images): export again with an even --batch."
            )
        self.num_classes = int(self.runtime.null_label)  # DiT's label table reserves row num_classes for CFG
        self.image_shape = _pixel_shape(config, tuple(int(d) for d in inputs["hidden_states"][1:]))
        self.max_batch = self.model_batch if self.split else self.model_batch // 2
        if config.max_batch not in (None, self.max_batch):
            raise ValueError(
                f"--max-batch {config.max_batch}: {config.model} was exported for model batch {self.model_batch}, "
                f"{self.max_batch} images with CFG; leave --max-batch unset or export again with "
                f"--batch {2 * config.max_batch}."
            )
        self.batch_sizes = [self.max_batch]
        self.plan = manifest["plan"]

    def images_per_batch(self, guided: bool, images: int) -> int:
        """The exported batch, in images: half the model batch with batched CFG, all of it without (or split)."""
        return self.max_batch if guided and not self.split else self.model_batch

    def sample(self, noise: np.ndarray, labels: np.ndarray, steps: int, guidance: float) -> np.ndarray:
        from tcpass.export.ort_runtime import generate

        return generate(self.runtime, noise, labels, num_steps=steps, guidance_scale=guidance)


def _unwrap(transformer):
    from tcpass.torch_runtime import TokenCacheTransformer

    return transformer.transformer if isinstance(transformer, TokenCacheTransformer) else transformer


class PipelineSampler:
    """A saved text-to-image diffusers pipeline (PixArt-alpha/Sigma, SD3, Flux) whose transformer runs the plan
    (``ServeConfig.plan``; default `tcpass.CachePlan()`; ``uncached``: the pipeline as loaded), with the pipeline's
    own scheduler, text encoders and VAE.

    Image i of a model batch comes from ``torch.Generator().manual_seed(seeds[i])`` (diffusers' per-image
    generators), so a served image equals ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` with
    the same plan, at the same model batch (padding rows: the empty prompt, seed 0).
    """

    conditioning = "text"

    def __init__(self, config: ServeConfig) -> None:
        import inspect

        import torch

        import tcpass
        from tcpass.generate import is_video_pipeline, load_pipeline

        torch.set_num_threads(config.threads)
        self.device = _torch_device(config)
        pipe = load_pipeline(config.model)
        base = _unwrap(pipe.transformer)
        if is_video_pipeline(pipe) or type(base).__name__ == "DiTTransformer2DModel":
            kind = "a video pipeline" if is_video_pipeline(pipe) else "a class-conditional DiT pipeline"
            raise ValueError(
                f"--model {config.model}: {type(pipe).__name__} is {kind}; tcpass serve serves text-to-image "
                "pipelines (PixArt-alpha/Sigma, SD3, Flux) and class-conditional DiT transformer directories."
            )
        self.plan = None
        if config.uncached:
            pipe.transformer = base
        else:
            self.plan = tcpass.load_plan(config.plan) if config.plan else tcpass.CachePlan()
            plan_dir = Path(config.plan).parent if config.plan else None
            pipe.transformer = tcpass.transform(base, self.plan, plan_dir=plan_dir)
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.pipeline = type(pipe).__name__
        size = getattr(pipe, "default_sample_size", None) or base.config.sample_size
        self.height = config.height or int(size * pipe.vae_scale_factor)
        self.width = config.width or int(size * pipe.vae_scale_factor)
        self.image_shape = (3, self.height, self.width)
        parameters = inspect.signature(type(pipe).__call__).parameters
        self.call_kwargs = {"height": self.height, "width": self.width, "output_type": "np"}
        if "use_resolution_binning" in parameters:
            self.call_kwargs["use_resolution_binning"] = False  # exactly height x width
        if config.max_sequence_length is not None:
            self.call_kwargs["max_sequence_length"] = config.max_sequence_length
        self.max_batch, self.batch_sizes = _torch_batch_sizes(config)

    def images_per_batch(self, guided: bool, images: int) -> int:
        """The model batch (in images) ``images`` images run at: the smallest traced size that holds them."""
        return _smallest_holding(self.batch_sizes, images)

    def generate(self, seeds: list[int], jobs: list[Job | None], steps: int, guidance: float) -> np.ndarray:
        """Images [len(seeds), 3, H, W] in [-1, 1]: row i from ``seeds[i]`` and ``jobs[i]``'s prompts."""
        import torch

        output = self.pipe(
            prompt=["" if job is None else job.prompt for job in jobs],
            negative_prompt=["" if job is None else job.negative_prompt for job in jobs],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(int(seed)) for seed in seeds],
            **self.call_kwargs,
        )
        return np.moveaxis(np.asarray(output.images, dtype=np.float32), -1, 1) * 2.0 - 1.0


class OrtPipelineSampler:
    """A text-conditioned PixArt export on ONNX Runtime (`tcpass.export.ort_runtime.generate`: numpy DDIM + CFG), the
    prompts encoded and the latents decoded by a saved PixArt pipeline's text encoder and VAE (torch).

    Image i's latent noise comes from ``seeds[i]`` (`tcpass.noise.seeded_noise`); the export fixes the model
    batch (exported batch / 2 images with CFG) and the prompt length (its ``encoder_hidden_states`` tokens).
    """

    conditioning = "text"

    def __init__(self, config: ServeConfig) -> None:
        import torch

        from tcpass.generate import load_pipeline

        self.runtime, manifest = _ort_runtime(config)
        inputs = {i["name"]: i["shape"] for i in manifest["conditioning_inputs"]}
        names = set(self.runtime.conditioning_names)
        if "encoder_hidden_states" not in names or not names <= {"encoder_hidden_states", "encoder_attention_mask"}:
            raise ValueError(
                f"--model {config.model}: the export takes {sorted(names)}; --pipeline serves text-conditioned "
                "PixArt exports (encoder_hidden_states and encoder_attention_mask)."
            )
        torch.set_num_threads(config.threads)
        pipe = load_pipeline(config.pipeline)
        if not type(pipe).__name__.startswith("PixArt"):
            raise ValueError(
                f"--pipeline {config.pipeline}: {type(pipe).__name__}; the ort runtime serves PixArt-alpha/Sigma "
                "exports with their pipeline's text encoder and VAE (torch serves SD3 and Flux pipelines)."
            )
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.pipeline = type(pipe).__name__
        self.model_batch = int(inputs["hidden_states"][0])
        if self.model_batch % 2 or self.runtime.plan.guidance_reuse:
            raise ValueError(
                f"--model {config.model}: exported for model batch {self.model_batch}"
                f"{' with split guidance' if self.runtime.plan.guidance_reuse else ''}; serving a text export "
                "needs batched CFG at an even batch (2 x images): export again with an even --batch."
            )
        self.max_batch = self.model_batch // 2
        if config.max_batch not in (None, self.max_batch):
            raise ValueError(
                f"--max-batch {config.max_batch}: {config.model} was exported for model batch {self.model_batch}, "
                f"{self.max_batch} images with CFG; leave --max-batch unset."
            )
        self.batch_sizes = [self.max_batch]
        self.latent_shape = tuple(int(d) for d in inputs["hidden_states"][1:])
        self.text_tokens = int(inputs["encoder_hidden_states"][1])
        scale = pipe.vae_scale_factor
        self.image_shape = (3, self.latent_shape[1] * scale, self.latent_shape[2] * scale)
        self.plan = manifest["plan"]

    def images_per_batch(self, guided: bool, images: int) -> int:
        return self.max_batch if guided else self.model_batch

    def generate(self, seeds: list[int], jobs: list[Job | None], steps: int, guidance: float) -> np.ndarray:
        """Images [len(seeds), 3, H, W] in [-1, 1]."""
        import torch

        from tcpass.export.ort_runtime import generate

        names = self.runtime.conditioning_names
        with torch.no_grad():
            embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
                ["" if job is None else job.prompt for job in jobs],
                do_classifier_free_guidance=True,
                negative_prompt=["" if job is None else job.negative_prompt for job in jobs],
                device="cpu",
                max_sequence_length=self.text_tokens,
            )
        cond = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
        uncond = {"encoder_hidden_states": negative, "encoder_attention_mask": negative_mask}
        cond, uncond = ({k: v.float().numpy() for k, v in rows.items() if k in names} for rows in (cond, uncond))
        noise = seeded_noise(seeds, self.latent_shape)
        latents = generate(self.runtime, noise, cond, num_steps=steps, guidance_scale=guidance, uncond=uncond)
        vae = self.pipe.vae
        with torch.no_grad():
            images = vae.decode(torch.from_numpy(latents).to(vae.dtype) / vae.config.scaling_factor).sample
        return images.float().clamp(-1.0, 1.0).numpy()


def _torch_batch_sizes(config: ServeConfig) -> tuple[int, list[int]]:
    """A torch sampler's ``max_batch`` (default 4) and the sizes it runs, ``batch_sizes`` and ``max_batch``."""
    largest = config.max_batch or 4
    sizes = sorted(set(config.batch_sizes) | {largest})
    if sizes[-1] != largest or sizes[0] < 1:
        raise ValueError(f"batch sizes {config.batch_sizes}: expected 1..max_batch ({largest}).")
    return largest, sizes


def _smallest_holding(sizes: list[int], images: int) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``images`` images, else the largest."""
    return next((size for size in sizes if size >= images), sizes[-1])


def _torch_device(config: ServeConfig):
    import torch

    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {config.device!r}: no CUDA device is visible to this replica; reserve one with "
            "--replica-gpus (DeployConfig.replica_gpus) on a node that has one."
        )
    return device


def _ort_runtime(config: ServeConfig):
    """The `OrtTokenCacheRuntime` of ``config.model`` (an export) and its manifest, after the checks every ort
    sampler makes."""
    from tcpass.export.ort_runtime import OrtTokenCacheRuntime
    from tcpass.plan import load_plan

    if config.model is None:
        raise ValueError("--runtime ort needs --model: a directory written by `tcpass export`.")
    if config.uncached:
        raise ValueError("--uncached is for --runtime torch; for ort, export a plan that caches nothing.")
    if config.batch_sizes:
        raise ValueError("--batch-sizes is for --runtime torch; an export runs at the one batch it was made for.")
    if config.device != "cpu":
        raise ValueError(f"device {config.device!r}: the ort runtime runs on CPU (onnxruntime's CPU provider).")
    expected = load_plan(config.plan) if config.plan else None
    runtime = OrtTokenCacheRuntime(config.model, expected_plan=expected, threads=config.threads)
    return runtime, runtime.manifest


def _pixel_shape(config: ServeConfig, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` (C, H, W) if the model generates pixels (1 channel: grey, 3: RGB); latents need a VAE, not served."""
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(
            f"--model {config.model}: samples of shape {list(shape)}; tcpass serve returns the samples as PNGs and "
            "serves pixel-space models (1 or 3 channels). A latent model's samples need its VAE, which is not served."
        )
    return shape


def _digits_dir() -> Path:
    from tcpass.zoo.digits import reference_model_dir

    return reference_model_dir()


Sampler = TorchSampler | OrtSampler | PipelineSampler | OrtPipelineSampler


def make_sampler(config: ServeConfig) -> Sampler:
    """The sampler ``config`` names: torch, a DiT directory (`TorchSampler`) or a pipeline with
    ``model_index.json`` (`PipelineSampler`); ort, a class-conditional export (`OrtSampler`) or, with
    ``pipeline``, a PixArt export (`OrtPipelineSampler`)."""
    if config.runtime == "torch":
        if config.pipeline is not None:
            raise ValueError("--pipeline is for --runtime ort; for torch, pass the pipeline directory as --model.")
        if config.model is not None and (Path(config.model) / "model_index.json").is_file():
            return PipelineSampler(config)
        if (config.height, config.width, config.max_sequence_length) != (None, None, None):
            raise ValueError("--height, --width and --max-sequence-length are for text-to-image pipelines.")
        return TorchSampler(config)
    if config.runtime == "ort":
        return OrtPipelineSampler(config) if config.pipeline is not None else OrtSampler(config)
    raise ValueError(f"runtime {config.runtime!r}: expected 'torch' or 'ort'.")


def run_batch(sampler: Sampler, jobs: list[Job]) -> list[Done | Failed]:
    """Run ``jobs`` as padded model batches, one per (steps, guidance) group; one result per job, in order.

    A group's images fill one model batch of ``sampler.images_per_batch(guided, images)`` rows; the rest are padding
    rows (seed 0, class 0 or the empty prompt) whose outputs are dropped. A group that fails fails only its own jobs.
    """
    results: list[Done | Failed | None] = [None] * len(jobs)
    groups: dict[tuple[int, float], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((job.steps, job.guidance), []).append(i)
    for (steps, guidance), members in groups.items():
        seeds = [jobs[i].seed + k for i in members for k in range(jobs[i].num_images)]
        capacity = sampler.images_per_batch(guidance != 1.0, len(seeds))
        rows: list[Job | None] = [jobs[i] for i in members for _ in range(jobs[i].num_images)]
        if len(seeds) > capacity:
            for i in members:
                results[i] = Failed(f"{len(seeds)} images in one group; the model batch holds {capacity}.")
            continue
        padding = capacity - len(seeds)
        start = time.perf_counter()
        try:
            samples = sampler.generate(seeds + [0] * padding, rows + [None] * padding, steps, guidance)
        except Exception as e:  # any failure is this group's, reported to its own requests
            for i in members:
                results[i] = Failed(f"generation failed: {type(e).__name__}: {e}")
            continue
        seconds = time.perf_counter() - start
        batch = {"requests": len(members), "images": len(seeds), "padding": padding}
        row = 0
        for i in members:
            rows = samples[row : row + jobs[i].num_images]
            row += jobs[i].num_images
            timings = {"queued": round(start - jobs[i].received, 4), "generate": round(seconds, 4)}
            results[i] = Done([to_png(image) for image in rows], rows, timings, batch)
    return results


def to_uint8(samples: np.ndarray) -> np.ndarray:
    """Samples [..., C, H, W] in [-1, 1] (clamped) to uint8 pixels [..., H, W, C]."""
    pixels = np.rint((np.clip(samples, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return np.moveaxis(pixels, -3, -1)


def to_png(samples: np.ndarray) -> bytes:
    """One sample [C, H, W] or several [n, C, H, W] (side by side) as PNG bytes (1 channel: grey, 3: RGB)."""
    from PIL import Image

    pixels = to_uint8(samples if samples.ndim == 4 else samples[None])
    strip = np.concatenate(list(pixels), axis=1)
    image = Image.fromarray(strip[..., 0] if strip.shape[-1] == 1 else strip)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class BatchGate:
    """Hands requests to ``@serve.batch`` only while no batch runs, at most one model batch of images at a time.

    Ray Serve's batcher forms the next batch while the previous one runs: it closes a batch
    ``batch_wait_timeout_s`` after the first request that arrives during the run, although that batch cannot
    start before the run ends. With runs of seconds, the requests arriving during one were split over several
    small batches (measured on digits, 8 clients, 2 replicas, batches of 4 images: 2.3 images per batch).
    Behind the gate they wait for the run to end, then enter Ray's batcher together and fill the next batch.
    Single-threaded (the replica's event loop); nothing here awaits except the waiters.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._admitted = 0  # images handed to the batcher and not yet in a running batch
        self._busy = False
        self._changed = asyncio.Event()

    async def enter(self, images: int) -> None:
        while self._busy or self._admitted + images > self.capacity:
            await self._changed.wait()
        self._admitted += images

    def started(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.started = True
        self._admitted -= sum(job.num_images for job in jobs)
        self._busy = True

    def finished(self) -> None:
        self._busy = False
        self._notify()

    def withdraw(self, job: Job) -> None:
        """``job`` was admitted but never reached a batch (its request was cancelled): free its place."""
        if not job.started:
            self._admitted -= job.num_images
            self._notify()

    def _notify(self) -> None:
        self._changed.set()  # wakes every waiter, in order; each checks again
        self._changed = asyncio.Event()


def _error(status: int, message: str, fields: list[str], headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message, "fields": fields}, headers=headers)


@serve.deployment(
    name=DEPLOYMENT_NAME,
    health_check_period_s=2,
    health_check_timeout_s=30,
    max_constructor_retry_count=2,  # a model that fails to load fails `serve.run` with its error, quickly
)
class TokenCacheServer:
    """One replica: one sampler, requests batched by ``@serve.batch`` into its model batches."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.sampler = make_sampler(config)
        # every generation on one thread: a transformed model refuses to continue a generation from another
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tcpass-generate")
        self.generate_batch.set_max_batch_size(self.sampler.max_batch)
        self._gate = BatchGate(self.sampler.max_batch)
        self.generate_batch.set_batch_wait_timeout_s(config.batch_wait_s)
        label, prompt = (None, "") if self.sampler.conditioning == "text" else (0, None)
        warm = [Job(label, 0, steps=2, guidance=4.0, num_images=n, prompt=prompt) for n in self.sampler.batch_sizes]
        failed = [r for job in warm for r in run_batch(self.sampler, [job]) if isinstance(r, Failed)]  # traces
        if failed:
            raise RuntimeError(f"warm-up generation failed: {failed[0].error}")
        self.pid = os.getpid()

    @serve.batch(max_batch_size=4, batch_size_fn=lambda jobs: sum(job.num_images for job in jobs))
    async def generate_batch(self, jobs: list[Job]) -> list[Done | Failed]:
        self._gate.started(jobs)
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, run_batch, self.sampler, jobs)
        finally:
            self._gate.finished()

    async def generate(self, job: Job) -> Done | Failed:
        """``job``'s images (or why its batch failed); a job the ingress has checked against `describe`."""
        job.received = time.perf_counter()  # this process's clock: ``timings.queued`` is the wait in this replica
        await self._gate.enter(job.num_images)
        try:
            return await self.generate_batch(job)
        finally:
            self._gate.withdraw(job)

    def describe(self) -> dict:
        """The served model and this replica's configuration (``GET /health``, the ingress's request checks)."""
        plan = self.sampler.plan
        return {
            "runtime": self.config.runtime,
            "cached": plan is not None,
            "plan": plan if plan is None or isinstance(plan, dict) else plan.to_dict(),
            "conditioning": self.sampler.conditioning,
            "pipeline": getattr(self.sampler, "pipeline", None),
            "num_classes": getattr(self.sampler, "num_classes", None),
            "image_shape": list(self.sampler.image_shape),
            "max_batch": self.sampler.max_batch,
            "batch_sizes": self.sampler.batch_sizes,
            "max_steps": self.config.max_steps,
            "config": asdict(self.config),
            "replica_pid": self.pid,
        }


class ReplicaLost(Exception):
    """A request's replica died on every attempt it was given."""


def replica_lost(error: BaseException) -> bool:
    """Whether ``error`` means the replica that held a request is gone (killed, crashed, unreachable), not that the
    request failed: the request never got an answer and is safe to send again (its seeds fix its images)."""
    return isinstance(error, RayActorError | ReplicaUnavailableError)


async def call_with_retries(method, *args, max_retries: int) -> tuple[object, int]:
    """``method.remote(*args)`` (a deployment handle's method) and the attempts it took. A call whose replica died
    (`replica_lost`) is made again, a new handle call that Ray Serve routes to a live replica, up to
    ``max_retries`` times; any other error is raised at once."""
    for attempt in range(1, max_retries + 2):
        response = method.remote(*args)
        try:
            return await response, attempt
        except asyncio.CancelledError:  # the deadline or the client's disconnect: stop it on the replica too
            response.cancel()
            raise
        except Exception as e:
            if not replica_lost(e):
                raise
            logger.warning(f"a replica died holding a request (attempt {attempt}): {type(e).__name__}")
            lost = e
    raise ReplicaLost(
        f"the replica running this request died {max_retries + 1} times (max_retries {max_retries}); last: "
        f"{type(lost).__name__}: {str(lost).splitlines()[0]}"
    )


api = FastAPI(title="tcpass", description="TokenCache diffusion transformer behind Ray Serve")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = "; ".join(str(e.get("ctx", {}).get("error", e.get("msg"))) for e in errors)
        return _error(400, f"malformed JSON body: {detail}", ["body"])
    if any(isinstance(e.get("input"), bytes) for e in errors):  # a body FastAPI did not read as JSON
        content_type = request.headers.get("content-type")
        message = f"content-type {content_type!r}: send the body as JSON with content-type: application/json"
        return _error(415, message, ["body"])
    fields = [".".join(str(p) for p in e["loc"] if p != "body") or "body" for e in errors]
    accepted = ", ".join(GenerateRequest.model_fields)
    messages = [
        f"{name}: unknown field; accepted: {accepted}"
        if e["type"] == "extra_forbidden"
        else f"{name}: {e['msg']} (got {e.get('input')!r})"
        for name, e in zip(fields, errors, strict=True)
    ]
    return _error(422, "; ".join(messages), fields)


def request_steps(request: GenerateRequest, model: dict) -> int:
    """The sampler steps ``request`` runs: its own ``steps``, else the served plan's ``sampler_steps``, else 50."""
    if request.steps is not None:
        return request.steps
    return (model.get("plan") or {}).get("sampler_steps") or 50


def _check_request(request: GenerateRequest, model: dict) -> JSONResponse | None:
    """The limits that depend on the served model and configuration (the rest are `GenerateRequest`'s)."""
    if model["conditioning"] == "text":
        if request.class_label is not None:
            message = f"class_label: this server's model ({model['pipeline']}) takes a prompt, not a class label"
            return _error(422, message, ["class_label"])
        if request.prompt is None:
            message = f"prompt: required by this server's text-to-image model ({model['pipeline']})"
            return _error(422, message, ["prompt"])
    else:
        fields = [name for name in ("prompt", "negative_prompt") if getattr(request, name)]
        if fields:
            message = f"{fields[0]}: this server's model is class-conditional; send class_label instead"
            return _error(422, message, fields)
        if request.class_label is None:
            n = model["num_classes"]
            return _error(422, f"class_label: required by this class-conditional model (0..{n - 1})", ["class_label"])
    if model["conditioning"] == "class" and request.class_label >= model["num_classes"]:
        n = model["num_classes"]
        return _error(
            422, f"class_label: {request.class_label} is not a class of this model (0..{n - 1})", ["class_label"]
        )
    plan = model.get("plan") or {}
    steps, plan_steps = request_steps(request, model), plan.get("sampler_steps")
    if plan_steps is not None and steps != plan_steps:
        message = (
            f"steps: {steps}, but this server's plan runs {plan_steps} {plan.get('sampler') or 'sampler'} steps "
            f"(its sampler_steps: a skip table or calibrated timesteps are keyed by them); send steps={plan_steps} "
            "or leave steps out"
        )
        return _error(422, message, ["steps"])
    if steps > model["max_steps"]:
        return _error(422, f"steps: {steps} is above this server's max_steps {model['max_steps']}", ["steps"])
    if request.num_images > model["max_batch"]:
        message = f"num_images: {request.num_images} is above this server's batch of {model['max_batch']} images"
        return _error(422, message, ["num_images"])
    return None


# serve.ingress copies `api` when the class is defined: what its routes call must be defined above this line
@serve.deployment(name=INGRESS_NAME, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class TokenCacheIngress:
    """The HTTP front: checks requests, sends them to `TokenCacheServer` replicas, retries those whose replica
    died, refuses work beyond the queue (503) and answers 504 past the deadline."""

    def __init__(self, server, deploy: DeployConfig) -> None:
        self.server = server  # a DeploymentHandle to TokenCacheServer
        self.deploy = deploy
        self._model: dict | None = None  # `TokenCacheServer.describe`, fetched on the first request

    async def _answer(self, method: str, *args) -> tuple[object, int] | JSONResponse:
        """`call_with_retries` of the server's ``method`` within the request deadline; the deadline, a full queue
        and lost replicas as HTTP errors (504, 503, 500)."""
        timeout = self.deploy.request_timeout_s
        try:
            call = call_with_retries(getattr(self.server, method), *args, max_retries=self.deploy.max_retries)
            return await asyncio.wait_for(call, timeout)
        except asyncio.TimeoutError:
            message = f"not answered within request_timeout_s = {timeout:g} s (waiting, retries and generation)"
            return _error(504, message, [])
        except BackPressureError as e:
            retry_after = str(math.ceil(self.deploy.retry_after_s))
            message = (
                f"server busy: every replica is full and {self.deploy.max_queued_requests} requests are queued "
                f"(max_queued_requests); retry after {retry_after} s ({e})"
            )
            return _error(503, message, [], headers={"Retry-After": retry_after})
        except DeploymentUnavailableError as e:
            return _error(503, f"the model replicas are unavailable: {e.message}", [])
        except ReplicaLost as e:
            return _error(500, str(e), [])

    async def _model_info(self) -> dict | JSONResponse:
        if self._model is None:
            answer = await self._answer("describe")
            if isinstance(answer, JSONResponse):
                return answer
            self._model = answer[0]
        return self._model

    async def _generate(self, request: GenerateRequest) -> tuple[Done, int] | JSONResponse:
        model = await self._model_info()
        if isinstance(model, JSONResponse):
            return model
        problem = _check_request(request, model)
        if problem is not None:
            return problem
        job = Job(
            request.class_label,
            request.seed,
            request_steps(request, model),
            request.guidance,
            request.num_images,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
        )
        answer = await self._answer("generate", job)
        if isinstance(answer, tuple) and isinstance(answer[0], Failed):
            return _error(500, answer[0].error, [])
        return answer

    @api.post("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def generate_png(self, request: GenerateRequest) -> Response:
        answer = await self._generate(request)
        if isinstance(answer, JSONResponse):
            return answer
        return Response(content=to_png(answer[0].samples), media_type="image/png")

    @api.post("/generate/json")
    async def generate_json(self, request: GenerateRequest):
        answer = await self._generate(request)
        if isinstance(answer, JSONResponse):
            return answer
        result, attempts = answer
        return {
            "request_id": request.request_id,
            "seeds": [request.seed + i for i in range(request.num_images)],
            "images": [base64.b64encode(png).decode("ascii") for png in result.pngs],
            "timings": result.timings,
            "batch": result.batch,
            "replica_pid": result.replica_pid,
            "attempts": attempts,
        }

    @api.get("/health")
    async def health(self):
        answer = await self._answer("describe")
        if isinstance(answer, JSONResponse):
            return answer
        return {**answer[0], "deploy": asdict(self.deploy)}


def deployment_options(config: ServeConfig, deploy: DeployConfig, env: dict | None = None) -> tuple[dict, dict]:
    """The Ray Serve options (`Deployment.options` keywords) of `TokenCacheServer` and of `TokenCacheIngress`.

    ``env``: environment variables for the model replicas (``runtime_env``); thread counts are always set from
    ``config.threads``.
    """
    if deploy.replica_gpus and config.runtime != "torch":
        raise ValueError(
            f"replica_gpus = {deploy.replica_gpus:g}: the ort runtime runs on CPU; GPUs serve runtime torch."
        )
    if deploy.replica_gpus and config.device == "cpu":
        raise ValueError(
            f"replica_gpus = {deploy.replica_gpus:g} with device 'cpu': the model would not use them; set "
            "ServeConfig(device='cuda') (the CLI's --replica-gpus sets both)."
        )
    if config.device != "cpu" and not deploy.replica_gpus:
        raise ValueError(
            f"device {config.device!r} with replica_gpus = 0: Ray shows a replica only the GPUs it reserves; "
            "set replica_gpus (--replica-gpus)."
        )
    env_vars = {"OMP_NUM_THREADS": str(config.threads), "MKL_NUM_THREADS": str(config.threads), **(env or {})}
    actor = {"num_cpus": deploy.replica_cpus or config.threads, "runtime_env": {"env_vars": env_vars}}
    if deploy.replica_gpus:
        actor["num_gpus"] = deploy.replica_gpus
    server = {
        "ray_actor_options": actor,
        "max_ongoing_requests": deploy.max_ongoing_requests,
        "max_queued_requests": deploy.max_queued_requests,  # the ingress answers 503 + Retry-After past it
    }
    if deploy.autoscaling:
        server["num_replicas"] = "auto"
        server["autoscaling_config"] = {
            "min_replicas": deploy.min_replicas or 1,
            "initial_replicas": deploy.min_replicas or 1,
            "max_replicas": deploy.max_replicas,
            "target_ongoing_requests": deploy.target_ongoing_requests or 4.0,
        }
    else:
        server["num_replicas"] = deploy.replicas or 1
    # the ingress only awaits: it takes every request the replicas and their queue hold and more (health checks, bad
    # requests, requests being refused), so that requests wait in the replicas' queue, which answers 503 when full
    held = deploy.most_replicas * deploy.max_ongoing_requests + max(deploy.max_queued_requests, 0) + 256
    ingress = {"max_ongoing_requests": held if deploy.max_queued_requests >= 0 else 100_000}
    return server, ingress


def build_app(config: ServeConfig, deploy: DeployConfig | None = None, env: dict | None = None):
    """The Ray Serve application: `TokenCacheIngress` in front of `TokenCacheServer` replicas serving ``config``."""
    deploy = deploy or DeployConfig()
    server, ingress = deployment_options(config, deploy, env)
    return TokenCacheIngress.options(**ingress).bind(TokenCacheServer.options(**server).bind(config), deploy)


def start(
    config: ServeConfig,
    deploy: DeployConfig | None = None,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
) -> str:
    """Deploy the app and return its URL; without ``address``, on a new local Ray instance on this machine.

    ``address`` (``ray://head:10001`` or ``auto``) connects to a running cluster instead; every node must have
    tcpass with the serve extra installed (and the model directory at the same path). A local instance gets
    this process's ``tcpass`` on the replicas' ``PYTHONPATH``. Refuses, instead of waiting forever, when the
    local instance has fewer CPUs (or GPUs) than the most replicas ``deploy`` may run need.
    """
    import ray

    deploy = deploy or DeployConfig()
    deployment_options(config, deploy)  # a bad combination fails before Ray starts
    env = None
    if address is None:
        # "local": a new instance; address None would join the cluster RAY_ADDRESS or /tmp/ray/ray_current_cluster
        # names, and hung here on the stale record a stopped `ray start --head` had left
        ray.init(address="local", include_dashboard=False, configure_logging=False)
        resources = ray.cluster_resources()
        for resource, each, option in (
            ("CPU", deploy.replica_cpus or config.threads, "--replica-cpus"),
            ("GPU", deploy.replica_gpus, "--replica-gpus"),
        ):
            if deploy.most_replicas * each > resources.get(resource, 0):
                ray.shutdown()
                raise ValueError(
                    f"{deploy.most_replicas} replicas x {each:g} {resource}s each > the "
                    f"{resources.get(resource, 0):g} {resource}s of this machine's Ray instance: lower --replicas "
                    f"(--max-replicas) or {option} (a fraction is allowed), or use a cluster (--address)."
                )
        env = local_replica_env()
    else:
        ray.init(address=address)
    # Ray's own HTTP timeout (408) only backs up the ingress's deadline (504), which comes first
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": deploy.request_timeout_s + 30})
    serve.run(build_app(config, deploy, env), name=APP_NAME, route_prefix="/")
    return f"http://{host}:{port}"


def local_replica_env() -> dict[str, str]:
    """Environment for replicas on this machine: this process's ``tcpass`` first on ``PYTHONPATH``."""
    import tcpass

    package_root = str(Path(tcpass.__file__).resolve().parents[1])
    return {"PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
