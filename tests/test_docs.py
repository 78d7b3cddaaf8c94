"""The documentation's measured figures come from runs: docs/evaluation.md's demo table is the rendering of the
recorded runs (docs/demo_runs.json, written by ``python -m experiments.demo_table``), and the main command still
scores what was recorded."""

import json
import os

import pytest

from experiments import demo_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recorded():
    with open(os.path.join(ROOT, "docs", "demo_runs.json"), encoding="utf-8") as f:
        return json.load(f)


def test_the_demo_table_is_the_rendering_of_the_recorded_runs():
    record = recorded()
    with open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8") as f:
        text = f.read()
    assert demo_table.render(record) in text, "regenerate it: python -m experiments.demo_table"
    # the recorded runs are the script's commands, in order, the README's main command first
    assert [r["flags"] for r in record["runs"]] == [list(flags) for flags, _ in demo_table.COMMANDS]
    assert record["runs"][0]["flags"] == []
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert "python -m experiments.run\n" in f.read()


def test_replace_table_swaps_only_the_marked_block():
    text = f"intro\n{demo_table.BEGIN}\nold\n{demo_table.END}\noutro\n"
    assert demo_table.replace_table(text, "NEW") == "intro\nNEW\noutro\n"
    with pytest.raises(ValueError, match="lacks the markers"):
        demo_table.replace_table("no markers", "NEW")


@pytest.mark.slow
def test_the_main_command_scores_what_the_docs_record(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty_hf"), "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    row = demo_table.run_command((), str(tmp_path / "out"), env=env)
    want = recorded()["runs"][0]
    # Other CPUs and BLAS builds may move a few token assignments: within half a point, same image count.
    assert row["num_images_scored"] == want["num_images_scored"]
    assert abs(row["miou"] - want["miou"]) <= 0.5, (row, want)
