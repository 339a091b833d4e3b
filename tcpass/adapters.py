"""Per-family differences, in one table: where the blocks are, what the model is called with.

The passes never look at model classes; everything family-specific is a row here. To support a new
family, add a `ModelAdapter` to `ADAPTERS` (and a golden test for it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tcpass.plan import ModelFingerprint


@dataclass(frozen=True)
class ModelAdapter:
    """How tcpass drives one model family.

    Attributes:
        class_name: the diffusers class this row serves.
        block_prefixes: ModuleList attribute(s) holding the transformer blocks, in call order
            (Flux: the double-stream blocks, then the single-stream ones).
        input_names: the ``forward`` arguments tcpass passes to the graphs (tensors, or dicts of
            tensors such as PixArt's ``added_cond_kwargs``); any other non-None argument is refused.
        required_inputs: the ones that must not be None.
        timestep_input: which input carries the timestep the TPRR schedule is keyed on.
        example_inputs: builds example inputs ``{name: value}`` from the model's config.
        fingerprint: what a plan records about the model (block count, hidden size).
        image_tokens: N, the image-token count of the residual stream, from the inputs.
        timestep_scale: factor from the ``timestep`` argument to the 0..1000 scale of the schedule
            (Flux pipelines pass ``t / 1000``).
        text_stream: how the family's text tokens are handled, for the docs and error messages.
        calibration_conditioning: ``(model, n, generator) -> (cond, uncond)``, the model's keyword
            arguments (besides ``hidden_states`` and ``timestep``) for ``n`` calibration samples and
            their classifier-free-guidance rows, for `tcpass.calibrate` to generate its own data;
            ``None``: calibration needs conditioning passed in (``collect(..., conditioning=...)``).
        image_output: where a block's output holds the image stream: ``None`` for a block returning one
            tensor (DiT, PixArt), the tuple index for joint blocks returning ``(text, image)`` (SD3, Flux).
        sampler: the sampler the family is trained for (`tcpass.sampling.make_scheduler`): ``"ddim"``
            (epsilon prediction) or ``"flow"`` (flow matching, velocity prediction).
        flow_shift: the flow-matching schedule shift its pipelines use (``sampler="flow"`` only).
        shared_inputs: inputs that are not batched by rows (Flux's ``img_ids``, ``txt_ids``): passed whole
            to every call, never split or concatenated with the guidance rows.
    """

    class_name: str
    block_prefixes: tuple[str, ...]
    input_names: tuple[str, ...]
    required_inputs: tuple[str, ...]
    timestep_input: str
    example_inputs: Callable[[nn.Module, int], dict]
    fingerprint: Callable[[nn.Module], ModelFingerprint]
    image_tokens: Callable[[nn.Module, dict], int]
    timestep_scale: float = 1.0
    text_stream: str = "none"
    calibration_conditioning: Callable[[nn.Module, int, torch.Generator], tuple[dict, dict | None]] | None = None
    image_output: int | None = None
    sampler: str = "ddim"
    flow_shift: float = 1.0
    shared_inputs: tuple[str, ...] = ()

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks, in call order."""
        return [block for prefix in self.block_prefixes for block in getattr(model, prefix)]

    @staticmethod
    def block_input(args: tuple, kwargs: dict) -> torch.Tensor:
        """The image stream a block is called with (its ``hidden_states``), from a forward hook's arguments."""
        return args[0] if args else kwargs["hidden_states"]

    def block_image(self, output) -> torch.Tensor:
        """The image stream of a block's output (the whole output, or its ``image_output`` element)."""
        return output if self.image_output is None else output[self.image_output]

    def with_block_image(self, output, image: torch.Tensor):
        """``output`` with its image stream replaced by ``image`` (the text stream kept)."""
        if self.image_output is None:
            return image
        parts = list(output)
        parts[self.image_output] = image
        return tuple(parts)


def _param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())


def _compute_param(model: nn.Module) -> torch.Tensor:
    """A parameter in the model's compute dtype: ``_keep_in_fp32_modules`` (Wan's time embedder and norms)
    stay float32 under ``torch_dtype=bfloat16``, and may come first."""
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if not any(k in name.split(".") for k in keep):
            return p
    return _param(model)


def _latents(model: nn.Module, batch: int, size: int | None = None) -> torch.Tensor:
    cfg, p = model.config, _param(model)
    size = size or cfg.sample_size
    return torch.randn(batch, cfg.in_channels, size, size, dtype=p.dtype, device=p.device)


def _patch_tokens(model: nn.Module, inputs: dict) -> int:
    h, w = inputs["hidden_states"].shape[-2:]
    p = model.config.patch_size
    return (h // p) * (w // p)


def _fingerprint(layers: Callable[[object], int]) -> Callable[[nn.Module], ModelFingerprint]:
    def fingerprint(model: nn.Module) -> ModelFingerprint:
        cfg = model.config
        return ModelFingerprint(
            model_class=type(model).__name__,
            num_blocks=layers(cfg),
            hidden_size=cfg.num_attention_heads * cfg.attention_head_dim,
        )

    return fingerprint


def _dit_example_inputs(model: nn.Module, batch: int) -> dict:
    p = _param(model)
    return {
        "hidden_states": _latents(model, batch),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=p.device),
        "class_labels": torch.zeros(batch, dtype=torch.long, device=p.device),
    }


def stratified_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` class labels in random order, every class ``n // num_classes`` or one more times.

    Calibration scores candidates on a handful of samples; drawn independently, 18 labels over 9
    classes left the emoji calibration with 6 objects, no activities and one flag, and its 3x plans
    scored 1-2 dB higher there than on 18 stratified samples (`bench/plan_by_class.py`), overstating
    what the class-balanced bench then measured. Stratified, the calibration
    set covers the classes as a user generating all of them would. Which classes get the extra
    samples (``n`` not a multiple of ``num_classes``) is drawn from ``generator`` too.
    """
    if n < 1 or num_classes < 1:
        raise ValueError(f"stratified_labels(n={n}, num_classes={num_classes}): both must be positive.")
    device = generator.device
    extra = torch.randperm(num_classes, generator=generator, device=device)[: n % num_classes]
    labels = torch.cat([torch.arange(num_classes, device=device).repeat(n // num_classes), extra])
    return labels[torch.randperm(n, generator=generator, device=device)]


def _dit_conditioning(model: nn.Module, n: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Class labels stratified over the classes (`stratified_labels`); the unconditional rows get the
    null class (``num_embeds_ada_norm``)."""
    null = int(model.config.num_embeds_ada_norm)
    labels = stratified_labels(n, null, generator)
    return {"class_labels": labels}, {"class_labels": torch.full_like(labels, null)}


PIXART_TEXT_TOKENS = 120  # PixArt-alpha's T5 sequence length (Sigma uses 300)


def _pixart_example_inputs(model: nn.Module, batch: int) -> dict:
    cfg, p = model.config, _param(model)
    additional = cfg.sample_size == 128 if cfg.use_additional_conditions is None else cfg.use_additional_conditions
    resolution = aspect = None
    if additional:  # PixArt-alpha 1024: image size and aspect ratio micro-conditions
        size = float(cfg.sample_size * 8)
        resolution = torch.tensor([[size, size]], dtype=p.dtype, device=p.device).repeat(batch, 1)
        aspect = torch.ones(batch, 1, dtype=p.dtype, device=p.device)
    return {
        "hidden_states": _latents(model, batch),
        "encoder_hidden_states": torch.randn(
            batch, PIXART_TEXT_TOKENS, cfg.caption_channels, dtype=p.dtype, device=p.device
        ),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=p.device),
        "added_cond_kwargs": {"resolution": resolution, "aspect_ratio": aspect},
        "encoder_attention_mask": torch.ones(batch, PIXART_TEXT_TOKENS, dtype=p.dtype, device=p.device),
    }


def _pixart_conditioning(model: nn.Module, n: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Stand-in prompts: random caption embeddings (unit variance, as T5 outputs roughly are); the
    unconditional rows get zeros. Calibrating for real prompts: pass their embeddings to
    `tcpass.calibrate.collect` (``conditioning=``)."""
    cfg, device = model.config, generator.device  # on the generator's device; collect moves them to the model's
    text = torch.randn(n, PIXART_TEXT_TOKENS, cfg.caption_channels, generator=generator, device=device)
    mask = torch.ones(n, PIXART_TEXT_TOKENS, device=device)
    additional = cfg.sample_size == 128 if cfg.use_additional_conditions is None else cfg.use_additional_conditions
    extra = {"resolution": None, "aspect_ratio": None}
    if additional:
        size = float(cfg.sample_size * 8)
        extra = {"resolution": torch.full((n, 2), size, device=device), "aspect_ratio": torch.ones(n, 1, device=device)}
    cond = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "added_cond_kwargs": extra}
    return cond, {**cond, "encoder_hidden_states": torch.zeros_like(text)}


SD3_TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens in StableDiffusion3Pipeline


def _sd3_example_inputs(model: nn.Module, batch: int) -> dict:
    cfg, p = model.config, _param(model)
    return {
        "hidden_states": _latents(model, batch),
        "encoder_hidden_states": torch.randn(
            batch, SD3_TEXT_TOKENS, cfg.joint_attention_dim, dtype=p.dtype, device=p.device
        ),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, dtype=p.dtype, device=p.device),
        "timestep": torch.full((batch,), 500.0, dtype=p.dtype, device=p.device),
    }


def _sd3_conditioning(model: nn.Module, n: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Stand-in prompts: random text embeddings and pooled projections (unit variance); the
    unconditional rows get zeros. Calibrating for real prompts: pass their embeddings to
    `tcpass.calibrate.collect` (``conditioning=``)."""
    cfg, device = model.config, generator.device
    text = torch.randn(n, SD3_TEXT_TOKENS, cfg.joint_attention_dim, generator=generator, device=device)
    pooled = torch.randn(n, cfg.pooled_projection_dim, generator=generator, device=device)
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled}
    return cond, {"encoder_hidden_states": torch.zeros_like(text), "pooled_projections": torch.zeros_like(pooled)}


FLUX_TEXT_TOKENS = 512  # FluxPipeline's T5 max_sequence_length
FLUX_IMAGE_TOKENS = 1024  # a 512x512 image: 64x64 latents packed 2x2


FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, embedded (Flux-dev is guidance-distilled)
FLUX_FLOW_SHIFT = 1.88  # FluxPipeline's dynamic shift exp(mu) at 1024 image tokens (mu = 0.63)
SD3_FLOW_SHIFT = 3.0  # StableDiffusion3Pipeline's scheduler shift


def flux_image_ids(tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Flux's ``img_ids`` [N, 3] for a square grid of ``tokens`` packed latents: (0, row, column),
    as `FluxPipeline._prepare_latent_image_ids` builds them."""
    side = int(round(tokens**0.5))
    if side * side != tokens:
        raise ValueError(f"flux_image_ids({tokens}): expected a square token grid (e.g. 1024 = 32 x 32).")
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(tokens, 3)
    return ids.to(device=device, dtype=dtype)


def _flux_conditioning(model: nn.Module, n: int, generator: torch.Generator) -> tuple[dict, None]:
    """Stand-in prompts: random text embeddings and pooled projections (unit variance); no
    unconditional rows (Flux-dev embeds the guidance scale instead, ``FLUX_GUIDANCE``); the packed
    image grid's ``img_ids`` and zero ``txt_ids``, as FluxPipeline passes them."""
    cfg, device = model.config, generator.device
    cond = {
        "encoder_hidden_states": torch.randn(
            n, FLUX_TEXT_TOKENS, cfg.joint_attention_dim, generator=generator, device=device
        ),
        "pooled_projections": torch.randn(n, cfg.pooled_projection_dim, generator=generator, device=device),
        "img_ids": flux_image_ids(FLUX_IMAGE_TOKENS, device),
        "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=device),
    }
    if cfg.guidance_embeds:
        cond["guidance"] = torch.full((n,), FLUX_GUIDANCE, device=device)
    return cond, None


def _flux_example_inputs(model: nn.Module, batch: int) -> dict:
    cfg, p = model.config, _param(model)
    inputs = {
        "hidden_states": torch.randn(batch, FLUX_IMAGE_TOKENS, cfg.in_channels, dtype=p.dtype, device=p.device),
        "encoder_hidden_states": torch.randn(
            batch, FLUX_TEXT_TOKENS, cfg.joint_attention_dim, dtype=p.dtype, device=p.device
        ),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, dtype=p.dtype, device=p.device),
        "timestep": torch.full((batch,), 0.5, dtype=p.dtype, device=p.device),
        "img_ids": torch.zeros(FLUX_IMAGE_TOKENS, 3, dtype=p.dtype, device=p.device),
        "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, dtype=p.dtype, device=p.device),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), FLUX_GUIDANCE, dtype=p.dtype, device=p.device)
    return inputs


WAN_TEXT_TOKENS = 512  # WanPipeline's umT5 sequence length
WAN_LATENT = (5, 60, 104)  # latent frames x height x width of 17 frames at 480 x 832 (VAE: 4x time, 8x space)
WAN_FLOW_SHIFT = 3.0  # WanPipeline's shift at 480p (5.0 at 720p)


def _wan_example_inputs(model: nn.Module, batch: int) -> dict:
    cfg, p = model.config, _compute_param(model)
    # within the rotary table (``rope_max_seq_len`` patches per axis; small in test configs)
    latent = [min(n, cfg.rope_max_seq_len * k) for n, k in zip(WAN_LATENT, cfg.patch_size, strict=True)]
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, *latent, dtype=p.dtype, device=p.device),
        "timestep": torch.full((batch,), 500.0, dtype=p.dtype, device=p.device),
        "encoder_hidden_states": torch.randn(batch, WAN_TEXT_TOKENS, cfg.text_dim, dtype=p.dtype, device=p.device),
    }


def _wan_conditioning(model: nn.Module, n: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Stand-in prompts: random umT5 embeddings (unit variance); the unconditional rows (WanPipeline's
    negative prompt) get zeros. Calibrating for real prompts: pass their embeddings to
    `tcpass.calibrate.collect` (``conditioning=``)."""
    cfg, device = model.config, generator.device
    text = torch.randn(n, WAN_TEXT_TOKENS, cfg.text_dim, generator=generator, device=device)
    return {"encoder_hidden_states": text}, {"encoder_hidden_states": torch.zeros_like(text)}


HUNYUAN_TEXT_TOKENS = 256  # HunyuanVideoPipeline's Llama prompt length
HUNYUAN_LATENT = (9, 60, 104)  # 33 frames at 480 x 832 (VAE: 4x time, 8x space)
HUNYUAN_FLOW_SHIFT = 7.0  # HunyuanVideoPipeline's scheduler shift


def _hunyuan_example_inputs(model: nn.Module, batch: int) -> dict:
    cfg, p = model.config, _compute_param(model)
    options = {"dtype": p.dtype, "device": p.device}
    inputs = {
        "hidden_states": torch.randn(batch, cfg.in_channels, *HUNYUAN_LATENT, **options),
        "timestep": torch.full((batch,), 500.0, **options),
        "encoder_hidden_states": torch.randn(batch, HUNYUAN_TEXT_TOKENS, cfg.text_embed_dim, **options),
        "encoder_attention_mask": torch.ones(batch, HUNYUAN_TEXT_TOKENS, **options),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, **options),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 6000.0, **options)  # the pipeline passes guidance_scale * 1000
    return inputs


COGVIDEOX_TEXT_TOKENS = 226  # CogVideoXPipeline's T5 prompt length


def _cogvideox_example_inputs(model: nn.Module, batch: int) -> dict:
    """The config's own sample size (49 frames at 480 x 720 for CogVideoX-2b/5b), where the patch embedding
    reads its positional table instead of computing one (which torch.export cannot lift)."""
    cfg, p = model.config, _compute_param(model)
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
    options = {"dtype": p.dtype, "device": p.device}
    return {
        "hidden_states": torch.randn(batch, frames, cfg.in_channels, cfg.sample_height, cfg.sample_width, **options),
        "encoder_hidden_states": torch.randn(batch, COGVIDEOX_TEXT_TOKENS, cfg.text_embed_dim, **options),
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=p.device),
    }


LTX_TEXT_TOKENS = 128  # LTXPipeline's T5 max_sequence_length
LTX_LATENT = (21, 16, 22)  # LTXPipeline's default 161 frames at 512 x 704 (VAE: 8x time, 32x space): 7392 tokens
LTX_FRAME_RATE = 25  # LTXPipeline's default frame_rate (rope_interpolation_scale's time axis)
LTX_FLOW_SHIFT = 5.5  # LTXPipeline's dynamic shift exp(mu) at 7392 video tokens (mu = 1.71)


def _ltx_example_inputs(model: nn.Module, batch: int) -> dict:
    """Packed latents ``[B, F*H*W, C]`` (patch 1) with the grid as Python ints, as LTXPipeline calls it."""
    cfg, p = model.config, _compute_param(model)
    frames, height, width = LTX_LATENT
    options = {"dtype": p.dtype, "device": p.device}
    tokens = (frames // cfg.patch_size_t) * (height // cfg.patch_size) * (width // cfg.patch_size)
    return {
        "hidden_states": torch.randn(batch, tokens, cfg.in_channels, **options),
        "encoder_hidden_states": torch.randn(batch, LTX_TEXT_TOKENS, cfg.caption_channels, **options),
        "timestep": torch.full((batch,), 500.0, **options),
        "encoder_attention_mask": torch.ones(batch, LTX_TEXT_TOKENS, **options),
        "num_frames": frames,
        "height": height,
        "width": width,
        "rope_interpolation_scale": (8 / LTX_FRAME_RATE, 32, 32),
    }


def _video_tokens(frames_first: bool = False) -> Callable[[nn.Module, dict], int]:
    """Frames x height x width patches of a latent video, ``[B, C, F, H, W]`` (``[B, F, C, H, W]`` with
    ``frames_first``: CogVideoX); the patch from the config: a ``(t, h, w)`` tuple (Wan), or
    ``patch_size_t`` (None: 1) and a square ``patch_size`` (HunyuanVideo, CogVideoX)."""

    def tokens(model: nn.Module, inputs: dict) -> int:
        shape = inputs["hidden_states"].shape
        f, h, w = (shape[1], shape[3], shape[4]) if frames_first else shape[-3:]
        cfg = model.config
        if isinstance(cfg.patch_size, (tuple, list)):
            pt, ph, pw = cfg.patch_size
        else:
            pt, ph, pw = getattr(cfg, "patch_size_t", None) or 1, cfg.patch_size, cfg.patch_size
        return (f // pt) * (h // ph) * (w // pw)

    return tokens


ADAPTERS: dict[str, ModelAdapter] = {
    "DiTTransformer2DModel": ModelAdapter(
        class_name="DiTTransformer2DModel",
        block_prefixes=("transformer_blocks",),
        input_names=("hidden_states", "timestep", "class_labels"),
        required_inputs=("hidden_states", "timestep", "class_labels"),
        timestep_input="timestep",
        example_inputs=_dit_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=_patch_tokens,
        calibration_conditioning=_dit_conditioning,
    ),
    "PixArtTransformer2DModel": ModelAdapter(
        class_name="PixArtTransformer2DModel",
        block_prefixes=("transformer_blocks",),
        input_names=(
            "hidden_states",
            "encoder_hidden_states",
            "timestep",
            "added_cond_kwargs",
            "encoder_attention_mask",
        ),
        required_inputs=("hidden_states", "encoder_hidden_states", "timestep"),
        timestep_input="timestep",
        example_inputs=_pixart_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=_patch_tokens,
        text_stream="cross-attention: text keys/values are a constant of the step, never pruned",
        calibration_conditioning=_pixart_conditioning,
    ),
    "SD3Transformer2DModel": ModelAdapter(
        class_name="SD3Transformer2DModel",
        block_prefixes=("transformer_blocks",),
        input_names=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        required_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        timestep_input="timestep",
        example_inputs=_sd3_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=_patch_tokens,
        text_stream="joint attention: the text stream is computed in full at every step",
        calibration_conditioning=_sd3_conditioning,
        image_output=1,
        sampler="flow",
        flow_shift=SD3_FLOW_SHIFT,
    ),
    "FluxTransformer2DModel": ModelAdapter(
        class_name="FluxTransformer2DModel",
        block_prefixes=("transformer_blocks", "single_transformer_blocks"),
        input_names=(
            "hidden_states",
            "encoder_hidden_states",
            "pooled_projections",
            "timestep",
            "img_ids",
            "txt_ids",
            "guidance",
        ),
        required_inputs=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"),
        timestep_input="timestep",
        example_inputs=_flux_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers + cfg.num_single_layers),
        image_tokens=lambda model, inputs: int(inputs["hidden_states"].shape[1]),
        timestep_scale=1000.0,
        text_stream="joint attention: the text stream is computed in full at every step",
        calibration_conditioning=_flux_conditioning,
        image_output=1,
        sampler="flow",
        flow_shift=FLUX_FLOW_SHIFT,
        shared_inputs=("img_ids", "txt_ids"),
    ),
    "WanTransformer3DModel": ModelAdapter(
        class_name="WanTransformer3DModel",
        block_prefixes=("blocks",),
        input_names=("hidden_states", "timestep", "encoder_hidden_states", "encoder_hidden_states_image"),
        required_inputs=("hidden_states", "timestep", "encoder_hidden_states"),
        timestep_input="timestep",
        example_inputs=_wan_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=_video_tokens(),
        text_stream="cross-attention: text (and image-prompt) keys/values are a constant of the step, never pruned",
        calibration_conditioning=_wan_conditioning,
        sampler="flow",
        flow_shift=WAN_FLOW_SHIFT,
    ),
    "HunyuanVideoTransformer3DModel": ModelAdapter(
        class_name="HunyuanVideoTransformer3DModel",
        block_prefixes=("transformer_blocks", "single_transformer_blocks"),
        input_names=(
            "hidden_states",
            "timestep",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "pooled_projections",
            "guidance",
        ),
        required_inputs=(
            "hidden_states",
            "timestep",
            "encoder_hidden_states",
            "encoder_attention_mask",
            "pooled_projections",
        ),
        timestep_input="timestep",
        example_inputs=_hunyuan_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers + cfg.num_single_layers),
        image_tokens=_video_tokens(),
        text_stream="joint attention (video tokens, then text under its padding mask): the text stream is "
        "computed in full at every step; attention='kept_only' is refused (it would drop masked keys)",
        image_output=0,
        sampler="flow",
        flow_shift=HUNYUAN_FLOW_SHIFT,
    ),
    "CogVideoXTransformer3DModel": ModelAdapter(
        class_name="CogVideoXTransformer3DModel",
        block_prefixes=("transformer_blocks",),
        input_names=("hidden_states", "encoder_hidden_states", "timestep", "timestep_cond", "ofs", "image_rotary_emb"),
        required_inputs=("hidden_states", "encoder_hidden_states", "timestep"),
        timestep_input="timestep",
        example_inputs=_cogvideox_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=_video_tokens(frames_first=True),
        text_stream="joint attention (text first): the text stream is computed in full at every step",
        image_output=0,
    ),
    "LTXVideoTransformer3DModel": ModelAdapter(
        class_name="LTXVideoTransformer3DModel",
        block_prefixes=("transformer_blocks",),
        input_names=(
            "hidden_states",
            "encoder_hidden_states",
            "timestep",
            "encoder_attention_mask",
            "num_frames",
            "height",
            "width",
            "rope_interpolation_scale",
            "video_coords",
        ),
        required_inputs=("hidden_states", "encoder_hidden_states", "timestep"),
        timestep_input="timestep",
        example_inputs=_ltx_example_inputs,
        fingerprint=_fingerprint(lambda cfg: cfg.num_layers),
        image_tokens=lambda model, inputs: int(inputs["hidden_states"].shape[1]),
        text_stream="cross-attention: text keys/values are a constant of the step, never pruned; the latent grid "
        "(num_frames, height, width, rope_interpolation_scale: Python numbers) is baked into each trace",
        sampler="flow",
        flow_shift=LTX_FLOW_SHIFT,
    ),
}


def adapter_for(model: object) -> ModelAdapter:
    """The adapter row for ``model``; ``TypeError`` listing the supported families otherwise."""
    name = type(model).__name__
    if name not in ADAPTERS:
        raise TypeError(
            f"tcpass does not support {name}; supported model classes: {sorted(ADAPTERS)}. "
            "To add a family, add a ModelAdapter row to tcpass.adapters.ADAPTERS naming its block "
            "list(s), forward inputs and image-token count, and a golden test for it "
            "(see docs/extending.md, 'Adding a model family')."
        )
    return ADAPTERS[name]


def quiet_load_kwargs() -> dict:
    """``from_pretrained`` keywords for tcpass's model loads.

    Without ``accelerate`` installed, diffusers asks for it at every load unless
    ``low_cpu_mem_usage=False`` is passed explicitly (which is what it then uses anyway).
    """
    from diffusers.utils import is_accelerate_available

    return {"low_cpu_mem_usage": is_accelerate_available()}


def load_transformer(path: str) -> nn.Module:
    """Load a supported diffusers transformer with ``from_pretrained`` (a local directory or a hub id).

    The class comes from the ``_class_name`` in its ``config.json``; a pipeline directory with a
    ``transformer/`` subfolder works too.
    """
    import json
    from pathlib import Path

    import diffusers

    root = Path(path)
    subfolder = "transformer" if (root / "transformer" / "config.json").is_file() else None
    config_file = root / (subfolder or "") / "config.json"
    if config_file.is_file():
        class_name = json.loads(config_file.read_text()).get("_class_name")
    else:  # a hub id: let diffusers resolve it
        from huggingface_hub import hf_hub_download

        class_name = json.loads(Path(hf_hub_download(str(path), "config.json")).read_text()).get("_class_name")
    if class_name not in ADAPTERS:
        raise TypeError(f"{path}: model class {class_name!r} is not supported; supported: {sorted(ADAPTERS)}.")
    return getattr(diffusers, class_name).from_pretrained(path, subfolder=subfolder, **quiet_load_kwargs()).eval()
