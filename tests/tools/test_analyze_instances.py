"""tools/analyze_instances.py: the three IoUs on masks drawn by hand, and a run on a tiny model."""

import json

import pytest
import torch
from detectron2.data import DatasetCatalog


def boxes(size, *spans):
    """Boolean ``(len(spans), size, size)`` masks, each the rectangle rows r0:r1, columns c0:c1."""
    masks = torch.zeros(len(spans), size, size, dtype=torch.bool)
    for i, (r0, r1, c0, c1) in enumerate(spans):
        masks[i, r0:r1, c0:c1] = True
    return masks


def test_best_query_and_oracle_on_drawn_masks(load_tool):
    tool = load_tool("analyze_instances")
    left, right = boxes(10, (0, 4, 0, 4), (0, 4, 6, 10))  # two objects of 16 pixels
    truth = left | right
    exact, wide, straddling = boxes(10, (0, 4, 0, 4), (0, 4, 0, 10), (0, 10, 8, 10))
    # exact: the left object; wide: both objects and the gap between them (40 pixels);
    # straddling: 8 pixels of the right object and 12 below it; and an empty query
    queries = torch.stack([exact, wide, straddling, torch.zeros_like(exact)])
    assert tool.mask_iou(left, left) == 1.0
    assert tool.mask_iou(left, right) == 0.0
    assert tool.mask_iou(torch.zeros_like(left), torch.zeros_like(left)) == 0.0
    # left: the first query; right: the wide one covers it (16 / 40) better than the third (8 / 28)
    assert tool.best_query_ious(queries, torch.stack([left, right])) == pytest.approx(
        [1.0, 16 / 40]
    )
    # the oracle keeps the queries at least half inside the truth: the first (all inside), the
    # wide one (32 of 40 inside), not the third (8 of 20 inside) nor the empty one
    chosen = tool.oracle_union(queries, truth)
    assert torch.equal(chosen, queries[0] | queries[1])
    assert tool.mask_iou(chosen, truth) == pytest.approx(32 / 40)
    assert not tool.oracle_union(queries[2:], truth).any()


def test_run_on_a_tiny_model(load_tool, tmp_path, tiny_checkpoint, capsys):
    tool = load_tool("analyze_instances")
    out = tmp_path / "analysis.json"
    config, weights = tiny_checkpoint.config, tiny_checkpoint.weights
    assert tool.main(["--config-file", config, "--weights", weights, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    targets = [d for d in DatasetCatalog.get("synthetic_gres_val") if not d["empty"]]
    assert result["all"]["expressions"] == len(targets)
    groups = {d["expression_template"] for d in targets}
    assert groups | {"all"} == set(result) - {"weights", "dataset"}
    assert sum(result[g]["expressions"] for g in groups) == len(targets)
    for g in groups | {"all"}:
        assert all(0.0 <= result[g][m] <= 100.0 for m in tool.MEASURES)
    assert "best query IoU %" in capsys.readouterr().out
    assert tool.main(["--config-file", config, "--weights", str(tmp_path / "no.pth")]) == 2
