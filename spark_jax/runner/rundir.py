"""The run directory: its folders, atomic writes, the run's identity (``run_config.json``) and the resume log
(``results.jsonl``).

Every file is written atomically (a temporary file, fsynced, then renamed), so a crash leaves the old file or the
new one, never half of one; ``results.jsonl`` is appended one fsynced line per finished image, so a crash leaves
at most a torn last line, which :func:`load_results` drops.

In a run of several processes (:mod:`spark_jax.distributed`) process k > 0 logs into ``results.process<k>.jsonl``
(process 0 into ``results.jsonl``, so a one-process run's folder is unchanged), and every log of the folder counts:
a resume may use another number of processes. Process 0 alone writes ``run_config.json``; the folder must be on a
filesystem every process sees (NFS, a GCS FUSE mount, ...), which :func:`open_run_dir` checks.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import json
import os
import re
from typing import Any, TextIO

import jax
import numpy as np
from PIL import Image

from spark_jax import distributed
from spark_jax.runner.errors import CorruptRunError, OutputPathError, output_error

__all__ = [
    "RESUME_IGNORES",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_png",
    "append_record",
    "check_identity",
    "load_results",
    "load_run_config",
    "load_run_results",
    "log_path",
    "make_output_dirs",
    "open_log",
    "open_run_dir",
    "safe_name",
]

# RunConfig fields a resume may change: they decide how the work is done or reported, not its results.
RESUME_IGNORES = ("output_dir", "batch_size", "limit", "feature_cache", "num_overlays", "loader_workers",
                  "prefetch_batches", "data_dir", "on_bad_sample", "allow_nonfinite_features")
# Top-level entries of run_config.json besides "run" (the RunConfig) that a resume must match.
_IDENTITY_KEYS = ("backbone", "backbone_key", "resolution", "data_dir", "image_list")


def make_output_dirs(out: str) -> None:
    """Creates ``out`` with its ``predictions/`` and ``overlays/`` folders; OutputPathError if it cannot."""
    for folder in (out, os.path.join(out, "predictions"), os.path.join(out, "overlays")):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise OutputPathError(errno.ENOTDIR, f"--output_dir: {folder!r} is a file, not a folder: remove it "
                                                 "or choose another --output_dir")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as err:
            raise output_error(folder, err) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputPathError(errno.EACCES, f"cannot write into {out!r}: permission denied; make it writable or "
                                            "choose another --output_dir")


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except OSError as err:
        with contextlib.suppress(OSError):  # never leave a half-written temporary file behind
            os.remove(tmp)
        raise output_error(path, err) from None


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode())


def atomic_write_png(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def safe_name(image_id: str) -> str:
    """An image id as a file name (ids such as Cityscapes' ``city/frame`` hold slashes)."""
    return image_id.replace("/", "__").replace(os.sep, "__")


def _check_record(rec: Any, where: str) -> None:
    """Raises CorruptRunError unless ``rec`` has the fields a resume reads, with the right types."""
    def fail(problem):
        raise CorruptRunError(f"{where}: {problem}; delete that line (the image is then recomputed) to resume")

    if not isinstance(rec, dict):
        fail(f"expected a JSON object, got {type(rec).__name__}")
    for key, kind in (("id", str), ("index", int), ("scored", bool)):
        if not isinstance(rec.get(key), kind):
            fail(f"field {key!r} missing or not a {kind.__name__} (got {rec.get(key)!r})")
    if rec["scored"]:
        lengths = set()
        for key in ("tp", "fp", "fn"):
            v = rec.get(key)
            if not (isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)):
                fail(f"field {key!r} missing or not a list of counts")
            lengths.add(len(v))
        if len(lengths) != 1:
            fail("fields 'tp', 'fp', 'fn' differ in length")
        if not (isinstance(rec.get("pixels"), int) and rec["pixels"] >= 0):
            fail("field 'pixels' missing or not a count")


def load_results(path: str) -> list[dict[str, Any]]:
    """Reads ``results.jsonl``; a torn last line (interrupted write) is dropped, duplicates keep the first.

    Raises:
        CorruptRunError: a line other than the last is not UTF-8, not JSON or lacks a field a resume needs.
    """
    if not os.path.exists(path):
        return []
    out, seen = [], set()
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for k, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = k >= len(lines) - 2  # only the last record may be torn (a crash mid-write)
        where = f"{path}: line {k + 1}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if last:
                break
            raise CorruptRunError(f"{where} is not UTF-8 text (byte {err.start}); delete that line (the image is "
                                  "then recomputed) to resume") from None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if last:
                break
            raise CorruptRunError(f"{where} is not valid JSON; delete that line (the image is then recomputed) "
                                  "to resume") from None
        _check_record(rec, where)
        if rec["id"] not in seen:
            seen.add(rec["id"])
            out.append(rec)
    return out


def load_run_config(path: str) -> dict[str, Any]:
    """Reads an existing ``run_config.json``; CorruptRunError (with the way out) if it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptRunError(
            f"{path} is corrupt ({err}): the folder's results cannot be matched to a configuration. Choose another "
            "--output_dir, or, if you know its results.jsonl was made with exactly these flags, delete "
            "run_config.json to adopt them."
        ) from None
    if not (isinstance(previous, dict) and isinstance(previous.get("run"), dict)):
        raise CorruptRunError(f"{path} is not a run configuration (no 'run' object): choose another --output_dir "
                              "or delete run_config.json to adopt the folder's results")
    return previous


def check_identity(previous: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Raises ValueError naming what differs unless ``current`` continues the run ``previous`` recorded (fields
    of :data:`RESUME_IGNORES` may change)."""
    def strip(c):
        return {**c, "run": {k: v for k, v in c["run"].items() if k not in RESUME_IGNORES}}

    old, new = strip(previous), strip(current)
    if old == new:
        return
    changed = sorted(k for k in set(old["run"]) | set(new["run"]) if old["run"].get(k) != new["run"].get(k))
    changed += [k for k in _IDENTITY_KEYS if previous.get(k) != current.get(k)]
    raise ValueError(
        f"{os.path.dirname(path) or '.'} holds a run with another configuration (differs in: {', '.join(changed)}; "
        f"see {path}); resume it with the same flags and data, or choose another --output_dir."
    )


def log_path(out: str, process: int = 0) -> str:
    """The resume log of ``process`` in the run folder ``out`` (``results.jsonl`` for process 0)."""
    return os.path.join(out, "results.jsonl" if process == 0 else f"results.process{process}.jsonl")


def _log_paths(out: str) -> list[str]:
    """Every resume log of the run folder ``out``, process 0's first, then by process number."""
    others = [p for p in glob.glob(os.path.join(glob.escape(out), "results.process*.jsonl"))
              if re.fullmatch(r"results\.process[1-9]\d*\.jsonl", os.path.basename(p))]
    others.sort(key=lambda p: int(os.path.basename(p)[len("results.process"):-len(".jsonl")]))
    return [log_path(out), *others]


def load_run_results(out: str) -> list[dict[str, Any]]:
    """The records of every resume log of the run folder ``out`` (:func:`load_results` of each; an image in two
    keeps the first)."""
    records, seen = [], set()
    for path in _log_paths(out):
        for rec in load_results(path):
            if rec["id"] not in seen:
                seen.add(rec["id"])
                records.append(rec)
    return records


def _view(config_path: str, records: list[dict[str, Any]]) -> str:
    """What a process sees of the run folder: its run_config.json and the images logged (a digest)."""
    h = hashlib.sha256()
    with open(config_path, "rb") as f:
        h.update(f.read())
    h.update("\n".join(sorted(r["id"] for r in records)).encode())
    return h.hexdigest()


def open_run_dir(out: str, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """Opens the run directory ``out`` for the run ``identity`` describes (the contents of ``run_config.json``).

    Creates the folders; refuses (ValueError) a folder holding a run with another identity; records the identity;
    returns the results already logged (by any process), and rewrites this process's log without a torn tail so
    that appends start on a fresh line.

    With several processes every process calls it: each checks the identity, process 0 writes it, and each then
    confirms it sees the same run_config.json and the same logged images as the others (else ValueError on every
    process: the folder is not on a filesystem they share).
    """
    make_output_dirs(out)
    config_path = os.path.join(out, "run_config.json")
    problem = None
    if os.path.exists(config_path):
        try:
            check_identity(load_run_config(config_path), identity, config_path)
        except ValueError as err:  # CorruptRunError included
            if jax.process_count() == 1:
                raise
            problem = str(err)
    distributed.check_all(problem)  # every process stops, or none
    if distributed.is_main_process():
        atomic_write_json(config_path, identity)
    results_path = log_path(out, jax.process_index())
    own = load_results(results_path)
    if own:
        atomic_write_bytes(results_path, "".join(json.dumps(r) + "\n" for r in own).encode())
    if jax.process_count() == 1:
        return load_run_results(out)
    distributed.barrier("spark_jax: run folder written")  # run_config.json written, every log without a torn tail
    logged = load_run_results(out)
    views = distributed.gather_objects(_view(config_path, logged) if os.path.exists(config_path) else None)
    if len(set(views)) != 1:
        raise ValueError(
            f"the processes of this run see different contents of --output_dir={out!r} (run_config.json or the "
            "results logs differ or are missing on some hosts): put it on a filesystem every host mounts (NFS, a GCS "
            "FUSE mount, ...)")
    # Nobody appends before everyone has read the logs: every process starts from the same finished images.
    distributed.barrier("spark_jax: run folder read")
    return logged


def open_log(path: str) -> TextIO:
    """``results.jsonl`` opened for appending."""
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as err:
        raise output_error(path, err) from None


def append_record(log: TextIO, rec: dict[str, Any]) -> None:
    """Appends one record: one write, flushed and fsynced, so a crash leaves at most a torn tail."""
    try:
        log.write(json.dumps(rec) + "\n")
        log.flush()
        os.fsync(log.fileno())
    except OSError as err:
        raise output_error(log.name, err) from None
