"""The runner's errors: each message names the file, image, flag or value at fault and the fix."""

from __future__ import annotations

import errno

__all__ = [
    "BackboneNotFoundError",
    "BadDataError",
    "CorruptRunError",
    "NonFiniteFeaturesError",
    "OutputPathError",
    "bad_data_error",
    "nonfinite_error",
    "output_error",
]


class BackboneNotFoundError(FileNotFoundError):
    """No diffusion checkpoint available; the message says how to get one."""


class OutputPathError(OSError):
    """The output folder cannot be written (a file in the way, no permission, disk full); says which path and
    what to do."""


class CorruptRunError(ValueError):
    """A file of an existing run folder (results.jsonl, run_config.json) cannot be read; names the file, the line
    and the fix."""


class BadDataError(ValueError):
    """Images or labels of the dataset cannot be used; the message names every bad file and the fix."""


class NonFiniteFeaturesError(ValueError):
    """The backbone produced NaN/Inf features; the message gives the count per image and the likely cause."""


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or choose another --output_dir",
    errno.EDQUOT: "the disk quota is exceeded: free some space or choose another --output_dir",
    errno.EACCES: "permission denied: make the folder writable or choose another --output_dir",
    errno.EPERM: "permission denied: make the folder writable or choose another --output_dir",
    errno.EROFS: "the file system is read-only: choose another --output_dir",
    errno.ENOTDIR: "a file is in the way of a folder: remove it or choose another --output_dir",
    errno.EEXIST: "a file is in the way of a folder: remove it or choose another --output_dir",
}


def output_error(path: str, err: OSError) -> OutputPathError:
    """The OutputPathError of a failed write of ``path``, with the fix for its errno."""
    fix = _OS_FIXES.get(err.errno, "check the path or choose another --output_dir")
    return OutputPathError(err.errno, f"cannot write {path!r} ({err.strerror or err}): {fix}")


def bad_data_error(bad: list, total: int) -> BadDataError:
    """Every unreadable sample of ``bad`` (``BadSampleError``s) in one message, with the way to skip them."""
    lines = [f"  {b.image_id}: {b.path}: {b.reason}" + (f" ({b.fix})" if getattr(b, "fix", "") else "")
             for b in bad]
    return BadDataError(
        f"{len(bad)} of {total} samples cannot be read:\n" + "\n".join(lines)
        + "\nReplace or re-extract those files, or pass --on_bad_sample=skip to leave them out (they are listed "
        "in metrics.json)."
    )


def nonfinite_error(found: list[tuple[str, int]], tokens: int, backbone_desc: str) -> NonFiniteFeaturesError:
    """``found``: (image id, non-finite token count) of each affected image, out of ``tokens`` per image."""
    listed = ", ".join(f"{i} ({n} of {tokens} tokens)" for i, n in found[:10])
    more = f" and {len(found) - 10} more" if len(found) > 10 else ""
    return NonFiniteFeaturesError(
        f"the backbone's features hold NaN/Inf: {listed}{more}. Backbone: {backbone_desc}. Likely causes: NaN or "
        "Inf weights in the checkpoint (a damaged or partial download: re-download it), or float16 overflow "
        "in the UNet (run it in float32 or bfloat16). Pass --allow_nonfinite_features to score anyway (those "
        "tokens are treated as zero vectors and counted in metrics.json)."
    )
