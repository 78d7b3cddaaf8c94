"""The demo calibration (experiments.calibrate_demo): a never-scored image set and a documented choice rule."""

import numpy as np
import pytest

from experiments import calibrate_demo as cal
from spark_jax.config import SparkConfig
from spark_jax.data.demo import DemoDataset, demo_image


def _row(miou, segments, **spark):
    return cal.Row(SparkConfig(**spark), miou, segments, segments, 10.0, 1.0, 1.0)


def test_calibration_images_are_never_scored_ones():
    calib = cal.CalibrationDemo(16)
    assert calib.ids[0] == "demo_1000" and len(calib) == 16
    assert not set(calib.ids) & set(DemoDataset(num_images=1000, photos=False).ids)
    sample = calib[3]
    want = demo_image(1003)
    np.testing.assert_array_equal(sample.image, want.image)
    np.testing.assert_array_equal(sample.label, want.label)
    assert sample.image_id == "demo_1003"
    with pytest.raises(IndexError):
        calib[16]


def test_a_calibration_set_overlapping_the_benchmark_is_refused():
    with pytest.raises(ValueError, match="first=7"):
        cal.CalibrationDemo(4, first=7)
    with pytest.raises(ValueError, match="num_images"):
        cal.CalibrationDemo(0)


def test_choose_takes_the_best_miou():
    rows = [_row(0.60, 3.0, sharpen=4.0), _row(0.70, 20.0, sharpen=8.0), _row(0.65, 2.0, sharpen=2.0)]
    assert cal.choose(rows, tie=0.002).spark.sharpen == 8.0


def test_choose_breaks_ties_by_fewer_segments_then_fixed_sharpening():
    rows = [_row(0.700, 20.0, sharpen=8.0), _row(0.699, 5.0, sharpen=4.0), _row(0.690, 1.0, sharpen=1.0)]
    assert cal.choose(rows, tie=0.002).spark.sharpen == 4.0  # 0.690 is outside the tie
    level = [_row(0.7, 5.0, sharpen_mode="entropy", sharpen_target=0.1), _row(0.7, 5.0, sharpen=4.0)]
    assert cal.choose(level, tie=0.0).spark.sharpen_mode == "fixed"
    with pytest.raises(ValueError, match="no calibration results"):
        cal.choose([], tie=0.0)


def test_grid_covers_both_sharpening_modes():
    settings = cal.grid([1.0, 4.0], [0.05], [0.6, 0.8], [1.5, 2.0, 2.6])
    assert len(settings) == 2 * 2 * 3 + 1 * 2 * 3 == len(set(settings))
    assert sum(s.sharpen_mode == "entropy" for s in settings) == 6
    assert all(s.gamma == SparkConfig().gamma for s in settings)  # only the swept fields change


def test_refine_sweeps_inflation_at_each_modes_best_and_skips_what_ran():
    rows = [_row(0.5, 3.0, sharpen=4.0, beta=0.8, inflation=1.5), _row(0.4, 3.0, sharpen=1.0, inflation=1.5),
            _row(0.6, 9.0, sharpen_mode="entropy", sharpen_target=0.1, beta=1.0, inflation=2.0)]
    out = cal.refine(rows, [1.5, 1.8], tie=0.0)
    assert out == [SparkConfig(sharpen=4.0, beta=0.8, inflation=1.8),
                   SparkConfig(sharpen_mode="entropy", sharpen_target=0.1, beta=1.0, inflation=1.5),
                   SparkConfig(sharpen_mode="entropy", sharpen_target=0.1, beta=1.0, inflation=1.8)]


@pytest.mark.slow
def test_evaluate_scores_a_setting_with_the_benchmark_runner(tmp_path):
    from spark_jax.runner import RunConfig, resolve_backbone

    backbone = resolve_backbone(RunConfig(backbone="handcrafted"))
    spark = SparkConfig(sharpen=5.0, beta=0.8, inflation=1.5)
    (row,) = cal.evaluate([spark], cal.CalibrationDemo(1), backbone, str(tmp_path), log=lambda s: None)
    assert row.spark == spark and 0.0 <= row.miou <= 1.0 and row.segments >= 1 and row.converged == 1.0
    assert (tmp_path / "features").is_dir()  # one feature cache for every setting
