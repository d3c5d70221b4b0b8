"""tools/compare_training_compute.py: variants stepped in turn, the schedule's seconds and ratios."""

import statistics

import pytest


def test_two_variants_side_by_side(load_tool, repo_root, tmp_path, tiny_training_opts, capsys):
    tool = load_tool("compare_training_compute")
    config = f"{repo_root}/configs/synthetic/instalign_tiny.yaml"
    rows = tool.main(
        ["--rounds", "3", "--warmup", "1", "--json", str(tmp_path / "c.json")]
        + ["--variant", "long", config, *tiny_training_opts, "SOLVER.MAX_ITER", "400"]
        + ["--variant", "short", config, *tiny_training_opts, "SOLVER.MAX_ITER", "100"]
    )
    assert [r["variant"] for r in rows] == ["long", "short"]
    assert [r["max_iter"] for r in rows] == [400, 100]
    for row in rows:
        assert len(row["steps"]) == 3 and all(s > 0 for s in row["steps"])
        assert row["seconds_per_step"] == statistics.median(row["steps"])
        assert row["training_seconds"] == pytest.approx(row["seconds_per_step"] * row["max_iter"])
    assert rows[0]["ratio_to_first"] == 1.0
    assert rows[1]["ratio_to_first"] == pytest.approx(
        rows[1]["training_seconds"] / rows[0]["training_seconds"]
    )
    out = capsys.readouterr().out
    assert "| short" in out and "threads" in out
    assert (tmp_path / "c.json").is_file()


def test_a_variant_needs_a_name_and_a_config(load_tool):
    tool = load_tool("compare_training_compute")
    with pytest.raises(SystemExit):
        tool.main(["--variant", "only-a-name"])
