"""Open-vocabulary runs end to end (``experiments.run --protocol=open_vocab``) on tiny random-weight checkpoints.

Specification: with a CLIP checkpoint (a tiny random-weight transformers ``CLIPModel`` and a tiny tokenizer, saved
in the test) and a diffusion checkpoint (a tiny SD 2.x-form pipeline), NERVE and DiffCut with ``--label_with=clip``
run through the command line on the demo benchmark: every image is scored as class ids of the vocabulary on the
dataset-level confusion (no matching), its confusion cells are logged, metrics.json names the benchmark, the
vocabulary and CLIP, and a rerun resumes from the log. Without CLIP weights an open-vocabulary run refuses, naming
the weights it needs and where it looked; an unsupervised method under the protocol without ``--label_with``
refuses too. Plumbing, not accuracy: the weights are random.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_backbone_helpers import _byte_vocab, build_tiny_pipeline

from spark_jax.data.base import Dataset, Sample
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.openvocab.benchmarks import BENCHMARKS
from spark_jax.runner import BackboneNotFoundError, RunConfig, load_results, run

ROOT = Path(__file__).resolve().parents[1]
CONTEXT = 77


def build_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random-weight transformers CLIP (ViT with 8 px patches on 32 px images, 2 layers each tower) with a
    byte-level CLIP tokenizer and its image processor, in the layout of a Hugging Face snapshot."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    vocab = _byte_vocab()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CONTEXT, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=CONTEXT).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.getbasetemp() / "tiny_clip_runner")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.getbasetemp() / "tiny_sd2_runner", "sd2")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SPARK_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "spark_jax_cache_ov"))
    # No Hugging Face cache: the default CLIP is then absent whatever this machine holds.
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "no_hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "experiments.run", "--protocol=open_vocab", "--dataset=demo", "--demo_images=2",
           "--demo_photos=false", "--resolution=64", "--mask_size=32", "--batch_size=2", "--num_overlays=0",
           "--clip_resolution=32", "--templates=photo", "--backbone=ssd1b", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def _check_run(out: Path, method: str, clip_dir: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "open_vocab" and metrics["method"] == method
    assert metrics["num_images_scored"] == 2 and 0.0 <= metrics["miou"] <= 1.0
    ov = metrics["open_vocab"]
    assert ov["benchmark"] == "demo" and ov["num_classes"] == 6 and ov["clip_resolution"] == 32
    assert ov["vocabulary"] == BENCHMARKS["demo"].class_path and ov["templates"] == "photo"
    assert "tiny_clip_runner" in ov["clip_checkpoint"]
    records = load_results(str(out / "results.jsonl"))
    assert len(records) == 2
    for rec in records:  # class ids of the 6-class vocabulary, their confusion logged for resuming
        cells = np.asarray(rec["confusion"])
        assert cells.shape[1] == 3 and cells[:, :2].max() < 6 and cells[:, 2].sum() == rec["pixels"]
        assert rec["num_predicted_segments"] <= 6
    return metrics


def test_nerve_runs_end_to_end_and_resumes(clip_dir, sd_dir, tmp_path):
    out = tmp_path / "nerve"
    args = ["--method=nerve", f"--clip_checkpoint={clip_dir}", f"--checkpoint={sd_dir}", f"--output_dir={out}",
            "--nopamr"]
    proc = _cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "protocol open_vocab" in proc.stdout
    first = _check_run(out, "nerve", clip_dir)
    again = _cli(args, tmp_path)  # everything logged: nothing recomputed, the same scores rebuilt
    assert again.returncode == 0, again.stderr[-3000:]
    second = json.loads((out / "metrics.json").read_text())
    assert second["timing"]["images_this_session"] == 0 and second["miou"] == first["miou"]


def test_diffcut_segments_named_by_clip_end_to_end(clip_dir, sd_dir, tmp_path):
    out = tmp_path / "diffcut"
    proc = _cli(["--method=diffcut", "--label_with=clip", f"--clip_checkpoint={clip_dir}", f"--checkpoint={sd_dir}",
                 f"--output_dir={out}", "--pamr_iters=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _check_run(out, "diffcut", clip_dir)
    assert metrics["open_vocab"]["label_with"] == "clip" and metrics["open_vocab"]["background_threshold"] == 0.0


class DemoWithPhoto(Dataset):
    """Two small demo images and one unlabelled image (drawn, not scored), under the demo benchmark's name."""

    name = "demo"
    label_space = DEMO_LABEL_SPACE

    @property
    def ids(self):
        return ["demo_0000", "demo_0001", "photo"]

    def __getitem__(self, index):
        if index < 2:
            return demo_image(index, 48, 64)
        return Sample(demo_image(7, 40, 40).image, None, "photo")


@pytest.mark.parametrize("method,label_with", [("nerve", "none"), ("diffcut", "clip")])
def test_in_process_on_the_handcrafted_backbone(clip_dir, tmp_path, method, label_with):
    cfg = RunConfig(dataset="demo", protocol="open_vocab", method=method, label_with=label_with,
                    backbone="handcrafted", resolution=64, mask_size=32, batch_size=2, num_overlays=3,
                    clip_checkpoint=str(clip_dir), clip_resolution=40, templates="photo", loader_workers=0,
                    output_dir=str(tmp_path / "out"))
    metrics = run(cfg, dataset=DemoWithPhoto(), quiet=True)
    assert metrics["num_images_scored"] == 2 and metrics["num_images"] == 3
    assert metrics["open_vocab"]["clip_resolution"] == 40 and metrics["open_vocab"]["label_with"] == label_with
    records = {r["id"]: r for r in load_results(str(tmp_path / "out" / "results.jsonl"))}
    assert not records["photo"]["scored"] and "confusion" in records["demo_0000"]
    pred = np.asarray(Image.open(tmp_path / "out" / "predictions" / "demo_0000.png"))
    assert pred.shape == (32, 32) and pred.max() < 6  # class ids of the 6-class vocabulary, not segment ids
    again = run(cfg, dataset=DemoWithPhoto(), quiet=True)  # resumed from the logged confusion cells
    assert again["timing"]["images_this_session"] == 0
    assert again["miou"] == metrics["miou"] and again["per_class_iou"] == metrics["per_class_iou"]


def test_an_open_vocabulary_run_without_clip_weights_refuses_naming_them(tmp_path):
    cfg = RunConfig(dataset="demo", protocol="open_vocab", method="nerve", demo_images=1, demo_photos=False,
                    output_dir=str(tmp_path / "x"))
    with pytest.raises(BackboneNotFoundError) as err:
        run(cfg, quiet=True)
    msg = str(err.value)
    assert "--method=nerve" in msg and "--clip_checkpoint" in msg and "openai/clip-vit-large-patch14" in msg
    assert os.path.join("no_hf_home", "hub", "models--openai--clip-vit-large-patch14") in msg  # where it looked
    assert not (tmp_path / "x" / "results.jsonl").exists()  # refused before the run started

    missing = RunConfig(dataset="demo", protocol="open_vocab", method="diffcut", label_with="clip",
                        clip_checkpoint=str(tmp_path / "nowhere"), output_dir=str(tmp_path / "y"))
    with pytest.raises(BackboneNotFoundError, match="does not exist"):
        run(missing, quiet=True)
    no_background = RunConfig(dataset="demo", protocol="open_vocab", method="nerve", background_threshold=0.1,
                              output_dir=str(tmp_path / "w"))
    with pytest.raises(ValueError, match="no background class"):
        run(no_background, quiet=True)  # the demo's class 0 is not a background: nothing can fall back to it
    short = tmp_path / "three.txt"
    short.write_text("sky\nstripes\ncheckerboard, checker\n")
    with pytest.raises(ValueError, match="has 3 classes"):
        run(RunConfig(dataset="demo", protocol="open_vocab", method="nerve", vocabulary=str(short),
                      output_dir=str(tmp_path / "v")), quiet=True)


def test_the_cli_refuses_an_unsupervised_method_without_label_with(tmp_path):
    proc = _cli(["--method=diffcut", f"--output_dir={tmp_path / 'z'}"], tmp_path)
    assert proc.returncode == 2
    assert "--label_with=clip" in proc.stderr and "nerve" in proc.stderr and "Traceback" not in proc.stderr


def test_settings_that_cannot_work_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="--label_with=clip names segments"):
        RunConfig(method="diffcut", label_with="clip")  # not under the open-vocabulary protocol
    with pytest.raises(ValueError, match="already returns class ids"):
        RunConfig(method="nerve", protocol="open_vocab", label_with="clip")
    with pytest.raises(ValueError, match="--background_threshold"):
        RunConfig(method="nerve", protocol="open_vocab", background_threshold=1.5)
    with pytest.raises(ValueError, match="--templates"):
        RunConfig(method="nerve", protocol="open_vocab", templates="nope")
