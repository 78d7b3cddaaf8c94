"""The input pipeline and the output writer: order whatever the thread timing, bounded work ahead and behind,
errors where the loop would have met them, threads stopped on every exit, and a run whose results do not depend
on the number of threads."""

import errno
import json
import os
import random
import threading
import time

import numpy as np
import pytest
from PIL import Image

from spark_jax.config import SparkConfig
from spark_jax.data.base import BadSampleError, Dataset
from spark_jax.data.demo import DEMO_LABEL_SPACE, demo_image
from spark_jax.methods.spark import SparkMethodConfig
from spark_jax.runner import BadDataError, OutputPathError, RunConfig, load_results, run
from spark_jax.runner.input_pipeline import BatchLoader, OrderedPrefetcher
from spark_jax.runner.outputs import OutputWriter


def pipeline_threads():
    return [t for t in threading.enumerate() if t.name.startswith(("spark-jax-loader", "spark-jax-writer"))]


@pytest.fixture(autouse=True)
def no_leaked_threads():
    assert pipeline_threads() == []
    yield
    assert pipeline_threads() == [], "a loader or writer thread outlived its pipeline"


class Jittery:
    """``fn`` that sleeps a random time first (later items often finish first) and records what ran at once."""

    def __init__(self, seed=0, fail_at=None):
        self.rng, self.lock, self.fail_at = random.Random(seed), threading.Lock(), fail_at
        self.started, self.running, self.max_running = [], 0, 0

    def __call__(self, x):
        with self.lock:
            self.started.append(x)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            delay = self.rng.uniform(0, 0.01)
        time.sleep(delay)
        with self.lock:
            self.running -= 1
        if x == self.fail_at:
            raise RuntimeError(f"item {x} failed")
        return x * x


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_prefetcher_yields_in_item_order_whatever_the_thread_timing(workers):
    fn = Jittery()
    with OrderedPrefetcher(fn, range(40), workers=workers, depth=6) as results:
        assert list(results) == [x * x for x in range(40)]
    assert fn.max_running <= max(1, workers)


def test_prefetcher_works_at_most_depth_items_ahead_of_the_consumer():
    fn = Jittery()
    with OrderedPrefetcher(fn, range(30), workers=3, depth=5) as results:
        for consumed, _ in enumerate(results, start=1):
            time.sleep(0.002)
            assert len(fn.started) <= consumed + 5


def test_a_worker_exception_arrives_after_every_earlier_result_and_the_threads_stop():
    fn = Jittery(fail_at=7)
    got = []
    with pytest.raises(RuntimeError, match="item 7 failed"):
        with OrderedPrefetcher(fn, range(100), workers=4, depth=8) as results:
            for r in results:
                got.append(r)
    assert got == [x * x for x in range(7)]
    assert len(fn.started) <= 7 + 1 + 8  # nothing started past the window; the threads were joined (fixture)


def test_a_keyboard_interrupt_in_the_consumer_stops_the_threads():
    fn = Jittery()
    with pytest.raises(KeyboardInterrupt):
        with OrderedPrefetcher(fn, range(1000), workers=4, depth=8) as results:
            for r in results:
                if r == 9:
                    raise KeyboardInterrupt
    assert len(fn.started) < 30


# ------------------------------------------------------------------------------------------------ BatchLoader
class SlowDemo(Dataset):
    """Demo images that take a random time to read; ``bad`` positions fail as a truncated file would; with
    ``thread_safe=False`` it fails if two threads read it at once."""

    name = "demo"
    label_space = DEMO_LABEL_SPACE

    def __init__(self, n, bad=(), thread_safe=True, unlabelled=(), seed=0):
        self.n, self.bad, self.unlabelled = n, set(bad), set(unlabelled)
        self.verify_threads = 8 if thread_safe else 1
        self.rng, self.lock, self.inside = random.Random(seed), threading.Lock(), 0

    @property
    def ids(self):
        return [f"demo_{i:04d}" for i in range(self.n)]

    def __getitem__(self, index):
        with self.lock:
            self.inside += 1
            overlapping, delay = self.inside > 1, self.rng.uniform(0, 0.01)
        try:
            if overlapping and self.verify_threads == 1:
                raise AssertionError("two threads inside a reader that is not thread-safe")
            time.sleep(delay)
            if index in self.bad:
                raise BadSampleError(self.ids[index], f"/data/img{index}.jpg", "the file is truncated", "re-extract it")
            s = demo_image(index, 40 + 4 * (index % 3), 56)  # a few shapes, as real datasets have
            return s._replace(label=None) if index in self.unlabelled else s
        finally:
            with self.lock:
                self.inside -= 1


def load_all(ds, pending, workers, on_bad_sample="skip", batch_size=3):
    skipped, timing = [], {"load": 0.0}
    with BatchLoader(ds, pending, batch_size=batch_size, resolution=32, mask_size=16, protocol="diffcut",
                     on_bad_sample=on_bad_sample, skipped=skipped, workers=workers, prefetch_batches=2,
                     timing=timing) as loader:
        batches = list(loader)
    return batches, skipped, timing


@pytest.mark.parametrize("thread_safe", [True, False])
def test_batches_are_those_of_the_in_line_reader_whatever_the_thread_count(thread_safe):
    pending = [0, 1, 2, 3, 5, 6, 7, 9, 10, 11]
    ref, ref_skipped, _ = load_all(SlowDemo(12, bad=(3, 9), unlabelled=(6,)), pending, workers=0)
    got, skipped, timing = load_all(SlowDemo(12, bad=(3, 9), unlabelled=(6,), thread_safe=thread_safe), pending,
                                    workers=4)
    assert [b.indices for b in ref] == [[0, 1, 2], [5, 6], [7, 10], [11]]  # groups of pending, less 3 and 9
    assert skipped == ref_skipped == [{"id": "demo_0003", "path": "/data/img3.jpg", "reason": "the file is truncated"},
                                      {"id": "demo_0009", "path": "/data/img9.jpg", "reason": "the file is truncated"}]
    assert timing["load"] > 0
    for a, b in zip(ref, got, strict=True):
        assert a.indices == b.indices and a.num_classes == b.num_classes
        assert [s.image_id for s in a.samples] == [s.image_id for s in b.samples]
        assert b.prepared.shape == (len(b.indices), 32, 32, 3)
        np.testing.assert_array_equal(np.asarray(a.prepared), np.asarray(b.prepared))
        for la, lb in zip(a.labels, b.labels, strict=True):
            assert (la is None) == (lb is None)
            if la is not None:
                np.testing.assert_array_equal(la, lb)
    assert got[1].labels[1] is None and got[1].num_classes[1] == 0


def test_a_batch_of_only_unreadable_samples_is_not_handed_over():
    batches, skipped, _ = load_all(SlowDemo(6, bad=(3, 4, 5)), range(6), workers=2)
    assert [b.indices for b in batches] == [[0, 1, 2]] and len(skipped) == 3


def test_on_bad_sample_fail_stops_at_the_batch_holding_it_after_the_earlier_batches():
    got = []
    with pytest.raises(BadDataError, match=r"1 of 9 samples cannot be read:\n  demo_0004: /data/img4\.jpg"):
        with BatchLoader(SlowDemo(9, bad=(4,)), range(9), batch_size=2, resolution=32, mask_size=16,
                         protocol="standard", on_bad_sample="fail", skipped=[], workers=3,
                         prefetch_batches=2) as loader:
            for b in loader:
                got.append(b.indices)
    assert got == [[0, 1], [2, 3]]


# ----------------------------------------------------------------------------------------------- OutputWriter
def test_writer_commits_in_order_and_only_after_the_files_exist(tmp_path):
    committed, rng = [], random.Random(1)

    def write(k):
        time.sleep(rng.uniform(0, 0.005))
        (tmp_path / f"{k}.txt").write_text(str(k))

    def commit(k):
        assert (tmp_path / f"{k}.txt").exists() and all((tmp_path / f"{j}.txt").exists() for j in committed)
        committed.append(k)

    timing = {"write": 0.0}
    with OutputWriter(workers=2, max_pending=3, timing=timing) as writer:
        for k in range(20):
            writer.submit(lambda k=k: write(k), lambda k=k: commit(k))
            assert len(committed) >= k + 1 - 3  # never more than max_pending images behind
    assert committed == list(range(20)) and timing["write"] > 0


def test_a_failed_write_is_raised_in_the_callers_thread_and_nothing_after_it_is_committed():
    committed = []

    def write(k):
        if k == 4:
            raise OutputPathError(errno.ENOSPC, f"cannot write 'predictions/{k}.png': the disk is full")

    with pytest.raises(OutputPathError, match="disk is full"):
        with OutputWriter(workers=1, max_pending=2) as writer:
            for k in range(10):
                writer.submit(lambda k=k: write(k), lambda k=k: committed.append(k))
    assert committed == [0, 1, 2, 3]


def test_an_exception_in_the_caller_commits_nothing_more():
    committed, written = [], []

    with pytest.raises(KeyboardInterrupt):
        with OutputWriter(workers=1, max_pending=4) as writer:
            for k in range(3):
                writer.submit(lambda k=k: (time.sleep(0.01), written.append(k)), lambda k=k: committed.append(k))
            raise KeyboardInterrupt
    assert committed == [] and written[:1] == [0]  # the write in progress finished, none was committed


def test_close_waits_for_the_write_in_progress():
    done = []

    def write():
        time.sleep(0.05)
        done.append(1)

    with pytest.raises(RuntimeError):
        with OutputWriter(workers=1, max_pending=4) as writer:
            writer.submit(write, lambda: None)
            time.sleep(0.01)  # the write has started
            raise RuntimeError
    assert done == [1]


# ------------------------------------------------------------------------------------------------- the runner
SPARK = SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)


class TinyDemo(SlowDemo):
    def __init__(self, n=5):
        super().__init__(n, unlabelled=(n - 1,))


def tiny_cfg(out, **kw):
    return RunConfig(dataset="demo", backbone="handcrafted", resolution=64, mask_size=32, batch_size=2,
                     output_dir=str(out), num_overlays=1, method_config=SparkMethodConfig(spark=SPARK), **kw)


def outputs_of(out):
    recs = [{k: v for k, v in r.items() if k != "clustering_seconds"} for r in load_results(str(out / "results.jsonl"))]
    pngs = {f"{d}/{n}": np.asarray(Image.open(out / d / n)) for d in ("predictions", "overlays")
            for n in sorted(os.listdir(out / d))}
    return recs, pngs


def test_a_run_is_the_same_with_or_without_threads_and_logs_an_image_only_once_its_files_exist(tmp_path):
    def check_files(out):
        def on_image(image_id):
            assert (out / "predictions" / f"{image_id}.png").exists()
            if image_id in ("demo_0000", "demo_0004"):  # the first (num_overlays=1) and the unlabelled one
                assert (out / "overlays" / f"{image_id}.png").exists()
        return on_image

    inline = run(tiny_cfg(tmp_path / "inline", loader_workers=0), dataset=TinyDemo(),
                 on_image=check_files(tmp_path / "inline"), quiet=True)
    threaded = run(tiny_cfg(tmp_path / "threaded", loader_workers=3, prefetch_batches=1), dataset=TinyDemo(),
                   on_image=check_files(tmp_path / "threaded"), quiet=True)
    assert threaded["miou"] == inline["miou"] and threaded["per_class_iou"] == inline["per_class_iou"]
    recs_a, pngs_a = outputs_of(tmp_path / "inline")
    recs_b, pngs_b = outputs_of(tmp_path / "threaded")
    assert recs_a == recs_b and [r["id"] for r in recs_b] == TinyDemo().ids
    assert pngs_a.keys() == pngs_b.keys() == {"predictions/" + i + ".png" for i in TinyDemo().ids} | {
        "overlays/demo_0000.png", "overlays/demo_0004.png"}
    for k in pngs_a:
        np.testing.assert_array_equal(pngs_a[k], pngs_b[k])
    assert set(threaded["timing"]["stage_seconds"]) == {"load", "backbone", "compile", "method", "score", "write"}


def test_a_run_interrupted_with_threads_resumes_with_another_thread_count(tmp_path):
    seen = []

    def crash_after_two(image_id):
        seen.append(image_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(tmp_path, loader_workers=4), dataset=TinyDemo(), on_image=crash_after_two, quiet=True)
    assert [r["id"] for r in load_results(str(tmp_path / "results.jsonl"))] == seen
    again = []
    m = run(tiny_cfg(tmp_path, loader_workers=0, prefetch_batches=3), dataset=TinyDemo(), on_image=again.append,
            quiet=True)
    assert again == TinyDemo().ids[2:] and m["num_images"] == 5
    assert json.load(open(tmp_path / "run_config.json"))["run"]["loader_workers"] == 0


def test_a_write_that_fails_in_the_writer_thread_stops_the_run_with_its_path(tmp_path, monkeypatch):
    import spark_jax.runner.rundir as rundir

    real = rundir.atomic_write_bytes

    def failing(path, data):
        if "demo_0002" in path:
            raise rundir.output_error(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        real(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", failing)
    with pytest.raises(OutputPathError, match=r"demo_0002\.png.*the disk is full"):
        run(tiny_cfg(tmp_path, loader_workers=2), dataset=TinyDemo(), quiet=True)
    logged = [r["id"] for r in load_results(str(tmp_path / "results.jsonl"))]
    assert "demo_0002" not in logged and logged == TinyDemo().ids[: len(logged)]


@pytest.mark.parametrize("field, value", [("loader_workers", -1), ("prefetch_batches", 0)])
def test_bad_thread_settings_name_the_flag(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"--{field}"):
        tiny_cfg(tmp_path, **{field: value})
