"""tools/probe_features.py: the linear probe and the mask pooling it rests on."""
import importlib.util
import os

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_tool():
    spec = importlib.util.spec_from_file_location("probe_features", os.path.join(ROOT, "tools", "probe_features.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_reads_a_linearly_coded_label_and_not_noise():
    probe = load_tool()
    rng = np.random.default_rng(0)
    labels = rng.choice(["circle", "star", "cross"], size=300)
    codes = {"circle": [3, 0], "star": [0, 3], "cross": [-3, -3]}
    x = np.array([codes[c] for c in labels], dtype=float) + rng.normal(0, 0.5, size=(300, 2))
    x = np.concatenate([x, rng.normal(size=(300, 6))], axis=1)  # plus uninformative columns
    assert probe.fit_linear_probe(x[:200], labels[:200], x[200:], labels[200:]) > 0.97
    noise = rng.normal(size=(300, 8))
    assert probe.fit_linear_probe(noise[:200], labels[:200], noise[200:], labels[200:]) < 0.55


def test_pooling_averages_the_features_under_the_mask():
    probe = load_tool()
    features = torch.zeros(2, 4, 4)
    features[0, :2, :2] = 1.0  # channel 0 lights up the top-left quarter only
    features[1] = 5.0
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1  # the object covers that quarter at twice the resolution
    pooled = probe.pool_over_mask(features, mask)
    assert torch.allclose(pooled, torch.tensor([1.0, 5.0]))
    mask[:4, 4:] = 1  # and now as much of the neighbouring quarter, where channel 0 is 0
    assert torch.allclose(probe.pool_over_mask(features, mask), torch.tensor([0.5, 5.0]))
