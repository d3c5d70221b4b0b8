"""tools/probe_features.py: the linear probe (its mask pooling is tested with the backbone pre-training)."""

import numpy as np


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
