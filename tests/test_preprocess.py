"""Specification of the reference crop/resize (DiffCut's loader), checked against torch's own resize."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch

from spark_jax.data.preprocess import crop_box, label_indices, prepare_image, prepare_label

F = torch.nn.functional


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (375, 500, (0, 63, 374)),  # VOC landscape: round(0.5) = 0 (half to even), round(63.0) = 63
        (500, 333, (84, 0, 332)),  # portrait
        (1024, 2048, (0, 512, 1023)),  # Cityscapes: round(512.5) = 512 (half to even)
        (512, 683, (0, 86, 511)),  # ADE20K-like: round(86.0) = 86
        (6, 6, (0, 0, 5)),  # square: round(0.5) = 0
        (2, 9, (0, 4, 1)),  # round(4.0)
    ],
)
def test_crop_box_matches_torchvision_center_crop(height, width, expected):
    assert crop_box(height, width) == expected


def test_crop_box_rejects_degenerate_images():
    with pytest.raises(ValueError, match="at least 2x2"):
        crop_box(1, 10)


def _torch_image(img_u8, size):
    top, left, side = crop_box(*img_u8.shape[:2])
    x = torch.from_numpy(img_u8).permute(2, 0, 1)[None].float() / 255.0
    x = x[:, :, top : top + side, left : left + side]
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("height, width, size", [(37, 53, 16), (53, 37, 64), (20, 20, 20), (9, 7, 100)])
def test_prepare_image_equals_torch_bilinear_without_antialias(height, width, size):
    img = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = jax.jit(prepare_image, static_argnums=1)(img, size)
    chex.assert_shape(out, (size, size, 3))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(np.asarray(out), _torch_image(img, size), atol=1e-6)


def test_prepare_image_float_input_and_vmap_agree_with_uint8():
    imgs = np.random.default_rng(1).integers(0, 256, (3, 21, 30, 3), dtype=np.uint8)
    batched = jax.jit(jax.vmap(lambda x: prepare_image(x, 12)))(imgs)
    from_float = prepare_image(imgs.astype(np.float32) / 255.0, 12)  # leading dims kept
    chex.assert_shape([batched, from_float], (3, 12, 12, 3))
    np.testing.assert_allclose(np.asarray(batched), np.asarray(from_float), atol=1e-6)
    assert float(batched.min()) >= 0.0 and float(batched.max()) <= 1.0


@pytest.mark.parametrize("shape", [(21, 30), (21, 30, 4), (21,)])
def test_prepare_image_rejects_wrong_layout(shape):
    with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 3\]"):
        prepare_image(np.zeros(shape, np.uint8), 8)


@pytest.mark.parametrize("height, width, size", [(37, 53, 16), (53, 37, 64), (375, 500, 128)])
def test_prepare_label_nearest_exact_and_diffcut_two_step(height, width, size):
    lab = np.random.default_rng(7).integers(0, 255, (height, width)).astype(np.int32)
    top, left, side = crop_box(height, width)
    t = torch.from_numpy(lab)[None, None].float()[:, :, top : top + side, left : left + side]
    direct = F.interpolate(t, size=(size, size), mode="nearest-exact")[0, 0].numpy().astype(np.int32)
    two_step = F.interpolate(F.interpolate(t, size=(1024, 1024), mode="nearest-exact"), size=(size, size))
    two_step = two_step[0, 0].numpy().astype(np.int32)

    out = jax.jit(prepare_label, static_argnums=1)(lab, size)
    out_via = jax.jit(lambda x: prepare_label(x, size, via=1024))(lab)
    chex.assert_shape([out, out_via], (size, size))
    chex.assert_type([out, out_via], jnp.int32)
    np.testing.assert_array_equal(np.asarray(out), direct)
    np.testing.assert_array_equal(np.asarray(out_via), two_step)


def test_label_indices_stay_inside_the_crop():
    rows, cols = label_indices(375, 500, 128, via=1024)
    top, left, side = crop_box(375, 500)
    assert rows.min() >= top and rows.max() < top + side
    assert cols.min() >= left and cols.max() < left + side


def test_prepare_label_rejects_float_labels():
    with pytest.raises(ValueError, match="integer class ids"):
        prepare_label(np.zeros((8, 8), np.float32), 4)


@pytest.mark.parametrize("in_hw, out_hw", [((64, 64), (16, 16)), ((20, 30), (50, 7))])
def test_resize_bilinear_equals_torch_for_pamr_image(in_hw, out_hw):
    from spark_jax.masks.resample import resize_bilinear

    x = np.random.default_rng(0).random((2,) + in_hw + (3,), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=out_hw, mode="bilinear", align_corners=False)
    out = jax.jit(lambda a: resize_bilinear(a, *out_hw))(x)
    chex.assert_shape(out, (2,) + out_hw + (3,))
    np.testing.assert_allclose(np.asarray(out), ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)
