"""What every benchmark reader shares: the sample type, file reading, and layout checks with helpful errors."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

from spark_jax.evaluation import LabelSpace

__all__ = ["Sample", "DatasetNotFoundError", "Dataset", "FileDataset", "read_rgb", "read_label", "lookup_table"]


class Sample(NamedTuple):
    """One benchmark image.

    Attributes:
        image: ``[H, W, 3]`` uint8 RGB.
        label: ``[H, W]`` int32 class ids of the dataset's :class:`LabelSpace` (its ``ignore_index`` on void
            pixels), or None for an unlabelled image (shown, not scored).
        image_id: unique id within the dataset (file stem, or ``city/stem`` for Cityscapes).
    """

    image: np.ndarray
    label: np.ndarray | None
    image_id: str


class DatasetNotFoundError(FileNotFoundError):
    """Missing or incomplete benchmark data; the message shows the expected layout and where to get it."""


class Dataset:
    """A finite, indexable benchmark: ``len(ds)``, ``ds[i] -> Sample``, ``ds.ids``, ``ds.label_space``."""

    name: str = ""
    label_space: LabelSpace | None = None

    @property
    def ids(self) -> list[str]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> Sample:
        raise NotImplementedError

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def read_rgb(path: str) -> np.ndarray:
    """Decodes an image file to ``[H, W, 3]`` uint8 RGB (grey and palette images are expanded)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def read_label(path: str) -> np.ndarray:
    """Decodes a label PNG to ``[H, W]`` int32 raw values (palette PNGs give their palette *indices*)."""
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"{path}: label images must be single-channel (palette, 8-bit or 16-bit grey), got mode "
                f"{im.mode!r}. Colour-coded annotations must be converted to class ids first."
            )
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D label map, got shape {arr.shape}")
    return arr.astype(np.int32)


def lookup_table(mapping: dict[int, int], *, size: int = 256, default: int = 255) -> np.ndarray:
    """Dense table raw value -> class id (``default`` for values not in ``mapping``)."""
    lut = np.full(size, default, np.int32)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


def layout_error(name: str, root: str, problem: str, layout: str, source: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {problem}\n"
        f"  --data_dir was: {os.path.abspath(root) if root else root!r}\n"
        f"  Expected layout under --data_dir:\n{layout.rstrip()}\n"
        f"  Where to get it: {source}"
    )


class FileDataset(Dataset):
    """Images and label PNGs listed up front; every listed file is checked to exist at construction."""

    def __init__(
        self,
        name: str,
        label_space: LabelSpace,
        items: Sequence[tuple[str, str, str]],
        convert: Callable[[np.ndarray], np.ndarray],
        *,
        root: str,
        layout: str,
        source: str,
    ):
        self.name = name
        self.label_space = label_space
        self.root = root
        if not items:
            raise layout_error(name, root, "no images found.", layout, source)
        missing = [p for _, img, lab in items for p in (img, lab) if not os.path.isfile(p)]
        if missing:
            shown = "\n".join(f"    {p}" for p in missing[:5])
            raise layout_error(
                name,
                root,
                f"{len(missing)} listed file(s) are missing (the copy is incomplete), e.g.:\n{shown}",
                layout,
                source,
            )
        self._items = list(items)
        self._convert = convert

    @property
    def ids(self) -> list[str]:
        return [i for i, _, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> Sample:
        image_id, image_path, label_path = self._items[index]
        image = read_rgb(image_path)
        raw = read_label(label_path)
        if raw.shape != image.shape[:2]:
            raise ValueError(
                f"{self.name}: label {label_path} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                f"{image.shape[1]}x{image.shape[0]}; the annotation does not belong to this image."
            )
        return Sample(image, self._convert(raw).astype(np.int32), image_id)


def require_dirs(name: str, root: str, dirs: Sequence[str], layout: str, source: str) -> None:
    """Raises :class:`DatasetNotFoundError` unless ``root`` and every ``root/d`` exist."""
    if not root or not os.path.isdir(root):
        raise layout_error(name, root, "the data directory does not exist.", layout, source)
    absent = [d for d in dirs if not os.path.exists(os.path.join(root, d))]
    if absent:
        raise layout_error(name, root, "missing: " + ", ".join(absent), layout, source)


def read_id_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]
