"""Prompt templates and class-name vocabularies of open-vocabulary segmentation.

A vocabulary is a tuple of classes, each a tuple of synonyms: a class-name line ``"a, b, c"`` is one class whose
score is the best of its synonyms' scores (NACLIP/SCLIP's class files, DiffCut's ``*_with_prompt_eng.txt``).
Each synonym is put into every template (``template.format(name)``) and the text embeddings are ensembled
(``spark_jax.openvocab.classifier``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["IMAGENET_TEMPLATES", "VILD_TEMPLATES", "parse_class_names", "read_class_names"]

# The 80 prompt templates of OpenAI's ImageNet zero-shot classifier (Radford et al. 2021, the CLIP repository's
# "Prompt_Engineering_for_ImageNet" notebook), in that order; open_clip's ``OPENAI_IMAGENET_TEMPLATES`` and the
# templates of SCLIP and NACLIP are the same list. The default of SCLIP, NACLIP and (inferred) NERVE.
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 14 ViLD templates (Gu et al. 2022) as fc-clip and DiffCut's open-vocabulary code use them
# (``VILD_PROMPT``; method-facts 3.6), punctuation as published: four have no final period.
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)


def parse_class_names(lines: Iterable[str], *, source: str = "class names") -> tuple[tuple[str, ...], ...]:
    """A vocabulary from class-name lines: line i is class i, its comma-separated names are its synonyms.

    Names are stripped of surrounding whitespace and kept otherwise as written (case included). Blank lines at
    the end (a final newline) are ignored; a blank line before the last class would shift every later class id,
    so it is an error, as is an empty name (``"a, , b"``, a trailing comma) or no class at all.

    Args:
      lines: the lines (without or with their newline).
      source: what the lines come from (a file path), for the error messages.

    Returns:
      ``((synonym, ...), ...)``, one tuple per class, in line order.
    """
    lines = [line.rstrip("\r\n") for line in lines]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ValueError(f"{source}: no class names (empty); write one class per line, synonyms separated by commas.")
    classes = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise ValueError(f"{source}, line {number}: blank line between classes; every line is one class "
                             "(class ids follow line order), so remove it or write the class's names.")
        names = tuple(name.strip() for name in line.split(","))
        if any(not name for name in names):
            raise ValueError(f"{source}, line {number}: empty class name in {line!r}; separate synonyms by single "
                             "commas, with no trailing comma.")
        classes.append(names)
    return tuple(classes)


def read_class_names(path: str | os.PathLike) -> tuple[tuple[str, ...], ...]:
    """The vocabulary of a UTF-8 class-name file: one class per line, synonyms ``"a, b, c"`` (``parse_class_names``)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"class-name file {path!r} does not exist; pass the path of a text file with one "
                                "class per line.") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"class-name file {path!r} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    return parse_class_names(text.splitlines(), source=path)
