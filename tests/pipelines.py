"""Tiny DiT, PixArt-alpha/Sigma, SD3 and Flux pipelines: random weights, text encoders from transformers
configs, a word-level tokenizer; saved to a local directory and reloaded with ``from_pretrained``."""

from __future__ import annotations

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from tests.conftest import make_dit
from tests.families import make_flux, make_ltx, make_pixart, make_sd3, make_wan

WORDS = ["<pad>", "<unk>", "</s>", "a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree"]


def tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", model_max_length=max_length
    )


def t5(d_model: int) -> T5EncoderModel:
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(WORDS), d_model=d_model, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return T5EncoderModel(cfg).eval()


def clip(hidden: int, projection: int | None = None):
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection or hidden,
        pad_token_id=0,
        eos_token_id=2,
    )
    return (CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)).eval()


def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
        shift_factor=0.0,
    ).eval()


def build(family: str):
    """A tiny pipeline of ``family`` ("dit", "pixart_alpha", "pixart_sigma", "sd3", "flux", "wan", "wan22", "ltx")."""
    if family == "dit":
        torch.manual_seed(0)
        dit_vae = AutoencoderKL(
            block_out_channels=(32,),
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            latent_channels=4,
            norm_num_groups=32,
            sample_size=16,
        ).eval()
        return diffusers.DiTPipeline(
            transformer=make_dit(), vae=dit_vae, scheduler=DDIMScheduler(), id2label={0: "zero", 1: "one"}
        )
    if family in ("pixart_alpha", "pixart_sigma"):
        cls = diffusers.PixArtAlphaPipeline if family == "pixart_alpha" else diffusers.PixArtSigmaPipeline
        return cls(
            tokenizer=tokenizer(12),
            text_encoder=t5(24),
            vae=vae(),
            transformer=make_pixart(),
            scheduler=DDIMScheduler(),
        )
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=make_sd3(),
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae(),
            text_encoder=clip(8, 10),
            tokenizer=tokenizer(16),
            text_encoder_2=clip(8, 10),
            tokenizer_2=tokenizer(16),
            text_encoder_3=None,
            tokenizer_3=None,
        )
    if family == "flux":
        return diffusers.FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=vae(),
            text_encoder=clip(20),
            tokenizer=tokenizer(16),
            text_encoder_2=t5(24),
            tokenizer_2=tokenizer(8),
            transformer=make_flux(),
        )
    if family in ("wan", "wan22"):
        return _wan_pipeline(two_experts=family == "wan22")
    if family == "ltx":
        return _ltx_pipeline()
    raise ValueError(family)


def _ltx_pipeline() -> diffusers.LTXPipeline:
    """diffusers' tiny LTX-Video pipeline (its VAE config: 8 latent channels, 4x space, 4x time), our T5."""
    torch.manual_seed(0)
    ltx_vae = diffusers.AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    ).eval()
    ltx_vae.use_framewise_encoding = False
    ltx_vae.use_framewise_decoding = False
    return diffusers.LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=ltx_vae,
        text_encoder=t5(24),
        tokenizer=tokenizer(12),
        transformer=make_ltx(0, channels=8),
    )


def _wan_pipeline(two_experts: bool) -> diffusers.WanPipeline:
    """diffusers' tiny Wan pipeline (its VAE config), our T5 and tokenizer; Wan 2.2: two experts switched
    at t = 900 (``boundary_ratio``)."""
    torch.manual_seed(0)
    wan_vae = diffusers.AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    return diffusers.WanPipeline(
        tokenizer=tokenizer(12),
        text_encoder=t5(24),
        vae=wan_vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        transformer=make_wan(0, channels=16),
        transformer_2=make_wan(1, channels=16) if two_experts else None,
        boundary_ratio=0.9 if two_experts else None,  # shift 7 keeps most steps above t = 500
    )


CALL = {  # per family: keyword arguments of a small generation
    "pixart_alpha": {"use_resolution_binning": False, "max_sequence_length": 12, "guidance_scale": 4.0},
    "pixart_sigma": {"use_resolution_binning": False, "max_sequence_length": 12, "guidance_scale": 4.0},
    "sd3": {"max_sequence_length": 8, "guidance_scale": 4.0},
    "flux": {"max_sequence_length": 8, "guidance_scale": 3.5},
    "wan": {"max_sequence_length": 12, "guidance_scale": 5.0, "num_frames": 5, "height": 32, "width": 32},
    "ltx": {"max_sequence_length": 12, "guidance_scale": 3.0, "num_frames": 9, "height": 32, "width": 32},
}
