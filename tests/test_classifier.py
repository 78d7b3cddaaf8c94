"""Prompts, vocabularies and CLIP's open-vocabulary classifier: hand-computed cases and a NumPy transcription."""

import glob
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spark_jax.openvocab import (
    IMAGENET_TEMPLATES,
    VILD_TEMPLATES,
    TextClassifier,
    class_logits,
    class_probabilities,
    clear_text_classifier_cache,
    label_segments,
    parse_class_names,
    read_class_names,
    text_classifier,
)
from spark_jax.testing import numpy_clip


def _clf(embeddings, synonym_class, num_classes):
    return TextClassifier(jnp.asarray(embeddings, jnp.float32), jnp.asarray(synonym_class, jnp.int32), num_classes)


# ----------------------------------------------------------------------------------------------- templates, names


def test_templates_are_the_published_lists():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(VILD_TEMPLATES) == 14 and len(set(VILD_TEMPLATES)) == 14
    for t in IMAGENET_TEMPLATES + VILD_TEMPLATES:
        assert t.count("{}") == 1, t
    # The notebook's first, a middle and the last template, in its order (open_clip's list is the same).
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert IMAGENET_TEMPLATES[39] == "a photo of a {}."
    assert IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert VILD_TEMPLATES[1] == "This is a photo of a {}"  # no period, as fc-clip and DiffCut have it


def test_parse_class_names_synonyms_and_whitespace():
    assert parse_class_names(["background, sky ,wall", "aeroplane", "Potted Plant\n", "", "  "]) == (
        ("background", "sky", "wall"), ("aeroplane",), ("Potted Plant",))


@pytest.mark.parametrize("lines, message", [
    ([], "empty"),
    (["", "   "], "empty"),
    (["cat", "", "dog"], "line 2: blank line"),
    (["cat, , dog"], "line 1: empty class name"),
    (["cat", "dog,"], "line 2: empty class name"),
])
def test_parse_class_names_errors(lines, message):
    with pytest.raises(ValueError, match=message):
        parse_class_names(lines, source="names.txt")


def test_read_class_names(tmp_path):
    path = tmp_path / "voc.txt"
    path.write_text("background, sky\ncat\ndog\n", encoding="utf-8")
    assert read_class_names(path) == (("background", "sky"), ("cat",), ("dog",))
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt.*empty"):
        read_class_names(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_text("cat\n,dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.txt, line 2: empty class name"):
        read_class_names(tmp_path / "bad.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_class_names(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_class_names(tmp_path / "latin1.txt")


# --------------------------------------------------------------------------------------------- class logits


def test_class_logits_hand_computed_max_over_synonyms():
    # Class 0 = e0; class 1 = {e1, e2} (two synonyms). Feature (0.6, 0.8, 0) has cosines 0.6, 0.8, 0.
    clf = _clf(np.eye(3), [0, 1, 1], 2)
    feats = jnp.asarray([[0.6, 0.8, 0.0], [0.0, 0.6, 0.8], [3.0, 0.0, 0.0]])  # the last one is not normalised
    logits = class_logits(feats, clf, logit_scale=40.0)
    np.testing.assert_allclose(logits, [[24.0, 32.0], [0.0, 32.0], [40.0, 0.0]], atol=1e-5)
    probs = class_probabilities(feats, clf, logit_scale=40.0)
    expected = 1.0 / (1.0 + math.exp(-8.0))  # softmax([24, 32])[1]
    np.testing.assert_allclose(probs[0], [1.0 - expected, expected], rtol=1e-6)


def test_class_logits_match_the_numpy_transcription():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(5, 8))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    synonym_class = [2, 0, 1, 0, 2]  # a hand-built classifier need not be sorted
    clf = _clf(emb, synonym_class, 3)
    dense = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    got = jax.jit(class_logits)(dense, clf)
    want = numpy_clip.class_logits(dense, emb, synonym_class, 3, 40.0)
    chex.assert_shape(got, (2, 3, 4, 3))
    np.testing.assert_allclose(got, want, atol=1e-4 * 40.0)
    probs = jax.jit(class_probabilities, static_argnames="logit_scale")(dense, clf, logit_scale=100.0)
    np.testing.assert_allclose(probs, numpy_clip.class_probabilities(dense, emb, synonym_class, 3, 100.0), atol=1e-4)
    np.testing.assert_allclose(jnp.sum(probs, axis=-1), 1.0, atol=1e-5)


def test_class_logits_rejects_a_feature_width_mismatch():
    clf = _clf(np.eye(3), [0, 1, 2], 3)
    with pytest.raises(ValueError, match="projection width 3"):
        class_logits(jnp.zeros((1, 2, 2, 4)), clf)


# ------------------------------------------------------------------------------------------ text classifier


class FakeCLIP:
    """A test double of the loaded CLIP's text side: a fixed embedding per text, calls counted."""

    def __init__(self, table, checkpoint_id="fake-clip"):
        self.table = table
        self.checkpoint_id = checkpoint_id
        self.calls = []

    def encode_text(self, texts):
        self.calls.append(list(texts))
        return np.asarray([self.table[t] for t in texts], np.float32)


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    clear_text_classifier_cache()
    yield
    clear_text_classifier_cache()


def test_text_classifier_ensembles_normalised_template_embeddings():
    # "a x" -> (2, 0), "b x" -> (0, 1): normalised (1, 0) and (0, 1), mean (1/2, 1/2), normalised (1, 1)/sqrt 2.
    # Averaging before normalising would give (2, 1)/sqrt 5 instead.
    table = {"a x": [2.0, 0.0], "b x": [0.0, 1.0], "a y": [0.0, 3.0], "b y": [0.0, 5.0], "a z": [-1.0, 0.0],
             "b z": [-4.0, 0.0]}
    clip = FakeCLIP(table)
    clf = text_classifier(clip, ["x, y", "z"], templates=("a {}", "b {}"))
    r = 1.0 / math.sqrt(2.0)
    np.testing.assert_allclose(clf.embeddings, [[r, r], [0.0, 1.0], [-1.0, 0.0]], atol=1e-6)
    np.testing.assert_array_equal(clf.synonym_class, [0, 0, 1])
    assert clf.num_classes == 2 and clf.embeddings.dtype == jnp.float32
    # Against the transcription of the recipe, synonym by synonym.
    for row, name in enumerate(["x", "y", "z"]):
        want = numpy_clip.prompt_ensemble([table[f"a {name}"], table[f"b {name}"]])
        np.testing.assert_allclose(clf.embeddings[row], want, atol=1e-6)


def test_text_classifier_batches_have_one_shape():
    table = {f"{t} {n}": [float(i), 1.0] for i, (t, n) in enumerate((t, n) for n in "pqr" for t in "ab")}
    clip = FakeCLIP(table)
    clf = text_classifier(clip, [("p",), ("q",), ("r",)], templates=("a {}", "b {}"), batch_size=4)
    assert [len(c) for c in clip.calls] == [4, 4]  # 6 texts: the last batch padded by repetition
    direct = text_classifier(FakeCLIP(table, "other-id"), [("p",), ("q",), ("r",)], templates=("a {}", "b {}"))
    np.testing.assert_allclose(clf.embeddings, direct.embeddings, atol=1e-6)


def test_text_classifier_caches_in_memory_and_on_disk(tmp_path):
    table = {f"{t} {n}": [1.0 + len(t), float(len(n))] for t in ("a", "bb") for n in ("cat", "dog", "kitten")}
    clip = FakeCLIP(table)
    first = text_classifier(clip, ["cat, kitten", "dog"], templates=("a {}", "bb {}"), cache_dir=tmp_path)
    assert len(clip.calls) == 1
    again = text_classifier(clip, ["cat, kitten", "dog"], templates=("a {}", "bb {}"), cache_dir=tmp_path)
    assert len(clip.calls) == 1 and again is first  # memory
    files = glob.glob(os.path.join(tmp_path, "text-classifier-*.npz"))
    assert len(files) == 1
    clear_text_classifier_cache()
    from_disk = text_classifier(clip, ["cat, kitten", "dog"], templates=("a {}", "bb {}"), cache_dir=tmp_path)
    assert len(clip.calls) == 1  # read back, not re-encoded
    np.testing.assert_array_equal(from_disk.embeddings, first.embeddings)
    np.testing.assert_array_equal(from_disk.synonym_class, first.synonym_class)
    assert from_disk.num_classes == 2
    # Each part of the key is part of the identity: another vocabulary, template list or checkpoint re-encodes.
    text_classifier(clip, ["cat", "dog"], templates=("a {}", "bb {}"), cache_dir=tmp_path)
    text_classifier(clip, ["cat, kitten", "dog"], templates=("a {}",), cache_dir=tmp_path)
    text_classifier(FakeCLIP(table, "another-checkpoint"), ["cat, kitten", "dog"], templates=("a {}", "bb {}"),
                    cache_dir=tmp_path)
    assert len(clip.calls) == 3
    assert len(glob.glob(os.path.join(tmp_path, "text-classifier-*.npz"))) == 4
    # A damaged cache file is recomputed and rewritten, never half read.
    with open(files[0], "wb") as f:
        f.write(b"not an npz")
    clear_text_classifier_cache()
    again = text_classifier(clip, ["cat, kitten", "dog"], templates=("a {}", "bb {}"), cache_dir=tmp_path)
    assert len(clip.calls) == 4
    np.testing.assert_array_equal(again.embeddings, first.embeddings)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(class_names="cat, dog"), TypeError, "one string"),
    (dict(class_names=[]), ValueError, "empty"),
    (dict(class_names=[("cat", "")]), ValueError, "non-empty names"),
    (dict(templates="a photo of a {}."), TypeError, "one string"),
    (dict(templates=()), ValueError, "templates is empty"),
    (dict(templates=("a photo",)), ValueError, "one '{}'"),
    (dict(templates=("a {0} {1}",)), ValueError, "one '{}'"),
    (dict(batch_size=0), ValueError, "batch_size"),
])
def test_text_classifier_bad_inputs(kwargs, error, message):
    args = dict(class_names=["cat"], templates=("a {}",)) | kwargs
    with pytest.raises(error, match=message):
        text_classifier(FakeCLIP({"a cat": [1.0, 0.0]}), args.pop("class_names"), **args)


def test_text_classifier_needs_a_clip():
    with pytest.raises(TypeError, match="checkpoint_id"):
        text_classifier(object(), ["cat"])


# ------------------------------------------------------------------------------------------- label_segments


def test_label_segments_hand_computed_quadrants():
    # A 2 x 2 grid whose cells are the class embeddings 0, 1, 2, 1; a 4 x 4 segment map of four quadrants.
    e = np.eye(3)
    dense = np.stack([np.stack([e[0], e[1]]), np.stack([e[2], e[1]])])[None]  # [1, 2, 2, 3]
    segments = np.kron(np.array([[3, 0], [1, 2]]), np.ones((2, 2), int))[None]  # ids 3 0 / 1 2
    clf = _clf(e, [0, 1, 2], 3)
    labels = label_segments(segments, dense, clf)
    chex.assert_shape(labels, (1, 4, 4))
    assert labels.dtype == jnp.int32
    np.testing.assert_array_equal(labels[0], np.kron(np.array([[0, 1], [2, 1]]), np.ones((2, 2), int)))


def test_label_segments_vanished_segment_is_pooled_at_the_mask_size():
    # Nearest-exact 4 -> 2 samples rows and columns 1 and 3, so a segment on pixel (0, 2) alone has no grid cell.
    # At the mask size the bilinear resize gives pixel (0, 2) = 0.25 F[0, 0] + 0.75 F[0, 1]: class 1.
    # (DiffCut pools a zero vector there, whose equal logits name it class 0.)
    e = np.eye(3)
    dense = np.stack([np.stack([e[0], e[1]]), np.stack([e[2], e[2]])])[None]
    segments = np.zeros((1, 4, 4), int)
    segments[0, 0, 2] = 1
    clf = _clf(e, [0, 1, 2], 3)
    labels = np.asarray(label_segments(segments, dense, clf))
    assert labels[0, 0, 2] == 1
    np.testing.assert_array_equal(labels, numpy_clip.label_segments(segments, dense, e, [0, 1, 2], 3))


def test_label_segments_background_threshold():
    # A feature equally close to three classes: probabilities 1/3 each; above a threshold of 0.5 it is background.
    e = np.eye(3)
    dense = np.full((1, 2, 2, 3), 1.0 / math.sqrt(3.0))
    dense[0, 1, 1] = e[2]
    segments = np.array([[[0, 0], [0, 1]]])
    clf = _clf(e, [0, 1, 2], 3)
    labels = label_segments(segments, dense, clf, background_threshold=0.5)
    np.testing.assert_array_equal(labels[0], [[0, 0], [0, 2]])
    jitted = jax.jit(label_segments, static_argnames=("num_segments", "logit_scale"))
    labels = jitted(segments, dense, clf, num_segments=2, background_threshold=jnp.float32(0.5))
    np.testing.assert_array_equal(labels[0], [[0, 0], [0, 2]])


def test_label_segments_matches_the_numpy_transcription():
    rng = np.random.default_rng(3)
    k, dim = 4, 8
    emb = rng.normal(size=(6, dim))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    synonym_class = [0, 0, 1, 2, 3, 3]
    clf = _clf(emb, synonym_class, k)
    dense = rng.normal(size=(2, 5, 7, dim))
    dense /= np.linalg.norm(dense, axis=-1, keepdims=True)
    blocks = rng.integers(0, 6, size=(2, 6, 6))
    segments = np.kron(blocks, np.ones((1, 2, 3), int))  # [2, 12, 18]: a non-square mask, a non-square grid
    segments[:, 0, 0] = 6  # one-pixel segments, gone on the grid
    segments[1, 11, 17] = 7
    got = jax.jit(label_segments, static_argnames=("num_segments",))(segments, dense, clf, num_segments=8)
    want, probs = numpy_clip.label_segments(segments, dense, emb, synonym_class, k, return_probabilities=True)
    # Well-posed: every segment's top-two classes are far apart compared with float32 rounding.
    margins = [np.sort(p)[-1] - np.sort(p)[-2] for p in probs.values()]
    assert min(margins) > 1e-3
    np.testing.assert_array_equal(got, want)


def test_label_segments_bad_inputs():
    clf = _clf(np.eye(3), [0, 1, 2], 3)
    dense = jnp.zeros((1, 2, 2, 3))
    with pytest.raises(ValueError, match=r"in \[0, num_segments=2\)"):
        label_segments(jnp.full((1, 4, 4), 2), dense, clf, num_segments=2)
    with pytest.raises(ValueError, match=r"span \[-1"):
        label_segments(jnp.full((1, 4, 4), -1), dense, clf)
    with pytest.raises(ValueError, match="int array"):
        label_segments(jnp.zeros((1, 4, 4)), dense, clf)
    with pytest.raises(ValueError, match="batch of segments"):
        label_segments(jnp.zeros((2, 4, 4), int), dense, clf)
    with pytest.raises(ValueError, match="static num_segments"):
        jax.jit(label_segments)(jnp.zeros((1, 4, 4), int), dense, clf)
