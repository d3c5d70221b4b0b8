"""tools/profile_train_step.py: nested self times add up, and a real step is broken down."""

import time

import pytest


def test_section_timer_subtracts_inner_sections(load_tool):
    timer = load_tool("profile_train_step").SectionTimer()
    with timer.section("outer"):
        time.sleep(0.02)
        with timer.section("inner"):
            time.sleep(0.05)
        time.sleep(0.02)
    assert timer.totals["inner"] == pytest.approx(0.05, abs=0.02)
    assert timer.totals["outer"] == pytest.approx(0.04, abs=0.02)


def test_profile_of_a_tiny_config(load_tool, repo_root, tmp_path, tiny_training_opts, capsys):
    tool = load_tool("profile_train_step")
    config = f"{repo_root}/configs/synthetic/instalign_tiny.yaml"
    out = tool.main(
        [
            "--config-file",
            config,
            "--iters",
            "2",
            "--warmup",
            "1",
            "--json",
            str(tmp_path / "p.json"),
        ]
        + ["--opts", *tiny_training_opts]
    )
    seconds = out["seconds"]
    assert out["missing_parts"] == []
    # every part of Fig. 2, the matcher, the losses, backward and the optimizer took time
    assert all(seconds[row] > 0 for row in tool.ROWS), seconds
    # self times: the rows add up to the step (the step's own bookkeeping aside)
    assert sum(seconds[row] for row in tool.ROWS) == pytest.approx(seconds["step"], rel=0.02)
    assert out["expressions_per_step"] > 2  # images come with several of their expressions
    table = capsys.readouterr().out
    assert "| matcher (Eq. 5-6)" in table and "peak_rss_mib" in table
    assert (tmp_path / "p.json").is_file()
