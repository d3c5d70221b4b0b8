"""tools/probe_features.py: the linear probe and the matching of queries to objects (its mask pooling
is tested with the backbone pre-training)."""

from types import SimpleNamespace

import numpy as np
import pycocotools.mask as mask_util
import torch


def test_probe_reads_a_linearly_coded_label_and_not_noise(load_tool):
    probe = load_tool("probe_features")
    rng = np.random.default_rng(0)
    labels = rng.choice(["circle", "star", "cross"], size=300)
    codes = {"circle": [3, 0], "star": [0, 3], "cross": [-3, -3]}
    x = np.array([codes[c] for c in labels], dtype=float) + rng.normal(0, 0.5, size=(300, 2))
    x = np.concatenate([x, rng.normal(size=(300, 6))], axis=1)  # plus uninformative columns
    assert probe.fit_linear_probe(x[:200], labels[:200], x[200:], labels[200:]) > 0.97
    noise = rng.normal(size=(300, 8))
    assert probe.fit_linear_probe(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.55


class FakeModel:
    """Two queries per expression: query 0's mask is the left half of the image, query 1's a
    corner that covers no object; the query vectors say which expression they came from."""

    def __init__(self):
        self.calls = 0

    def encode_images(self, samples):
        return None

    def text_inputs(self, samples):
        return torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)

    def decode_expressions(self, visual, image_index, input_ids, attention_mask):
        self.calls += 1
        masks = torch.full((1, 2, 4, 4), -10.0)
        masks[0, 0, :, :2] = 10.0  # the left half: the left object
        masks[0, 1, 0, 3] = 10.0  # one corner cell: nothing
        queries = torch.full((1, 2, 3), float(self.calls))
        return {"predictions": [{"queries": queries, "mask_logits": masks}]}


def test_queries_are_matched_to_the_objects_their_masks_cover(load_tool, monkeypatch):
    probe = load_tool("probe_features")
    left = np.zeros((16, 16), np.uint8)
    left[:, :8] = 1
    right = 1 - left
    annotations = {
        image_id: [
            {"segmentation": mask_util.encode(np.asfortranarray(m)), **attributes}
            for m, attributes in (
                (left, {"shape": "star", "colour": "red", "size": "big"}),
                (right, {"shape": "circle", "colour": "blue", "size": "small"}),
            )
        ]
        for image_id in (1, 2, 3)
    }
    records = [  # image 1: three expressions with a target and a no-target one; then 2 and 3
        {"image_id": 1, "empty": True},
        {"image_id": 1, "empty": False},
        {"image_id": 1, "empty": False},
        {"image_id": 1, "empty": False},
        {"image_id": 2, "empty": False},
        {"image_id": 3, "empty": False},
    ]
    monkeypatch.setattr(probe, "DatasetCatalog", SimpleNamespace(get=lambda split: records))
    model = FakeModel()
    features, labels = probe.query_features(
        model, lambda record: {"image": torch.zeros(3, 16, 16)}, "val", 2, annotations, 2
    )
    # Two expressions of image 1 (at most 2 per image, the no-target one skipped), one of image 2,
    # none of image 3 (2 images); one query each covers an object, the left one.
    assert model.calls == 3
    assert features[:, 0].tolist() == [1.0, 2.0, 3.0]
    assert labels["shape"] == ["star"] * 3 and labels["colour"] == ["red"] * 3
