"""Tiny random-weight diffusers pipelines saved in the real layout, for the backbone tests.

Not a test module: builders shared by tests/test_models_parity.py, tests/test_checkpoint.py and
tests/test_backbone.py. Each builder writes into the folder it is given and reuses it if already
built, so session fixtures in several modules share one build per test session.
"""

from __future__ import annotations

from pathlib import Path

import chex
import numpy as np

from unet_forms import FORMS, context_dim, perturb  # noqa: F401  (perturb: re-exported for the tests that import it here)

# The tiny UNets are tests/unet_forms.py's: SDXL form (DownBlock2D then two attention blocks, linear projections,
# text_time, an uneven transformer_layers_per_block like SSD-1B's), SD 1.x form (1x1-conv projections, the
# feature point in down_blocks[-2]) and SD 2.x form (linear projections, upcast_attention, per-block heads).
SDXL_UNET = FORMS["sdxl"]
SD1_UNET = FORMS["sd1"]
SD2_UNET = FORMS["sd2"]
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


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_byte_vocab(), merges=[], pad_token=pad_token, model_max_length=TEXT_LEN)


def _text_encoders(two: bool, seed: int, hidden: int = 16):
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
        return [CLIPTextModel(CLIPTextConfig(hidden_size=hidden, **common)).eval()]
    return [
        CLIPTextModel(CLIPTextConfig(hidden_size=16, **common)).eval(),
        CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=16, projection_dim=24, **common)).eval(),
    ]


def build_tiny_pipeline(folder: Path, kind: str = "sdxl", seed: int = 0) -> Path:
    """Saves a tiny random-weight SDXL-form (``kind="sdxl"``), SD 1.x-form (``"sd1"``) or SD 2.x-form (``"sd2"``)
    pipeline.

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
    if kind not in ("sdxl", "sd1", "sd2"):
        raise ValueError(kind)
    unet = UNet2DConditionModel(**FORMS[kind]).eval()
    vae = AutoencoderKL(**VAE).eval()
    perturb(unet, seed + 1)
    perturb(vae, seed + 2)
    encoders = _text_encoders(kind == "sdxl", seed + 3, hidden=context_dim(FORMS[kind]))
    if kind == "sdxl":
        scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=_tokenizer("<|endoftext|>"),
            tokenizer_2=_tokenizer("!"), unet=unet, scheduler=scheduler,
        )
    else:
        scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=encoders[0], tokenizer=_tokenizer("<|endoftext|>"), unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
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


PARITY_REL_TOL = 1e-4  # the parity bound of every model test: max abs error <= 1e-4 of max |reference|


def assert_parity(ours, ref, rel_tol=PARITY_REL_TOL):
    """Max abs error of ``ours`` against ``ref`` within ``rel_tol`` of max |ref| (same shapes)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    chex.assert_equal_shape([ours, ref])
    scale = float(np.abs(ref).max())
    assert scale > 0
    err = float(np.abs(ours - ref).max())
    assert err <= rel_tol * scale, f"max abs error {err:.3g} > {rel_tol:g} x scale {scale:.3g}"
