"""`tcpass serve` on a local Ray instance this module starts and stops: batching, identity, bad requests, faults.

One service (the shipped digits model and plan, torch, 2 replicas, batches of 4 images) serves most tests, and
small apps beside it (ONNX Runtime; one replica with a queue of 1 and a deadline of 1 s) the rest; the
replica-kill test runs last. Requests use 4 DDIM steps and every HTTP call has a timeout, so a hang fails.
"""

import asyncio
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import ray
import requests
import torch
from diffusers import DiTTransformer2DModel
from PIL import Image
from ray import serve
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.context import _get_global_client
from ray.serve.exceptions import BackPressureError

import tcpass
from tcpass.export.onnx_export import export_onnx
from tcpass.export.ort_runtime import OrtTokenCacheRuntime, generate
from tcpass.noise import seeded_noise
from tcpass.sampling import ddim_sample, guided_sample
from tcpass.serve import (
    APP_NAME,
    DEPLOYMENT_NAME,
    BatchGate,
    DeployConfig,
    Done,
    Job,
    PipelineSampler,
    ReplicaLost,
    ServeConfig,
    TokenCacheServer,
    TorchSampler,
    build_app,
    call_with_retries,
    deployment_options,
    local_replica_env,
    replica_lost,
    run_batch,
    start,
    to_uint8,
)
from tcpass.zoo import reference
from tests.tolerance import OTHER_KERNELS, REGROUPED, assert_close

STEPS = 4
BATCH = 4  # images per model batch
TIMEOUT = 90  # seconds: any HTTP call; far above a 4-step batch, far below CI's patience


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServeConfig(max_batch=BATCH, batch_wait_s=0.3, threads=1, max_steps=50)
    deploy = DeployConfig(replicas=2, replica_cpus=0.5, request_timeout_s=TIMEOUT)
    url = start(config, deploy, port=_free_port())
    yield url
    serve.shutdown()
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def direct():
    """``(seeds, labels, steps, guidance) -> uint8 pixels [n, H, W]``: tcpass without the service, at batch 4.

    The requested rows go last in a batch of 4 (other rows: seeds 900.., class 9), so a served image equal to
    these was computed at another position in its batch than here.
    """
    digits = reference("digits")
    model = tcpass.transform(digits.load_model(None), tcpass.load_plan(digits.default_plan))

    def run(seeds, labels, steps=STEPS, guidance=4.0):
        others = BATCH - len(seeds)
        noise = torch.from_numpy(seeded_noise([900 + i for i in range(others)] + list(seeds), (1, 32, 32)))
        label_rows = torch.tensor([9] * others + list(labels))
        samples = ddim_sample(model, noise, label_rows, digits.null_label, steps, guidance)[others:]
        return np.rint((samples.clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8)[:, 0]

    return run


def _post(url: str, body, path: str = "/generate/json", **kwargs) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    headers = kwargs.pop("headers", {"content-type": "application/json"})
    return requests.post(url + path, data=data, headers=headers, timeout=TIMEOUT, **kwargs)


def _pixels(png_base64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(png_base64))))


def assert_same_pixels(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """8-bit pixels served by a replica (another process) vs the same generation run here: values equal up
    to float rounding can land on either side of a level boundary, so a pixel may differ by one level; a
    wrong image differs by many levels in many pixels."""
    diff = np.abs(got.astype(int) - want.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (
        f"{what}: {(diff > 0).sum()} pixels differ, by up to {diff.max()}"
    )


def _together(url: str, bodies: list[dict]) -> list[dict]:
    """POST ``bodies`` at once (one thread each); their JSON answers, in order."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda body: _post(url, body), bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies), [a.text[:200] for a in answers]
    return [a.json() for a in answers]


def test_seeded_noise_rows_depend_on_their_own_seed_only():
    batch = seeded_noise([7, 8, 9], (1, 4, 4))
    assert np.array_equal(batch[1], seeded_noise([8], (1, 4, 4))[0])
    assert np.array_equal(batch[2], seeded_noise([1, 2, 9], (1, 4, 4))[2])
    assert not np.array_equal(batch[0], batch[1])
    with pytest.raises(ValueError, match=r"seeds\[1\] = -1"):
        seeded_noise([0, -1], (1, 4, 4))


def test_batch_gate_admits_one_batch_while_idle_and_frees_cancelled_places():
    async def scenario() -> list[str]:
        gate, log = BatchGate(capacity=4), []

        async def request(name: str, images: int) -> Job:
            await gate.enter(images)
            log.append(name)
            return Job(class_label=0, seed=0, steps=1, guidance=1.0, num_images=images)

        first = [await request("a", 3), await request("b", 1)]  # idle: a full batch is admitted at once
        waiting = asyncio.create_task(request("c", 2))
        await asyncio.sleep(0.01)
        assert log == ["a", "b"]  # c waits: the batch is full
        gate.started(first)
        await asyncio.sleep(0.01)
        assert log == ["a", "b"]  # c waits: a batch runs
        gate.finished()
        c = await asyncio.wait_for(waiting, 1)
        d = await asyncio.wait_for(request("d", 2), 1)
        late = asyncio.create_task(request("e", 1))
        await asyncio.sleep(0.01)
        assert log == ["a", "b", "c", "d"]  # e waits: c and d fill the batch
        gate.withdraw(c)  # c's request was cancelled before its batch started
        await asyncio.wait_for(late, 1)
        gate.started([d])
        gate.withdraw(d)  # d reached its batch: withdrawing frees nothing
        assert gate._admitted == 1 and gate._busy
        return log

    assert asyncio.run(scenario()) == ["a", "b", "c", "d", "e"]


def test_smaller_traced_batch_sizes_run_small_groups_without_padding_them_to_max_batch():
    threads = torch.get_num_threads()
    sampler = TorchSampler(ServeConfig(max_batch=2, batch_sizes=(1,), threads=1))
    torch.set_num_threads(threads)

    def job(seed: int) -> Job:
        return Job(class_label=3, seed=seed, steps=STEPS, guidance=4.0, num_images=1)

    [alone] = run_batch(sampler, [job(11)])
    first, second = run_batch(sampler, [job(11), job(20)]), run_batch(sampler, [job(21), job(11)])
    assert alone.batch == {"requests": 1, "images": 1, "padding": 0}  # not padded to 2
    assert second[1].batch == {"requests": 2, "images": 2, "padding": 0}
    # the same traced batch size in one process, the row at another position: rows are computed
    # independently (no op mixes or splits the batch), so bit-identical
    assert np.array_equal(first[0].samples, second[1].samples)
    assert_close(alone.samples, first[0].samples, units=OTHER_KERNELS)  # another size: float rounding


def test_the_shipped_emoji_weights_are_served_with_their_guidance_interval():
    emoji = reference("emoji")
    threads = torch.get_num_threads()
    sampler = TorchSampler(ServeConfig(model=str(emoji.model_dir()), uncached=True, max_batch=1, threads=1))
    torch.set_num_threads(threads)
    assert sampler.guidance_interval == emoji.guidance_interval == (100.0, 700.0)
    [result] = run_batch(sampler, [Job(class_label=0, seed=5, steps=10, guidance=4.0, num_images=1)])
    noise = torch.from_numpy(seeded_noise([5], (3, 32, 32)))
    model = emoji.load_model(None)
    labels = torch.tensor([0])
    want = ddim_sample(model, noise, labels, emoji.null_label, 10, 4.0, guidance_interval=(100, 700)).numpy()
    every_step = ddim_sample(model, noise, labels, emoji.null_label, 10, 4.0).numpy()
    assert_close(result.samples, want, units=REGROUPED)
    assert np.abs(result.samples - every_step).max() > 1e-2


@pytest.mark.parametrize("timesteps", [None, (981, 802, 591, 377, 170)])  # default spacing; one no spacing gives
def test_the_torch_runtime_samples_with_the_plan_s_sampler_and_timesteps(tmp_path, timesteps):
    plan = tcpass.CachePlan(blocks=[], sampler="dpmpp", sampler_timesteps=timesteps)
    tcpass.save_plan(plan, tmp_path / "plan.json")
    threads = torch.get_num_threads()
    sampler = TorchSampler(ServeConfig(plan=str(tmp_path / "plan.json"), max_batch=1, threads=1))
    torch.set_num_threads(threads)
    [result] = run_batch(sampler, [Job(class_label=2, seed=7, steps=5, guidance=4.0, num_images=1)])
    assert isinstance(result, Done), result
    digits = reference("digits")
    model = digits.load_model(None)  # eager, untransformed: the plan caches nothing
    noise, labels = torch.from_numpy(seeded_noise([7], (1, 32, 32))), torch.tensor([2])
    cond, uncond = {"class_labels": labels}, {"class_labels": torch.full_like(labels, digits.null_label)}
    want = guided_sample(model, noise, cond, uncond, 5, 4.0, sampler="dpmpp", timesteps=timesteps).numpy()
    assert_close(result.samples, want, units=REGROUPED)
    others = [("ddim", None)] + ([("dpmpp", None)] if timesteps else [])  # each differs from the plan's
    for other, ts in others:
        image = guided_sample(model, noise, cond, uncond, 5, 4.0, sampler=other, timesteps=ts).numpy()
        assert np.abs(result.samples - image).max() > 1e-2, other


def test_image_is_the_same_alone_batched_and_generated_directly(service, direct):
    alone = _post(service, {"class_label": 3, "seed": 11, "steps": STEPS}).json()
    assert alone["batch"] == {"requests": 1, "images": 1, "padding": BATCH - 1}

    bodies = [{"class_label": c, "seed": s, "steps": STEPS} for c, s in ((5, 20), (3, 11), (7, 21), (1, 22))]
    batched = _together(service, bodies)
    assert max(answer["batch"]["requests"] for answer in batched) > 1, "concurrent requests were never batched"
    assert batched[1]["images"] == alone["images"]  # the same PNG bytes

    two = _post(service, {"class_label": 3, "seed": 10, "num_images": 2, "steps": STEPS}).json()
    assert two["seeds"] == [10, 11] and two["images"][1] == alone["images"][0]

    expected = direct([11, 20], [3, 5])
    assert_same_pixels(_pixels(alone["images"][0]), expected[0])
    assert_same_pixels(_pixels(batched[0]["images"][0]), expected[1])
    assert not np.array_equal(expected[0], expected[1])


def test_requests_with_other_steps_or_guidance_are_not_mixed_into_a_batch(service, direct):
    bodies = [
        {"class_label": 3, "seed": 11, "steps": STEPS},
        {"class_label": 3, "seed": 11, "steps": STEPS, "guidance": 1.0},
        {"class_label": 3, "seed": 11, "steps": STEPS + 2},
        {"class_label": 3, "seed": 11, "steps": STEPS},
    ]
    same, unguided, more_steps, again = _together(service, bodies)
    assert same["images"] == again["images"]
    assert_same_pixels(_pixels(same["images"][0]), direct([11], [3])[0])
    assert_same_pixels(_pixels(unguided["images"][0]), direct([11], [3], guidance=1.0)[0])
    assert_same_pixels(_pixels(more_steps["images"][0]), direct([11], [3], steps=STEPS + 2)[0])
    for answer in (unguided, more_steps):
        assert answer["batch"]["images"] == 1  # its own model batch, padded


BAD_REQUESTS = [
    ({"class_label": 10}, 422, "class_label"),  # the digits model has classes 0..9
    ({"class_label": -1}, 422, "class_label"),
    ({"class_label": 1, "steps": 0}, 422, "steps"),
    ({"class_label": 1, "steps": 51}, 422, "steps"),  # above the server's max_steps
    ({"class_label": 1, "num_images": 5}, 422, "num_images"),  # above the batch of 4
    ({"class_label": 1, "num_images": 10**6}, 422, "num_images"),
    ({"class_label": 1, "guidance": 0.5}, 422, "guidance"),
    ({"class_label": 1, "seed": -3}, 422, "seed"),
    ({"class_label": "seven"}, 422, "class_label"),
    ({"seed": 1}, 422, "class_label"),  # missing
    ({"class_label": 1, "prompt": "a seven"}, 422, "prompt"),  # class-conditional model: no prompts
    ('{"class_label": 1, "steps": ', 400, "body"),  # malformed JSON
    ("[1, 2]", 422, "body"),
]


def test_bad_requests_get_a_4xx_naming_the_field_and_do_not_disturb_others(service, direct):
    good: dict = {}
    body = {"class_label": 4, "seed": 3, "steps": 2 * STEPS}
    worker = threading.Thread(target=lambda: good.update(_post(service, body).json()))
    worker.start()
    for body, status, field in BAD_REQUESTS:
        for path in ("/generate", "/generate/json"):
            answer = _post(service, body, path)
            assert answer.status_code == status, (body, answer.text)
            assert field in answer.json()["fields"] and field in answer.json()["error"], (body, answer.text)
    form = _post(service, {"class_label": 1}, headers={"content-type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]
    worker.join(TIMEOUT)
    assert good["seeds"] == [3]
    assert_same_pixels(_pixels(good["images"][0]), direct([3], [4], steps=2 * STEPS)[0])


def test_png_endpoint_returns_the_image_of_the_json_one(service):
    body = {"class_label": 2, "seed": 5, "steps": STEPS, "num_images": 2}
    png = _post(service, body, "/generate")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    strip = np.asarray(Image.open(io.BytesIO(png.content)))
    images = [_pixels(b) for b in _post(service, body).json()["images"]]
    assert strip.shape == (32, 64) and np.array_equal(strip, np.concatenate(images, axis=1))


def test_ort_runtime_serves_the_images_its_runtime_generates(service, tmp_path):
    """The ONNX Runtime path on a tiny pixel-space DiT exported for 2 images (model batch 4)."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=1,
        out_channels=1,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=32,
    ).eval()
    plan = tcpass.load_plan(reference("digits").default_plan)
    example = {
        "hidden_states": torch.zeros(4, 1, 16, 16),
        "timestep": torch.zeros(4, dtype=torch.long),
        "class_labels": torch.zeros(4, dtype=torch.long),
    }
    export_onnx(tcpass.transform(model, plan, example_inputs=example), tmp_path, example)
    config = ServeConfig(model=str(tmp_path), runtime="ort", batch_wait_s=0.3, threads=1)
    serve.run(build_app(config, DeployConfig(replica_cpus=0.5)), name="tcpass-ort", route_prefix="/ort")
    url = service + "/ort"

    health = requests.get(url + "/health", timeout=TIMEOUT).json()
    assert health["runtime"] == "ort" and health["max_batch"] == 2 and health["image_shape"] == [1, 16, 16]
    alone = _post(url, {"class_label": 6, "seed": 8, "steps": STEPS}).json()
    pair = _together(
        url, [{"class_label": 2, "seed": 1, "steps": STEPS}, {"class_label": 6, "seed": 8, "steps": STEPS}]
    )
    assert pair[1]["images"] == alone["images"]
    runtime = OrtTokenCacheRuntime(tmp_path, threads=1)
    samples = generate(runtime, seeded_noise([3, 8], (1, 16, 16)), np.array([0, 6]), num_steps=STEPS)
    assert_same_pixels(_pixels(alone["images"][0]), np.rint((np.clip(samples[1, 0], -1, 1) + 1) * 127.5))
    too_many = _post(url, {"class_label": 1, "num_images": 3})
    assert too_many.status_code == 422 and too_many.json()["fields"] == ["num_images"]
    serve.delete("tcpass-ort")


def test_a_text_to_image_pipeline_is_served_with_prompts(service, tmp_path):
    """A saved tiny PixArt pipeline (default plan): a prompt's image is the one its sampler makes here, whatever
    the requests beside it; a class label is refused naming the field (tests/test_serve_text.py: the rest)."""
    from tests.pipelines import build

    build("pixart_alpha").save_pretrained(tmp_path / "pixart")
    config = ServeConfig(
        model=str(tmp_path / "pixart"), max_batch=2, height=8, width=8, max_sequence_length=12, batch_wait_s=0.3
    )
    serve.run(build_app(config, DeployConfig(replica_cpus=0.5)), name="tcpass-pixart", route_prefix="/pixart")
    url = service + "/pixart"

    health = requests.get(url + "/health", timeout=TIMEOUT).json()
    assert (health["conditioning"], health["pipeline"]) == ("text", "PixArtAlphaPipeline")
    assert health["image_shape"] == [3, 8, 8] and health["num_classes"] is None
    car = {"prompt": "a red car", "negative_prompt": "blue", "seed": 3, "steps": STEPS}
    pair = _together(url, [car, {"prompt": "a photo of a dog", "seed": 1, "steps": STEPS}])
    job = Job(None, 3, STEPS, 4.0, 1, prompt="a red car", negative_prompt="blue")
    [want] = run_batch(PipelineSampler(config), [job])
    got = _pixels(pair[0]["images"][0]).astype(int)
    assert np.abs(got - to_uint8(want.samples[0]).astype(int)).max() <= 1  # float rounding: one level at most
    assert pair[0]["images"] != pair[1]["images"]
    refused = _post(url, {"class_label": 3})
    assert refused.status_code == 422 and refused.json()["fields"] == ["class_label"]
    serve.delete("tcpass-pixart")


class FakeResponse:
    """A `DeploymentResponse` stand-in: awaiting it gives ``outcome`` (or raises it); never, for ``None``."""

    def __init__(self, outcome) -> None:
        self.outcome, self.cancelled = outcome, False

    def __await__(self):
        yield from asyncio.sleep(0 if self.outcome is not None else 3600).__await__()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    """A deployment handle's method whose calls answer ``outcomes`` in turn."""

    def __init__(self, *outcomes) -> None:
        self.outcomes, self.responses = list(outcomes), []

    def remote(self, *args) -> FakeResponse:
        self.responses.append(FakeResponse(self.outcomes.pop(0)))
        return self.responses[-1]


def test_only_errors_that_mean_the_replica_died_count_as_a_lost_replica():
    assert replica_lost(ActorDiedError())
    assert not replica_lost(BackPressureError(num_queued_requests=4, max_queued_requests=4))
    assert not replica_lost(ValueError("bad input"))
    assert not replica_lost(RayTaskError("generate", "Traceback ...", ValueError("bad input")))


def test_a_call_whose_replica_died_is_made_again_and_any_other_error_is_not():
    def call(method: FakeMethod, max_retries: int = 2):
        return asyncio.run(call_with_retries(method, "job", max_retries=max_retries))

    died_once = FakeMethod(ActorDiedError(), "image")
    assert call(died_once) == ("image", 2) and len(died_once.responses) == 2
    for error in (ValueError("bad input"), BackPressureError(num_queued_requests=1, max_queued_requests=1)):
        once = FakeMethod(error, "never")
        with pytest.raises(type(error)):
            call(once)
        assert len(once.responses) == 1
    always = FakeMethod(*[ActorDiedError()] * 3)
    with pytest.raises(ReplicaLost, match=r"died 3 times \(max_retries 2\); last: ActorDiedError"):
        call(always)
    no_retries = FakeMethod(ActorDiedError(), "image")
    with pytest.raises(ReplicaLost, match="died 1 times"):
        call(no_retries, max_retries=0)


def test_a_call_past_its_deadline_is_cancelled_on_the_replica():
    hangs = FakeMethod(None)

    async def scenario() -> None:
        await asyncio.wait_for(call_with_retries(hangs, "job", max_retries=2), 0.05)

    with pytest.raises(asyncio.TimeoutError):
        asyncio.run(scenario())
    assert hangs.responses[0].cancelled


def test_fixed_replicas_autoscaling_and_gpus_reach_ray_s_deployment_options():
    server, ingress = deployment_options(ServeConfig(threads=2), DeployConfig(replicas=3, max_queued_requests=10))
    assert server["num_replicas"] == 3 and "autoscaling_config" not in server
    assert server["ray_actor_options"]["num_cpus"] == 2 and "num_gpus" not in server["ray_actor_options"]
    assert server["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    assert (server["max_ongoing_requests"], server["max_queued_requests"]) == (8, 10)
    assert ingress["max_ongoing_requests"] >= 3 * 8 + 10  # the ingress holds whatever the replicas admit

    deploy = DeployConfig(min_replicas=2, max_replicas=5, target_ongoing_requests=3, replica_cpus=0.5)
    server, ingress = deployment_options(ServeConfig(), deploy)
    assert server["num_replicas"] == "auto" and server["ray_actor_options"]["num_cpus"] == 0.5
    scaling = {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 5, "target_ongoing_requests": 3}
    assert server["autoscaling_config"] == scaling
    assert ingress["max_ongoing_requests"] >= 5 * 8 + 64
    ray_options = TokenCacheServer.options(**server)  # Ray's own validation, without starting Ray
    assert ray_options._deployment_config.autoscaling_config.max_replicas == 5

    server, _ = deployment_options(ServeConfig(device="cuda"), DeployConfig(replica_gpus=0.5))
    assert server["ray_actor_options"]["num_gpus"] == 0.5
    assert TokenCacheServer.options(**server).ray_actor_options["num_gpus"] == 0.5


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas = 3 > max_replicas = 2: expected min_replicas <="),
        ({"replicas": 2, "max_replicas": 3}, "replicas = 2 with max_replicas = 3: give a fixed replica count or"),
        ({"min_replicas": 2}, "min_replicas = 2: autoscaling needs max_replicas too"),
        ({"max_replicas": 0}, "max_replicas = 0: expected an integer >= 1"),
        ({"replicas": 0}, "replicas = 0: expected an integer >= 1"),
        ({"max_replicas": 2, "target_ongoing_requests": 0}, "target_ongoing_requests = 0: expected a number > 0"),
        ({"replica_cpus": -1.0}, "replica_cpus = -1.0: expected a number > 0"),
        ({"replica_gpus": float("nan")}, "replica_gpus = nan: expected a number >= 0"),
        ({"max_ongoing_requests": 0}, "max_ongoing_requests = 0: expected an integer >= 1"),
        ({"max_queued_requests": -2}, r"max_queued_requests = -2: expected an integer >= 0, or -1 \(unbounded\)"),
        ({"request_timeout_s": 0}, "request_timeout_s = 0: expected a number > 0"),
        ({"max_retries": 1.5}, "max_retries = 1.5: expected an integer >= 0"),
        ({"retry_after_s": "soon"}, "retry_after_s = 'soon': expected a number >= 0"),
    ],
)
def test_a_bad_deploy_config_is_refused_naming_the_value(fields, message):
    with pytest.raises(ValueError, match=message):
        DeployConfig(**fields)


@pytest.mark.parametrize(
    ("config", "deploy", "message"),
    [
        (
            ServeConfig(runtime="ort", model="m"),
            DeployConfig(replica_gpus=1),
            "replica_gpus = 1: the ort runtime runs on",
        ),
        (ServeConfig(), DeployConfig(replica_gpus=1), "replica_gpus = 1 with device 'cpu': the model would not use"),
        (ServeConfig(device="cuda"), DeployConfig(), "device 'cuda' with replica_gpus = 0: Ray shows a replica only"),
    ],
)
def test_gpus_and_the_model_s_device_are_refused_unless_they_agree(config, deploy, message):
    with pytest.raises(ValueError, match=message):
        deployment_options(config, deploy)


LIMITS = DeployConfig(
    min_replicas=1,
    max_replicas=1,  # autoscaling, pinned to one replica: the path to Ray, and a queue that fills predictably
    target_ongoing_requests=1,
    replica_cpus=0.5,
    max_ongoing_requests=1,
    max_queued_requests=1,
    retry_after_s=3,
    request_timeout_s=1.0,
)
SLOW = 250  # steps: seconds of generation, far beyond LIMITS.request_timeout_s on any CPU


class TestLimits:
    """One replica holding one request, one more queued, a deadline of 1 s: the third concurrent request is
    refused (503, Retry-After) and a request that cannot finish in time gets 504."""

    @pytest.fixture(scope="class")
    def limited(self, service):
        config = ServeConfig(max_batch=1, threads=1, max_steps=SLOW)
        serve.run(build_app(config, LIMITS, local_replica_env()), name="tcpass-limits", route_prefix="/limits")
        yield service + "/limits"
        serve.delete("tcpass-limits")  # stops the generations the deadline left running

    def test_the_autoscaling_config_and_the_limits_reach_ray(self, limited):
        details = _get_global_client().get_serve_details()
        config = details["applications"]["tcpass-limits"]["deployments"][DEPLOYMENT_NAME]["deployment_config"]
        scaling = config["autoscaling_config"]
        assert (scaling["min_replicas"], scaling["max_replicas"], scaling["target_ongoing_requests"]) == (1, 1, 1)
        assert (config["max_ongoing_requests"], config["max_queued_requests"]) == (1, 1)
        health = requests.get(limited + "/health", timeout=TIMEOUT).json()
        assert health["deploy"]["max_queued_requests"] == 1 and health["max_steps"] == SLOW

    def test_a_full_queue_answers_503_with_retry_after(self, limited):
        bodies = [{"class_label": 1, "seed": s, "steps": SLOW} for s in range(8)]
        with ThreadPoolExecutor(len(bodies)) as pool:
            answers = list(pool.map(lambda body: _post(limited, body), bodies))
        statuses = [a.status_code for a in answers]
        assert set(statuses) <= {503, 504} and 503 in statuses, [a.text[:200] for a in answers]
        refused = answers[statuses.index(503)]
        assert refused.headers["Retry-After"] == "3"
        assert "server busy" in refused.json()["error"] and "max_queued_requests" in refused.json()["error"]

    def test_a_request_past_its_deadline_answers_504(self, limited):
        answer = _post(limited, {"class_label": 2, "seed": 1, "steps": SLOW})
        assert answer.status_code == 504, answer.text
        assert "request_timeout_s = 1 s" in answer.json()["error"]


def _replica_names() -> set[str]:
    actors = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in actors if a["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#")}


def _replica_taking_requests(names: set[str]) -> tuple[str, int]:
    """The first of the replicas ``names`` seen receiving a request, and how many it then holds.

    A replica whose count of held requests (running or waiting for its batch) rose since the last probe, 20 ms
    before, has just taken a request that needs a whole batch (about a second) before it can be answered, so a
    kill right after this returns finds it unanswered. (A replica merely seen holding requests may be answering
    them in the very millisecond of the kill.)
    """
    deadline, last = time.monotonic() + TIMEOUT, {}
    while time.monotonic() < deadline:
        for name in sorted(names):
            # Ray Serve's own queue-length probe (the router's): answered on its own thread, never blocked
            held = ray.get(ray.get_actor(name, namespace="serve").get_num_ongoing_requests.remote(), timeout=TIMEOUT)
            if name in last and held > last[name]:
                return name, held
            last[name] = held
        time.sleep(0.02)
    raise AssertionError(f"no replica of {sorted(names)} took a request for {TIMEOUT} s under load")


def _running_replicas() -> int:
    deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0)


def test_a_replica_killed_under_load_loses_no_request_and_the_service_recovers(service, direct):
    """Requests held by the killed replica (running or waiting for its batch) are sent again to the other one:
    every request gets 200 once, with the image of its seed, byte for byte the one the others of its seed got."""
    clients, per_client = 6, 6
    expected = {seed: direct([seed], [seed + 1])[0] for seed in range(4)}
    outcomes: dict[str, list] = {}
    lock = threading.Lock()
    answered = threading.Semaphore(0)

    def client(c: int) -> None:
        for r in range(per_client):
            request_id, seed = f"c{c}r{r}", (c + r) % 4
            try:
                answer = _post(
                    service, {"class_label": seed + 1, "seed": seed, "steps": STEPS, "request_id": request_id}
                )
                outcome = (answer.status_code, answer.json() if answer.status_code == 200 else answer.text, seed)
            except requests.Timeout:
                outcome = ("timeout", None, seed)
            except requests.RequestException as e:
                outcome = ("connection", repr(e), seed)
            with lock:
                outcomes.setdefault(request_id, []).append(outcome)
            answered.release()

    before = _replica_names()
    assert len(before) == 2
    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(client, c) for c in range(clients)]
        for _ in range(8):  # mid-load: after 8 answers, while the others are queued or running
            assert answered.acquire(timeout=TIMEOUT)
        victim, held = _replica_taking_requests(before)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        for future in futures:
            future.result(timeout=clients * per_client * TIMEOUT)
    seconds = time.perf_counter() - start_time

    assert sorted(outcomes) == sorted(f"c{c}r{r}" for c in range(clients) for r in range(per_client))
    assert all(len(o) == 1 for o in outcomes.values()), "a request was answered twice"
    failed = {rid: o[0] for rid, o in outcomes.items() if o[0][0] != 200}
    retried = [rid for rid, [(status, body, _)] in outcomes.items() if status == 200 and body["attempts"] > 1]
    total = clients * per_client
    errors = sorted({f"{status}: {str(body)[:160]}" for status, body, _ in failed.values()})
    print(f"\n{total} requests from {clients} clients in {seconds:.1f} s; after 8 answers replica {victim} was")
    print(f"killed holding {held} requests:")
    print(f"{total - len(failed)} answered 200 ({len(retried)} of them retried), {len(failed)} failed {errors}")
    assert not failed, f"{len(failed)} of {total} requests failed: {errors}"
    assert retried, f"the killed replica held {held} requests, yet none was retried"
    pngs: dict[int, set[str]] = {}
    for request_id, [(_, body, seed)] in outcomes.items():
        assert body["request_id"] == request_id and body["seeds"] == [seed]
        assert_same_pixels(_pixels(body["images"][0]), expected[seed], what=f"{request_id}: another image")
        pngs.setdefault(seed, set()).add(body["images"][0])
    assert all(len(images) == 1 for images in pngs.values()), "a seed got other PNG bytes on some replica or attempt"

    deadline = time.monotonic() + 120  # Ray Serve replaces the dead replica
    while not (_running_replicas() == 2 and len(_replica_names() - before) == 1):
        assert time.monotonic() < deadline, f"no replacement replica: {serve.status()}"
        time.sleep(1)
    recovered = _together(service, [{"class_label": s + 1, "seed": s, "steps": STEPS} for s in range(4)])
    for seed, answer in enumerate(recovered):
        assert_same_pixels(_pixels(answer["images"][0]), expected[seed])
