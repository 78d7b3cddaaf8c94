"""Bad inputs of a benchmark run, as a table: each row builds one bad situation and says what must happen.

Each case either raises an error whose message names the problem (file, line, flag, image id) and the fix, or
has a documented behaviour checked by its ``expect`` function. No case may end in a bare traceback from deep
inside, or in a silent wrong score.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

from spark_jax.config import SparkConfig
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.models.taps import UnknownTapError
from spark_jax.data.base import BadSampleError, Dataset, Sample
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.backbones.handcrafted import HandcraftedBackbone, HandcraftedConfig
from spark_jax.runner import (
    BadDataError,
    CorruptRunError,
    NonFiniteFeaturesError,
    OutputPathError,
    RunConfig,
    load_results,
    run,
)

SPARK = SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)


class Demo(Dataset):
    name = "demo"
    label_space = DEMO_LABEL_SPACE

    def __init__(self, n: int = 2, first: int = 0):
        self.n, self.first = n, first

    @property
    def ids(self):
        return [f"demo_{i:04d}" for i in range(self.first, self.first + self.n)]

    def __getitem__(self, index):
        return demo_image(self.first + index, 48, 64)


class NaNBackbone:
    """The handcrafted backbone with a NaN in one token of image 1 (as NaN weights or float16 overflow give)."""

    resolution = 64

    def __init__(self):
        self.inner = HandcraftedBackbone(HandcraftedConfig(resolution=64))

    def extract_features(self, images):
        feats = np.array(self.inner.extract_features(images))
        feats[min(1, len(feats) - 1), 2, 3, 0] = np.nan
        return feats


def cfg(out, **kw) -> RunConfig:
    base = dict(dataset="demo", backbone="handcrafted", resolution=64, mask_size=32, batch_size=2,
                output_dir=str(out), num_overlays=0, method_config=SparkMethodConfig(spark=SPARK))
    return RunConfig(**{**base, **kw})


def first_run(tmp_path, **kw):
    return run(cfg(tmp_path / "out", **kw), dataset=Demo(), quiet=True)


def resume(tmp_path, dataset=None, **kw):
    return run(cfg(tmp_path / "out", **kw), dataset=dataset or Demo(), quiet=True)


# ----------------------------------------------------------------------------------------------- the cases
def results_line_not_utf8(tmp_path):
    first_run(tmp_path)
    path = tmp_path / "out" / "results.jsonl"
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(b"\n".join([lines[0][:10] + b"\xff\xfe" + lines[0][10:], *lines[1:]]))
    resume(tmp_path)


def results_line_schema_broken(tmp_path):
    first_run(tmp_path)
    path = tmp_path / "out" / "results.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    del recs[0]["tp"]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    resume(tmp_path)


def results_line_wrong_type(tmp_path):
    first_run(tmp_path)
    path = tmp_path / "out" / "results.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    recs[0]["pixels"] = "many"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    resume(tmp_path)


def run_config_corrupt(tmp_path):
    first_run(tmp_path)
    (tmp_path / "out" / "run_config.json").write_text('{"run": {"dataset": "demo", ')
    resume(tmp_path)


def run_config_not_a_config(tmp_path):
    first_run(tmp_path)
    (tmp_path / "out" / "run_config.json").write_text("[1, 2, 3]")
    resume(tmp_path)


def resume_with_another_data_dir(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first_run(tmp_path, data_dir=str(tmp_path / "a"))
    resume(tmp_path, data_dir=str(tmp_path / "b"))


def resume_with_another_image_list(tmp_path):
    first_run(tmp_path)
    resume(tmp_path, dataset=Demo(2, first=5))


def expect_same_data_dir_resumes(tmp_path):
    (tmp_path / "a").mkdir()
    first_run(tmp_path, data_dir=str(tmp_path / "a"))
    os.chdir(tmp_path)  # the same folder spelt another way is the same run
    m = resume(tmp_path, data_dir="./a")
    assert m["num_images_scored"] == 2


def feature_cache_entry_truncated(tmp_path):
    cache = tmp_path / "cache"
    first = first_run(tmp_path, feature_cache=str(cache))
    entries = sorted(cache.rglob("*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:50])
    with pytest.warns(RuntimeWarning, match=r"feature cache entry .*\.npz is unreadable.*recomputing"):
        again = run(cfg(tmp_path / "again", feature_cache=str(cache)), dataset=Demo(), quiet=True)
    assert again["miou"] == first["miou"]
    with np.load(entries[0]) as z:  # rewritten whole
        [z[k] for k in z.files]


def feature_cache_entry_wrong_shape(tmp_path):
    cache = tmp_path / "cache"
    first_run(tmp_path, feature_cache=str(cache))
    entry = sorted(cache.rglob("*.npz"))[1]
    with np.load(entry) as z:
        shapes = {k: z[k].shape for k in z.files}
    np.savez(entry, **{k: np.zeros((3,), np.int64) for k in shapes})
    with pytest.warns(RuntimeWarning, match="not the float tap of its batch"):
        m = run(cfg(tmp_path / "again", feature_cache=str(cache)), dataset=Demo(), quiet=True)
    with np.load(entry) as z:
        assert m["num_images_scored"] == 2 and {k: z[k].shape for k in z.files} == shapes


def output_dir_is_a_file(tmp_path):
    (tmp_path / "out").write_text("not a folder")
    first_run(tmp_path)


def output_subfolder_is_a_file(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "predictions").write_text("not a folder")
    first_run(tmp_path)


def failing_fsync(code: int) -> Callable[[Any], None]:
    def case(tmp_path, monkeypatch):
        def fsync(fd):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "fsync", fsync)
        try:
            first_run(tmp_path)
        finally:
            leftovers = [p for p in (tmp_path / "out").rglob("*") if ".tmp-" in p.name]
            assert leftovers == [], f"temporary files left behind: {leftovers}"

    return case


def nonfinite_features(tmp_path):
    run(cfg(tmp_path / "out"), dataset=Demo(), backbone=NaNBackbone(), quiet=True)


def expect_nonfinite_features_allowed_and_counted(tmp_path):
    m = run(cfg(tmp_path / "out", allow_nonfinite_features=True), dataset=Demo(), backbone=NaNBackbone(),
            quiet=True)
    assert m["num_images_scored"] == 2 and np.isfinite(m["miou"])
    assert m["nonfinite_features"] == {"allowed": True, "num_images": 1, "num_tokens": 1}
    recs = load_results(str(tmp_path / "out" / "results.jsonl"))
    assert [r["nonfinite_feature_tokens"] for r in recs] == [0, 1]


class FeaturesOnlyExtractor:
    """A user's feature extractor without taps (only extract_features)."""

    resolution = 64

    def __init__(self):
        self.inner = HandcraftedBackbone(HandcraftedConfig(resolution=64))

    def extract_features(self, images):
        return self.inner.extract_features(images)


def tap_the_backbone_lacks(tmp_path):
    method_config = SparkMethodConfig(spark=SPARK.replace(global_source="attention"))
    run(cfg(tmp_path / "out", method_config=method_config), dataset=Demo(), backbone=FeaturesOnlyExtractor(),
        quiet=True)


class AllVoid(Demo):
    """Image 0's label is void everywhere (a label map with nothing to score)."""

    def __getitem__(self, index):
        s = super().__getitem__(index)
        if index == 0:
            return Sample(s.image, np.full_like(s.label, DEMO_LABEL_SPACE.ignore_index), s.image_id)
        return s


def expect_no_valid_pixel_reported_not_scored(tmp_path):
    m = run(cfg(tmp_path / "out"), dataset=AllVoid(), quiet=True)
    assert m["num_images_scored"] == 1 and m["num_images"] == 2
    assert m["unscored"] == [{"id": "demo_0000", "reason": "no valid pixel in the label map"}]


class TwoBadFiles(Demo):
    """Images 1 and 3 of 5 cannot be decoded (as a truncated JPEG or an empty PNG would be)."""

    def __init__(self, broken=(1, 3)):
        super().__init__(5)
        self.broken = broken

    def __getitem__(self, index):
        if index in self.broken:
            raise BadSampleError(self.ids[index], f"/data/img{index}.jpg", "the file is truncated",
                                 "re-extract it")
        return super().__getitem__(index)


def bad_samples_fail(tmp_path):
    run(cfg(tmp_path / "out"), dataset=TwoBadFiles(), quiet=True)


def expect_bad_samples_skipped_and_listed(tmp_path):
    m = run(cfg(tmp_path / "out", on_bad_sample="skip"), dataset=TwoBadFiles(), quiet=True)
    assert m["num_images_scored"] == 3
    assert [s["id"] for s in m["skipped"]] == ["demo_0001", "demo_0003"]
    assert m["skipped"][0] == {"id": "demo_0001", "path": "/data/img1.jpg", "reason": "the file is truncated"}
    # fixed files are picked up by a resume; nothing is scored twice
    m = run(cfg(tmp_path / "out", on_bad_sample="skip"), dataset=TwoBadFiles(broken=()), quiet=True)
    assert m["num_images_scored"] == 5 and m["skipped"] == []


class BreaksAfterCheck(TwoBadFiles):
    """Reads during the pre-run check, fails when the run reads it (a file replaced in between)."""

    def verify(self, indices=None, progress=False):
        return []


def bad_sample_at_read_time(tmp_path):
    run(cfg(tmp_path / "out"), dataset=BreaksAfterCheck(), quiet=True)


class Case(NamedTuple):
    name: str
    act: Callable[..., Any]
    error: type[Exception] | None = None  # None: ``act`` checks a documented behaviour itself
    message: tuple[str, ...] = ()  # regexes the message must contain


CASES = [
    Case("results.jsonl line not UTF-8", results_line_not_utf8, CorruptRunError,
         (r"results\.jsonl: line 1 is not UTF-8", "delete that line")),
    Case("results.jsonl line without a field", results_line_schema_broken, CorruptRunError,
         (r"results\.jsonl: line 1: field 'tp' missing", "delete that line")),
    Case("results.jsonl field of the wrong type", results_line_wrong_type, CorruptRunError,
         (r"line 1: field 'pixels' missing or not a count",)),
    Case("run_config.json corrupt", run_config_corrupt, CorruptRunError,
         (r"run_config\.json is corrupt", "another --output_dir")),
    Case("run_config.json not a configuration", run_config_not_a_config, CorruptRunError,
         (r"run_config\.json is not a run configuration",)),
    Case("resume with another --data_dir", resume_with_another_data_dir, ValueError,
         ("another configuration", "differs in: data_dir")),
    Case("resume with another image list", resume_with_another_image_list, ValueError,
         ("differs in: image_list",)),
    Case("resume with the same --data_dir spelt differently", expect_same_data_dir_resumes),
    Case("feature cache entry truncated: rebuilt with a warning", feature_cache_entry_truncated),
    Case("feature cache entry of the wrong shape: rebuilt with a warning", feature_cache_entry_wrong_shape),
    Case("--output_dir is a file", output_dir_is_a_file, OutputPathError, ("is a file, not a folder",)),
    Case("a file where an output subfolder goes", output_subfolder_is_a_file, OutputPathError,
         (r"predictions' is a file",)),
    Case("disk full", failing_fsync(errno.ENOSPC), OutputPathError, ("cannot write", "the disk is full")),
    Case("output not writable", failing_fsync(errno.EACCES), OutputPathError, ("permission denied",)),
    Case("read-only file system", failing_fsync(errno.EROFS), OutputPathError, ("read-only",)),
    Case("NaN features", nonfinite_features, NonFiniteFeaturesError,
         (r"demo_0001 \(1 of 64 tokens\)", "NaN or Inf weights", "float16 overflow",
          "--allow_nonfinite_features")),
    Case("NaN features, allowed: scored and counted", expect_nonfinite_features_allowed_and_counted),
    Case("a method needs a tap the backbone lacks", tap_the_backbone_lacks, UnknownTapError,
         (r"tap 'features:probs_mean' is not available from FeaturesOnlyExtractor", "diffusion backbone")),
    Case("label map with no valid pixel: reported, not scored", expect_no_valid_pixel_reported_not_scored),
    Case("unreadable images, --on_bad_sample=fail", bad_samples_fail, BadDataError,
         ("2 of 5 samples cannot be read", r"demo_0001: /data/img1\.jpg: the file is truncated \(re-extract it\)",
          r"demo_0003: /data/img3\.jpg", "--on_bad_sample=skip")),
    Case("unreadable images, --on_bad_sample=skip: skipped and listed", expect_bad_samples_skipped_and_listed),
    Case("an image that breaks after the check", bad_sample_at_read_time, BadDataError,
         (r"demo_0001: /data/img1\.jpg: the file is truncated",)),
    Case("--resolution=0", lambda tmp_path: cfg(tmp_path, resolution=0), ValueError,
         ("--resolution must be an int >= 8",)),
    Case("--on_bad_sample=ignore", lambda tmp_path: cfg(tmp_path, on_bad_sample="ignore"), ValueError,
         ("--on_bad_sample must be one of",)),
    Case("--spark_preset=best", lambda tmp_path: cfg(tmp_path, method_config=SparkMethodConfig(preset="best")),
         ValueError,
         ("--spark_preset must be 'auto' or one of",)),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_run_input(case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = (tmp_path, monkeypatch) if case.act.__code__.co_argcount == 2 else (tmp_path,)
    if case.error is None:
        case.act(*args)
        return
    with pytest.raises(case.error) as info:
        case.act(*args)
    for fragment in case.message:
        assert _search(fragment, str(info.value)), f"{fragment!r} not in: {info.value}"


def _search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None
