"""Tiny random-weight diffusers pipelines saved in the real layout, for the backbone tests.

Not a test module: builders shared by tests/test_models_parity.py, tests/test_checkpoint.py and
tests/test_backbone.py. Each builder writes into the folder it is given and reuses it if already
built, so session fixtures in several modules share one build per test session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Tiny SDXL-form UNet: DownBlock2D then two attention blocks, linear projections, text_time added
# embedding, and an uneven transformer_layers_per_block like SSD-1B's (1 then 3 blocks in the last).
SDXL_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 64),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    transformer_layers_per_block=[1, 2, [1, 3]],
    reverse_transformer_layers_per_block=[[1, 1, 1], [2, 2, 2], [1, 1, 1]],
    attention_head_dim=(1, 2, 4),
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8,
)
# Tiny SD 1.x-form UNet: three attention blocks then DownBlock2D, 1x1-conv projections, no added
# embedding; the feature point is in down_blocks[-2].
SD1_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    block_out_channels=(16, 32, 32, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=16,
    norm_num_groups=8,
)
VAE = dict(
    block_out_channels=(8, 16, 16, 16),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
    scaling_factor=0.13025,
)
TEXT_LEN = 16


def _byte_vocab() -> dict[str, int]:
    """CLIP's byte-level alphabet (each byte, alone and word-final) plus its special tokens."""
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab


def _bytes_to_unicode() -> list[str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def perturb(module, seed: int) -> None:
    """Randomise norm scales/biases and linear biases (default 1/0 would hide a swapped mapping)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], pad_token=pad_token, model_max_length=TEXT_LEN)


def _text_encoders(two: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab = _byte_vocab()
    common = dict(
        vocab_size=len(vocab), intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=TEXT_LEN, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], hidden_act="gelu",
    )
    torch.manual_seed(seed)
    if not two:
        return [CLIPTextModel(CLIPTextConfig(hidden_size=16, **common)).eval()]
    return [
        CLIPTextModel(CLIPTextConfig(hidden_size=16, **common)).eval(),
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=24, **common)).eval(),
    ]


def build_tiny_pipeline(folder: Path, kind: str = "sdxl", seed: int = 0) -> Path:
    """Saves a tiny random-weight SDXL-form (``kind="sdxl"``) or SD 1.x-form (``"sd1"``) pipeline.

    Returns ``folder``; an existing complete build is reused.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SDXL_UNET if kind == "sdxl" else SD1_UNET)).eval()
    vae = AutoencoderKL(**VAE).eval()
    perturb(unet, seed + 1)
    perturb(vae, seed + 2)
    encoders = _text_encoders(kind == "sdxl", seed + 3)
    if kind == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"), unet=unet, scheduler=scheduler,
        )
    elif kind == "sd1":
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=_tokenizer("<|endoftext|>"), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    else:
        raise ValueError(kind)
    pipe.save_pretrained(folder)
    return folder


def hooked_unet_features(unet, sample: np.ndarray, t: int, context: np.ndarray, text_embeds=None, time_ids=None):
    """diffusers reference: run the full UNet and capture the feature-point attn1 output with a hook.

    Args are NCHW/torch layout numpy arrays; returns [B, h, w, C] numpy.
    """
    import torch

    blocks = [b for b in unet.down_blocks if getattr(b, "attentions", None)]
    attn1 = blocks[-1].attentions[-1].transformer_blocks[-1].attn1
    captured = {}
    handle = attn1.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
    kwargs = {}
    if text_embeds is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.from_numpy(text_embeds), "time_ids": torch.from_numpy(time_ids)
        }
    try:
        with torch.no_grad():
            unet(torch.from_numpy(sample), t, encoder_hidden_states=torch.from_numpy(context), **kwargs)
    finally:
        handle.remove()
    out = captured["out"].numpy()
    b, _, h, w = sample.shape
    side = int(round((out.shape[1] * h / w) ** 0.5))
    return out.reshape(b, side, out.shape[1] // side, out.shape[2])
