"""Tiny random-weight PixArt, SD3, Flux and video (Wan, HunyuanVideo, CogVideoX, LTX-Video) transformers and
their inputs."""

from __future__ import annotations

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

TEXT_TOKENS = 10  # != the 16 image tokens: the image stream must be identifiable by its length


def _randomize(model):
    # diffusers zero-initialises some gates and output projections; give every weight some size
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def make_pixart(seed=0):
    torch.manual_seed(seed)
    return _randomize(
        PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=32,
            sample_size=8,
            patch_size=2,
            caption_channels=24,
            norm_type="ada_norm_single",
            num_embeds_ada_norm=1000,
            norm_num_groups=32,
        )
    )


def make_sd3(seed=0):
    torch.manual_seed(seed)
    return _randomize(
        SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            caption_projection_dim=32,
            pooled_projection_dim=20,
            out_channels=4,
            pos_embed_max_size=16,
        )
    )


def make_flux(seed=0, guidance_embeds=True):
    torch.manual_seed(seed)
    return _randomize(
        FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=24,
            pooled_projection_dim=20,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 6, 6),
        )
    )


def make_wan(seed=0, channels=4):
    """diffusers' own tiny Wan test config (patch (1, 2, 2), 2 heads x 12, 2 layers); ``channels``: latent
    channels (16 with the Wan VAE)."""
    torch.manual_seed(seed)
    return _randomize(
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=channels,
            out_channels=channels,
            text_dim=24,
            freq_dim=256,
            ffn_dim=32,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )
    )


def make_hunyuan(seed=0):
    """diffusers' own tiny HunyuanVideo test config (1 double + 1 single block, 2 heads x 10)."""
    torch.manual_seed(seed)
    return _randomize(
        HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=10,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=1,
            patch_size=1,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=24,
            pooled_projection_dim=20,
            rope_axes_dim=(2, 4, 4),
            image_condition_type=None,
        )
    )


def make_cogvideox(seed=0):
    """diffusers' tiny CogVideoX test config with rotary embeddings (as CogVideoX-5b and 1.5), sized so
    that 2 latent frames of 4 x 8 are the config's sample size."""
    torch.manual_seed(seed)
    return _randomize(
        CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=2,
            text_embed_dim=24,
            num_layers=2,
            sample_width=8,
            sample_height=4,
            sample_frames=5,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=TEXT_TOKENS,
            use_rotary_positional_embeddings=True,
        )
    )


def make_ltx(seed=0, channels=4):
    """diffusers' own tiny LTX-Video test config (1 block of 2 heads x 8), with 2 blocks; ``channels``: latent
    channels (8 with the pipeline test's tiny VAE)."""
    torch.manual_seed(seed)
    return _randomize(
        LTXVideoTransformer3DModel(
            in_channels=channels,
            out_channels=channels,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            num_layers=2,
            qk_norm="rms_norm_across_heads",
            caption_channels=24,
        )
    )


def family_inputs(family: str, batch=2, t=0.9, seed=1) -> dict:
    """Inputs of one denoising step; ``t`` in [0, 1] (scaled per family as its pipeline does)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TEXT_TOKENS, 24, generator=g)
    if family == "pixart":
        mask = torch.ones(batch, TEXT_TOKENS)
        mask[0, 7:] = 0  # padded prompt in row 0
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), int(t * 1000)),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "encoder_attention_mask": mask,
        }
    if family == "wan":  # 2 latent frames of 4 x 8: 16 video tokens of patch (1, 2, 2)
        return {
            "hidden_states": torch.randn(batch, 4, 2, 4, 8, generator=g),
            "timestep": torch.full((batch,), t * 1000),
            "encoder_hidden_states": text,
        }
    if family == "ltx":  # packed [B, F*H*W, C]: 2 latent frames of 2 x 4, 16 video tokens of patch 1
        mask = torch.ones(batch, TEXT_TOKENS)
        mask[0, 7:] = 0  # padded prompt in row 0
        return {
            "hidden_states": torch.randn(batch, 16, 4, generator=g),
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), t * 1000),
            "encoder_attention_mask": mask,
            "num_frames": 2,
            "height": 2,
            "width": 4,
            "rope_interpolation_scale": (8 / 25, 32, 32),
        }
    if family == "cogvideox":  # [B, F, C, H, W]: 2 latent frames of 4 x 8, 16 video tokens of patch 2
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        rotary = get_3d_rotary_pos_embed(16, ((0, 0), (2, 4)), grid_size=(2, 4), temporal_size=2, device="cpu")
        return {
            "hidden_states": torch.randn(batch, 2, 4, 4, 8, generator=g),
            "encoder_hidden_states": text,
            "timestep": torch.full((batch,), int(t * 1000)),
            "image_rotary_emb": rotary,
        }
    pooled = torch.randn(batch, 20, generator=g)
    if family == "hunyuan":  # 2 latent frames of 2 x 4: 16 video tokens of patch 1
        mask = torch.ones(batch, TEXT_TOKENS)
        mask[0, 7:] = 0  # padded prompt in row 0
        return {
            "hidden_states": torch.randn(batch, 4, 2, 2, 4, generator=g),
            "timestep": torch.full((batch,), t * 1000),
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "pooled_projections": pooled,
            "guidance": torch.full((batch,), 3500.0),
        }
    if family == "sd3":
        return {
            "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": text,
            "pooled_projections": pooled,
            "timestep": torch.full((batch,), t * 1000),
        }
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(batch, 16, 16, generator=g),
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "timestep": torch.full((batch,), t),
        "img_ids": ids.reshape(16, 3),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": torch.full((batch,), 3.5),
    }


MAKERS = {
    "pixart": make_pixart,
    "sd3": make_sd3,
    "flux": make_flux,
    "wan": make_wan,
    "hunyuan": make_hunyuan,
    "cogvideox": make_cogvideox,
    "ltx": make_ltx,
}


def blocks_of(model) -> list:
    """All blocks in call order (Flux: double-stream, then single-stream)."""
    if hasattr(model, "blocks"):  # Wan
        return list(model.blocks)
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
