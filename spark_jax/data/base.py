"""What every benchmark reader shares: the sample type, strict decoding of image and label files, the check of
label values against the dataset's raw label space, and layout checks with helpful errors.

Decoding policy (one place for every reader):

* A file is decoded *fully* (Pillow's ``load()``; ``verify()`` alone passes truncated PNGs and JPEGs). Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False: with it, a truncated file is silently grey-filled, so
  reading refuses to run while it is set.
* Images become ``[H, W, 3]`` uint8 RGB. Grey (``L``), 1-bit, palette (``P``, ``PA``), ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV`` go through Pillow's own conversion. Alpha (``RGBA``, ``LA``, ``PA``, palette transparency)
  is **dropped**: the stored colours are kept, as the annotations were drawn on them (compositing onto a
  chosen backdrop would invent colours under transparent pixels); premultiplied ``RGBa`` is un-premultiplied
  by Pillow first. 16-bit grey (``I;16``, ``I;16B``, ``I;16L``, and 32-bit ``I`` holding 0..65535) is
  **scaled** to 8 bits, ``round(v * 255 / 65535)`` (Pillow's own conversion saturates at 255). Float ``F``
  and any other mode are refused by name. EXIF orientation is *not* applied: annotations are on the stored
  pixel grid. Multi-frame files give their first frame.
* Labels are single-channel: palette PNGs give their palette *indices* (VOC's class ids), ``L``, 16-bit
  ``I;16*`` and ``I`` give their values. Colour-coded (RGB/RGBA) and alpha-carrying maps are refused.
* Every raw label value must lie in the reader's raw label space (:class:`RawLabelSpace`); a value outside it
  is an error naming the file and the values, never mapped to void.

Every such problem raises :class:`BadSampleError` when the sample is read; :meth:`Dataset.verify` finds them
all before a run.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import tqdm
from PIL import Image, ImageFile, UnidentifiedImageError

from spark_jax.evaluation import LabelSpace

__all__ = [
    "Sample",
    "BadSampleError",
    "BadSample",
    "DatasetNotFoundError",
    "Dataset",
    "FileDataset",
    "RawLabelSpace",
    "raw_label_space",
    "read_rgb",
    "read_label",
]


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


class BadSampleError(ValueError):
    """One image or label file of a dataset cannot be used.

    Raised when the sample is read: the file is unreadable (missing, empty, truncated, not an image), has a mode
    that cannot be decoded to what the pipeline needs, holds label values outside the dataset's label space,
    or does not match its image's size.

    Attributes:
        image_id: the sample's id in its dataset.
        path: the offending file.
        reason: the problem, one line, without the path.
        fix: what to do about it.
    """

    def __init__(self, image_id: str, path: str, reason: str, fix: str):
        super().__init__(f"{path} (image {image_id!r}): {reason}. {fix[:1].upper()}{fix[1:]}.")
        self.image_id, self.path, self.reason, self.fix = image_id, path, reason, fix

    def __reduce__(self):  # picklable across processes despite the keyword-rich constructor
        return type(self), (self.image_id, self.path, self.reason, self.fix)


class BadSample(NamedTuple):
    """One bad file found by :meth:`Dataset.verify` (a sample with a bad image *and* label gives two)."""

    index: int  # position in the dataset
    image_id: str
    path: str
    reason: str
    fix: str = ""

    @classmethod
    def from_error(cls, index: int, err: BadSampleError) -> BadSample:
        return cls(index, err.image_id, err.path, err.reason, err.fix)


class DatasetNotFoundError(FileNotFoundError):
    """Missing or incomplete benchmark data; the message shows the expected layout and where to get it."""


class Dataset:
    """A finite, indexable benchmark: ``len(ds)``, ``ds[i] -> Sample``, ``ds.ids``, ``ds.label_space``."""

    name: str = ""
    label_space: LabelSpace | None = None
    note: str = ""
    # Threads of verify(): 1 unless a reader's __getitem__ is known to be thread-safe (FileDataset's is).
    verify_threads: int = 1

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

    def _check(self, index: int) -> list[BadSample]:
        """The bad files of sample ``index`` (empty when it reads). Readers of files override this to report
        a bad image and a bad label of one sample separately."""
        try:
            self[index]
        except BadSampleError as err:
            return [BadSample.from_error(index, err)]
        return []

    def verify(self, indices: Sequence[int] | None = None, progress: bool = False) -> list[BadSample]:
        """Decodes every image and label of ``indices`` (all by default) and lists *all* bad files.

        Exactly the samples whose ``ds[i]`` raises :class:`BadSampleError` appear, in index order. Nothing is
        kept in memory; :class:`FileDataset` decodes on a few threads (Pillow's decoders release the GIL).

        Args:
            indices: positions to check; None for the whole dataset.
            progress: show a tqdm progress bar on stderr.

        Returns:
            One :class:`BadSample` per bad file; empty when every sample reads.
        """
        indices = list(range(len(self))) if indices is None else [int(i) for i in indices]
        bar = tqdm.tqdm(total=len(indices), desc=f"{self.name}: checking files", unit="img", disable=not progress,
                        file=sys.stderr, dynamic_ncols=True)
        bad: list[BadSample] = []
        with bar, concurrent.futures.ThreadPoolExecutor(max(1, self.verify_threads)) as pool:
            for found in pool.map(self._check, indices):  # map keeps the input order
                bad.extend(found)
                bar.update(1)
        return bad


# ------------------------------------------------------------------------------------------------- decoding
_RESAVE = "re-extract or re-download that file from the dataset's archive"
_PILLOW_RGB_MODES = frozenset({"RGB", "RGBA", "RGBX", "RGBa", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_LABEL_MODES = frozenset({"P", "L", "I"}) | _SIXTEEN_BIT_MODES
# Signatures of the benchmarks' formats: a file that starts like one but does not open was cut short or damaged.
_MAGIC = {"PNG": b"\x89PNG\r\n\x1a\n", "JPEG": b"\xff\xd8\xff"}


def _open_decoded(path: str, image_id: str) -> Image.Image:
    """Opens ``path`` and decodes all its pixels; every failure becomes a :class:`BadSampleError`."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by this program or a library it imported): truncated "
            "images would be silently filled with grey instead of being reported. Set it back to False."
        )
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise BadSampleError(image_id, path, "the file does not exist (it was removed after the dataset was "
                             "listed)", "restore it, or re-extract the dataset") from None
    except OSError as err:
        raise BadSampleError(image_id, path, f"cannot be read ({err.strerror})", "check the file's permissions "
                             "and the disk") from None
    if size == 0:
        raise BadSampleError(image_id, path, "the file is empty (0 bytes)", _RESAVE)
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(8)
        kind = next((k for k, magic in _MAGIC.items() if head.startswith(magic)), None)
        reason = (f"the file is truncated or damaged: it starts as a {kind} but its header cannot be parsed "
                  f"({size} bytes)" if kind else f"not an image Pillow can read ({size} bytes of an unknown format)")
        raise BadSampleError(image_id, path, reason, _RESAVE) from None
    except Exception as err:  # noqa: BLE001  (any decoder failure is a property of this file)
        raise BadSampleError(image_id, path, _decode_failure(err), _RESAVE) from None
    try:
        im.load()
    except Exception as err:  # noqa: BLE001  (truncated data, broken chunks, decompression bombs, ...)
        im.close()
        raise BadSampleError(image_id, path, _decode_failure(err), _RESAVE) from None
    return im


def _decode_failure(err: Exception) -> str:
    what = f"{type(err).__name__}: {err}"
    if "truncat" in str(err).lower():
        return f"the file is truncated ({what})"
    return f"the file cannot be decoded, it is damaged or of an unsupported kind ({what})"


def _scale_16_bit(values: np.ndarray) -> np.ndarray:
    """0..65535 -> 0..255, rounded to nearest (65535 = 255 * 257, so 257 * k maps exactly to k)."""
    v = values.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def read_rgb(path: str, image_id: str | None = None) -> np.ndarray:
    """Decodes an image file to ``[H, W, 3]`` uint8 RGB (policy: module docstring).

    Raises:
        BadSampleError: unreadable file, unsupported mode (``F``, ...), a 32-bit ``I`` image outside 0..65535,
            or an image smaller than 2x2 (the reference center crop would be empty).
    """
    image_id = os.path.splitext(os.path.basename(path))[0] if image_id is None else image_id
    with _open_decoded(path, image_id) as im:
        mode = im.mode
        if mode in _SIXTEEN_BIT_MODES or mode == "I":
            grey = np.asarray(im)
            if mode == "I" and grey.size and (grey.min() < 0 or grey.max() > 65535):
                raise BadSampleError(
                    image_id, path, f"32-bit integer image (mode 'I') with values {grey.min()}..{grey.max()}, "
                    "outside the 16-bit range 0..65535 it is read as", "save it as an 8- or 16-bit image")
            rgb = np.repeat(_scale_16_bit(grey)[..., None], 3, axis=-1)
        elif mode in _PILLOW_RGB_MODES:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        else:
            raise BadSampleError(
                image_id, path, f"image mode {mode!r} is not read (no unambiguous mapping to 8-bit RGB; "
                f"readable modes: {', '.join(sorted(_PILLOW_RGB_MODES | _SIXTEEN_BIT_MODES | {'I'}))})",
                "convert it to 8-bit RGB (e.g. PIL's Image.convert('RGB') after scaling to 0..255)")
    if min(rgb.shape[:2]) < 2:
        raise BadSampleError(image_id, path, f"the image is {rgb.shape[1]}x{rgb.shape[0]} pixels; the center crop "
                             "needs at least 2x2", _RESAVE)
    return rgb


def read_label(path: str, image_id: str | None = None) -> np.ndarray:
    """Decodes a label map to ``[H, W]`` int64 raw values (palette PNGs give their palette *indices*).

    Raises:
        BadSampleError: unreadable file, or not a single-channel map (RGB/RGBA colour coding, alpha, 1-bit,
            float).
    """
    image_id = os.path.splitext(os.path.basename(path))[0] if image_id is None else image_id
    with _open_decoded(path, image_id) as im:
        mode = im.mode
        if mode not in _LABEL_MODES:
            reason = (f"label maps must be single-channel class ids (palette, 8-bit or 16-bit grey), got mode "
                      f"{mode!r}")
            fix = "convert the annotation to class ids in a single-channel PNG"
            if mode in ("RGB", "RGBA"):
                rgb = np.asarray(im.convert("RGB"))
                if (rgb == rgb[..., :1]).all():
                    reason += " whose three channels are equal (a grey map saved as colour)"
                    fix = "re-save it as 8-bit grey (Image.convert('L'))"
                else:
                    reason += " (a colour-coded annotation)"
                    fix = ("map each colour to its class id first (the dataset's official class-id PNGs are "
                           "single-channel)")
            raise BadSampleError(image_id, path, reason, fix)
        arr = np.asarray(im).astype(np.int64)
    if arr.ndim != 2:
        raise BadSampleError(image_id, path, f"expected a 2-D label map, got shape {arr.shape}", _RESAVE)
    return arr


# ------------------------------------------------------------------------------------------------ label space
class RawLabelSpace(NamedTuple):
    """The raw values a reader's label files may hold, and what each becomes.

    Attributes:
        table: ``[n]`` int32, raw value -> reader id (the label space's ``ignore_index`` for void values);
            ``-1`` marks a value outside the space. Values ``>= n`` or ``< 0`` are outside too.
        description: the space in words, for error messages (e.g. ``"0..20 and 255 (void)"``).
    """

    table: np.ndarray
    description: str


def raw_label_space(mapping: Mapping[int, int], description: str) -> RawLabelSpace:
    """A :class:`RawLabelSpace` from ``{raw value: reader id}``; every other value is outside the space."""
    if min(mapping) < 0:
        raise ValueError(f"raw label values are >= 0, got {min(mapping)}")
    table = np.full(max(mapping) + 1, -1, np.int32)
    for raw, cls in mapping.items():
        table[raw] = cls
    return RawLabelSpace(table, description)


def map_raw_labels(raw: np.ndarray, space: RawLabelSpace, *, dataset: str, image_id: str, path: str) -> np.ndarray:
    """Maps raw label values to reader ids; refuses any value outside ``space``.

    Args:
        raw: ``[H, W]`` int raw values.
        space: the reader's raw label space.
        dataset: dataset name for the message.
        image_id: the sample's id.
        path: the label file.

    Returns:
        ``[H, W]`` int32 reader ids.

    Raises:
        BadSampleError: naming the file, the offending values and how many pixels hold them.
    """
    raw = np.asarray(raw)
    inside = (raw >= 0) & (raw < space.table.size)
    ids = space.table[np.where(inside, raw, 0)]
    outside = ~inside | (ids < 0)
    if outside.any():
        values = np.unique(raw[outside])
        shown = ", ".join(str(v) for v in values[:12]) + (f", ... ({values.size} values)" if values.size > 12 else "")
        raise BadSampleError(
            image_id, path,
            f"label values [{shown}] ({int(outside.sum())} pixels) are outside the {dataset} label space "
            f"({space.description})",
            "use the dataset's official annotations: a colour-coded, re-numbered or converted copy holds other "
            "values (see docs/evaluation.md for each dataset's format)")
    return ids.astype(np.int32)


# ---------------------------------------------------------------------------------------------------- layout
def layout_error(name: str, root: str, problem: str, layout: str, source: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {problem}\n"
        f"  --data_dir was: {os.path.abspath(root) if root else root!r}\n"
        f"  Expected layout under --data_dir:\n{layout.rstrip()}\n"
        f"  Where to get it: {source}"
    )


class FileDataset(Dataset):
    """Images and label files listed up front; every listed file is checked to exist at construction.

    Args:
        name: dataset name.
        label_space: the classes the reader yields.
        items: ``(image_id, image_path, label_path)`` per sample.
        raw_labels: the raw values the label files may hold and their reader ids.
        root: the dataset folder (for messages).
        layout: the expected layout (for messages).
        source: where to get the data (for messages).
    """

    def __init__(
        self,
        name: str,
        label_space: LabelSpace,
        items: Sequence[tuple[str, str, str]],
        raw_labels: RawLabelSpace,
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
        self.raw_labels = raw_labels
        self.verify_threads = min(8, os.cpu_count() or 1)

    @property
    def ids(self) -> list[str]:
        return [i for i, _, _ in self._items]

    def __len__(self) -> int:
        return len(self._items)

    def read_image(self, index: int) -> np.ndarray:
        """``[H, W, 3]`` uint8 image of sample ``index``; raises :class:`BadSampleError`."""
        image_id, image_path, _ = self._items[index]
        return read_rgb(image_path, image_id)

    def read_label(self, index: int, image_shape: tuple[int, int] | None = None) -> np.ndarray:
        """``[H, W]`` int32 reader ids of sample ``index``, checked against the raw label space and, when given,
        the image's ``(H, W)``; raises :class:`BadSampleError`."""
        image_id, _, label_path = self._items[index]
        raw = read_label(label_path, image_id)
        if image_shape is not None and raw.shape != tuple(image_shape):
            raise BadSampleError(
                image_id, label_path,
                f"the label is {raw.shape[1]}x{raw.shape[0]} but its image is {image_shape[1]}x{image_shape[0]}; "
                "the annotation does not belong to this image",
                "use the label file of the same image (same id and size)")
        return map_raw_labels(raw, self.raw_labels, dataset=self.name, image_id=image_id, path=label_path)

    def __getitem__(self, index: int) -> Sample:
        image = self.read_image(index)
        return Sample(image, self.read_label(index, image.shape[:2]), self._items[index][0])

    def _check(self, index: int) -> list[BadSample]:
        found, shape = [], None
        try:
            shape = self.read_image(index).shape[:2]
        except BadSampleError as err:
            found.append(BadSample.from_error(index, err))
        try:  # the label is checked even when its image is bad (its size only when the image read)
            self.read_label(index, shape)
        except BadSampleError as err:
            found.append(BadSample.from_error(index, err))
        return found


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
