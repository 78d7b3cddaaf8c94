"""Several processes in one evaluation (spark_jax.distributed): two local processes on CPU (gloo collectives).

Specification: started as two processes (jax.distributed on a free local port), a demo run evaluates each image
once, in one of the two processes' shares; the metrics, rebuilt from both processes' per-image counts, are those of
a one-process run; only process 0 writes metrics.json and both return it. A process that dies mid-run loses
nothing: the rerun of both processes evaluates exactly the images neither logged, and ends with the one-process
metrics.

Each test launches tests/multihost_worker.py twice (about 20 s a session on a 2-core CPU), so they are slow; .ci/run
runs this module by name.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from multihost_worker import tiny_config

from spark_jax.runner import load_results, run

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
COMPARED = ("miou", "pixel_accuracy", "per_class_iou", "num_images_scored", "num_images", "unscored", "skipped",
            "diagnostics_mean", "nonfinite_features", "dataset", "method", "protocol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, exit_after: dict[int, int] | None = None) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, WORKER, f"--process_id={pid}", "--num_processes=2", f"--port={port}",
               f"--output_dir={out}"]
        if exit_after and pid in exit_after:
            cmd.append(f"--exit_after={exit_after[pid]}")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def _wait_all(procs) -> None:
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for k, (p, text) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {k} exited with {p.returncode}:\n{text[-4000:]}"


def _logged(out) -> list[str]:
    """Every image id of every resume log of the folder, duplicates kept."""
    ids = []
    for name in sorted(os.listdir(out)):
        if name.startswith("results") and name.endswith(".jsonl"):
            ids += [r["id"] for r in load_results(os.path.join(out, name))]
    return ids


def _one_process(tmp_path):
    return run(tiny_config(str(tmp_path / "one")), quiet=True)


def _assert_same_metrics(got, want):
    for key in COMPARED:
        assert got[key] == want[key], key


def test_two_processes_give_the_one_process_metrics(tmp_path):
    out = tmp_path / "two"
    _wait_all(_launch(out))
    want = _one_process(tmp_path)
    returned = [json.load(open(out / f"returned.process{k}.json")) for k in (0, 1)]
    written = json.load(open(out / "metrics.json"))
    for r in returned:
        _assert_same_metrics(r["metrics"], want)
    _assert_same_metrics(written, want)
    assert written["timing"]["num_processes"] == 2 and written["timing"]["images_this_session"] == 7
    # Each process evaluated its own contiguous share, and logged it in its own log.
    shares = [r["finished"] for r in returned]
    assert sorted(shares[0] + shares[1]) == sorted(_logged(out)) and len(shares[0]) == 4 and len(shares[1]) == 3
    assert [r["id"] for r in load_results(str(out / "results.process1.jsonl"))] == shares[1]
    # The same per-image counts as the one-process run's.
    one = {r["id"]: r for r in load_results(str(tmp_path / "one" / "results.jsonl"))}
    for name in ("results.jsonl", "results.process1.jsonl"):
        for r in load_results(str(out / name)):
            assert {k: r[k] for k in ("tp", "fp", "fn", "pixels", "diagnostics")} == {
                k: one[r["id"]][k] for k in ("tp", "fp", "fn", "pixels", "diagnostics")}


def test_a_process_that_dies_mid_run_loses_no_image_and_scores_none_twice(tmp_path):
    out = tmp_path / "two"
    procs = _launch(out, exit_after={1: 1})  # process 1 crashes once its first image is logged
    assert procs[1].wait(timeout=600) == 3
    procs[0].kill()  # the other process would wait for it at the end (or be stopped by the coordinator)
    procs[0].wait(timeout=60)
    before = _logged(out)
    assert 1 <= len(before) < 7 and len(before) == len(set(before))

    _wait_all(_launch(out))  # both rerun: the resume
    after = _logged(out)
    assert len(after) == len(set(after)) == 7  # every image once, none twice
    returned = json.load(open(out / "returned.process0.json"))
    assert returned["metrics"]["timing"]["images_this_session"] == 7 - len(before)
    _assert_same_metrics(json.load(open(out / "metrics.json")), _one_process(tmp_path))
