"""Builds tests/fixtures/open_clip_tiny/: two tiny random-weight open_clip ViT models and open_clip's own outputs.

Run with the open_clip environment (open_clip_torch 3.3.0, torch, torchvision; no jax, no transformers needed):

    /work/ocvenv/bin/python tests/make_open_clip_fixture.py

Each model folder is written by open_clip's ``save_for_hf`` (the layout of its hub uploads):
``open_clip_model.safetensors`` + ``open_clip_config.json`` (``model_cfg``, ``preprocess_cfg``) + the tokenizer
files. The tokenizer is open_clip's ``SimpleTokenizer`` on a tiny BPE file (the byte alphabet, the merges below,
start/end of text: the same layout as OpenAI's 49408-token vocabulary, 522 tokens); its Hugging Face form
(``vocab.json``, ``merges.txt``, ``tokenizer_config.json``: what ``save_for_hf`` writes beside open_clip's models)
is written from the same BPE, so ``test_clip_open_clip`` checks that a transformers ``CLIPTokenizer`` on those
files gives open_clip's ids.

``outputs.npz`` holds, computed by open_clip: ``pixel_values`` [2, 3, 28, 28] (random) and their
``encode_image`` / per-patch tokens (``ln_post`` of every patch token @ ``visual.proj``); ``token_ids`` [4, 16]
(random, end-of-text the largest id) and their ``encode_text``; ``texts`` with ``SimpleTokenizer``'s ids and their
``encode_text``; two uint8 images whose crop margins are odd, open_clip's inference transform of them and their
``encode_image``.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import open_clip
from open_clip.factory import set_model_preprocess_cfg
from open_clip.model import CLIP
from open_clip.push_to_hf_hub import save_for_hf
from open_clip.tokenizer import SimpleTokenizer, bytes_to_unicode
from open_clip.transform import image_transform

OUT = Path(__file__).parent / "fixtures" / "open_clip_tiny"
CONTEXT = 16
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "p h", "o t", "ph ot", "phot o</w>"]
TEXTS = ["a cat", "a photo of a dog", "", "Photo  of A CAT!", "dog " * 20]
VARIANTS = {
    # OpenAI-style: QuickGELU, OpenAI mean/std.
    "quickgelu": dict(quick_gelu=True, mean=(0.48145466, 0.4578275, 0.40821073),
                      std=(0.26862954, 0.26130258, 0.27577711), seed=0),
    # LAION-style: exact GELU; another mean/std so that the loader must read preprocess_cfg.
    "gelu": dict(quick_gelu=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=1),
}


def model_cfg(vocab_size: int, quick_gelu: bool) -> dict:
    return {
        "embed_dim": 20,
        "quick_gelu": quick_gelu,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 24, "head_width": 8, "patch_size": 7},
        "text_cfg": {"context_length": CONTEXT, "vocab_size": vocab_size, "width": 32, "heads": 4, "layers": 2},
    }


def vocab_tokens() -> list[str]:
    """SimpleTokenizer's vocabulary order: bytes, bytes + '</w>', merges, start and end of text."""
    chars = list(bytes_to_unicode().values())
    return chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES]


class HFTokenizerFiles:
    """``save_pretrained`` of the Hugging Face CLIPTokenizer equivalent of the tiny BPE (no transformers here)."""

    def save_pretrained(self, dest):
        dest = Path(dest)
        tokens = vocab_tokens() + ["<|startoftext|>", "<|endoftext|>"]
        (dest / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
        (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>"}
        (dest / "special_tokens_map.json").write_text(json.dumps(special))
        (dest / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT, "do_lower_case": True,
             "errors": "replace", **special}))


def build(name: str, quick_gelu: bool, mean, std, seed: int, bpe_path: str) -> None:
    tokenizer = SimpleTokenizer(bpe_path=bpe_path, context_length=CONTEXT)
    cfg = model_cfg(tokenizer.vocab_size, quick_gelu)
    torch.manual_seed(seed)
    model = CLIP(**cfg).eval()
    with torch.no_grad():  # move LayerNorms and biases off 1 / 0 so that every parameter matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    set_model_preprocess_cfg(model, {"size": 28, "mode": "RGB", "mean": mean, "std": std,
                                     "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0})
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, HFTokenizerFiles(), cfg, folder, safe_serialization=True)

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    with torch.no_grad():
        px = torch.from_numpy(rng.normal(size=(2, 3, 28, 28)).astype(np.float32))
        out["pixel_values"] = px.numpy()
        out["image_features"] = model.encode_image(px).numpy()
        v = model.visual
        _, tokens = v._pool(v.transformer(v._embeds(px)))
        out["patch_tokens"] = (tokens @ v.proj).numpy()

        ids = rng.integers(0, tokenizer.eot_token_id, (4, CONTEXT))
        ids[:, 0] = tokenizer.sot_token_id
        for row, pos in enumerate((5, 15, 1, 9)):
            ids[row, pos] = tokenizer.eot_token_id
        out["token_ids"] = ids
        out["text_features_ids"] = model.encode_text(torch.from_numpy(ids)).numpy()

        out["texts"] = np.array(TEXTS)
        text_ids = tokenizer(TEXTS)
        out["text_ids"] = text_ids.numpy()
        out["text_features"] = model.encode_text(text_ids).numpy()

        transform = image_transform(28, is_train=False, mean=mean, std=std, resize_mode="shortest",
                                    interpolation="bicubic")
        # Margins of 7 and 3 after the resize: torchvision's round((h - ch) / 2) differs from a floor there.
        for i, (h, w) in enumerate(((40, 50), (31, 28))):
            out[f"image_{i}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pre = torch.stack([transform(Image.fromarray(out[f"image_{i}"])) for i in range(2)])
        out["preprocessed"] = pre.numpy()
        out["image_features_preprocessed"] = model.encode_image(pre).numpy()
    np.savez_compressed(folder / "outputs.npz", **out)
    print(f"{folder}: {sum(f.stat().st_size for f in folder.iterdir()) / 1e3:.0f} kB, open_clip "
          f"{open_clip.__version__}, torch {torch.__version__}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bpe = Path(tmp) / "bpe_tiny.txt.gz"
        with gzip.open(bpe, "wt", encoding="utf-8") as f:
            f.write("#version: tiny\n" + "\n".join(MERGES))  # no final newline: it would read as an empty merge
        for name, kw in VARIANTS.items():
            build(name, bpe_path=str(bpe), **kw)


if __name__ == "__main__":
    main()
