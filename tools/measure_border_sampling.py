#!/usr/bin/env python
"""How many of the importance-sampled points of the instance mask loss fall where the zero padding
of ``point_sample`` blends into the values? Measured on synthetic object masks as drawn (the
generator keeps every object inside the image) and moved so that an image edge cuts them.

    python tools/measure_border_sampling.py                 # tiny config and paper resolutions
    python tools/measure_border_sampling.py --scenes 40 --seed 1

The instance mask loss (Mask2Former's, ``InstAlignCriterion.point_sampled_mask_loss``) samples the
ground truth and the stride-4 mask logits at points in [0, 1]^2 with ``align_corners=False``: a
point closer to the border than half a pixel lies beyond the last pixel centre, and bilinear
sampling mixes in the zero padding. There a mask that touches the border gets a label below 1 (the
"label band", half a ground-truth pixel wide), and every logit is pulled towards 0 (the "logit
band", half a mask-logit pixel wide: 4 ground-truth pixels). Importance sampling keeps the points
whose logit is nearest 0, which the logit band makes its points. For each resolution this prints,
under importance sampling (the loss) and under uniform sampling (for comparison), the share of the
sampled points in each band and the share of the loss's BCE that the label band carries, for two
predictions of each mask: a confident one (logit ``8 * (2 * area fraction - 1)`` at stride 4, as a
trained model gives) and an untrained one (Gaussian logits, std 2). The synthetic generator never
lets an object touch the border, so its masks have no label band; the "cut by an edge" masks are
the same masks shifted (zero fill) so that 20-50 % of their extent lies beyond one image edge, as
objects in photographs often do.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.projects.point_rend.point_features import (  # noqa: E402
    get_uncertain_point_coords_with_randomness,
)

from instalign_d2.synthetic.scene import generate_scene  # noqa: E402

# (name, ground-truth side, mask-logit side, points per mask) of the tiny config and the paper.
SETTINGS = (("tiny config", 128, 32, 1024), ("paper", 480, 120, 12544))
OVERSAMPLE_RATIO, IMPORTANCE_SAMPLE_RATIO = 3.0, 0.75  # Mask2Former's, ours


def touches_border(mask: np.ndarray) -> bool:
    return bool(mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


def synthetic_masks(side: int, scenes: int, rng: np.random.Generator) -> List[np.ndarray]:
    """The visible masks of the objects of ``scenes`` synthetic scenes."""
    return [obj.mask for _ in range(scenes) for obj in generate_scene(side, rng).objects]


def cut_by_an_edge(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``mask`` shifted (zero fill) so that 20-50 % of its extent lies beyond one image edge."""
    side = mask.shape[0]
    ys, xs = np.nonzero(mask)
    axis, towards_start = int(rng.integers(2)), bool(rng.integers(2))
    low, high = (ys.min(), ys.max()) if axis == 0 else (xs.min(), xs.max())
    outside = int(round(rng.uniform(0.2, 0.5) * (high - low + 1)))
    shift = -(low + outside) if towards_start else side - 1 - high + outside
    moved = np.roll(mask, shift, axis=axis)
    index = [slice(None), slice(None)]
    index[axis] = slice(shift, None) if shift < 0 else slice(0, shift)
    moved[tuple(index)] = False  # what np.roll brought round from the other side
    return moved


def _sample(values: torch.Tensor, points: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``(K, H, W)`` values at ``(K, P, 2)`` points in [0, 1]^2 -> ``(K, P)`` (as point_sample)."""
    grid = (2.0 * points - 1.0)[:, :, None]  # (K, P, 1, 2)
    out = F.grid_sample(
        values[:, None], grid, mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    return out[:, 0, :, 0]


def predictions(gt: torch.Tensor, logit_side: int, generator: torch.Generator) -> Dict:
    """A confident and an untrained prediction of each ``(K, H, W)`` mask at the logits' side."""
    fraction = F.adaptive_avg_pool2d(gt[:, None], logit_side)[:, 0]
    noise = torch.randn(gt.shape[0], logit_side, logit_side, generator=generator)
    return {"confident": 8.0 * (2.0 * fraction - 1.0), "untrained": 2.0 * noise}


def measure(gt: torch.Tensor, logits: torch.Tensor, num_points: int, importance: bool) -> Dict:
    """Shares of the sampled points in the logit band and the label band (where the zero padding
    changes the sampled value), and the label band's share of the points' BCE."""
    k = gt.shape[0]
    if importance:  # as InstAlignCriterion.point_sampled_mask_loss draws them
        points = get_uncertain_point_coords_with_randomness(
            logits[:, None],
            lambda x: -x.abs(),
            num_points,
            OVERSAMPLE_RATIO,
            IMPORTANCE_SAMPLE_RATIO,
        )
    else:
        points = torch.rand(k, num_points, 2)
    labels = _sample(gt, points, "zeros")
    point_logits = _sample(logits, points, "zeros")
    label_band = (labels - _sample(gt, points, "border")).abs() > 1e-6
    logit_band = (point_logits - _sample(logits, points, "border")).abs() > 1e-6
    bce = F.binary_cross_entropy_with_logits(point_logits, labels, reduction="none")
    return {
        "logit band": logit_band.float().mean().item(),
        "label band": label_band.float().mean().item(),
        "label band's BCE": (bce * label_band).sum().item() / max(bce.sum().item(), 1e-12),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=20, help="synthetic scenes per resolution")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rows = []
    for name, side, logit_side, num_points in SETTINGS:
        rng = np.random.default_rng(args.seed)
        drawn = synthetic_masks(side, args.scenes, rng)
        cut = [cut_by_an_edge(m, rng) for m in drawn]
        assert all(touches_border(m) and m.any() for m in cut)
        mask_sets = {
            f"as drawn ({sum(map(touches_border, drawn))} of {len(drawn)} touch the border)": drawn,
            f"cut by an edge ({len(cut)})": cut,
        }
        generator = torch.Generator().manual_seed(args.seed)
        torch.manual_seed(args.seed)
        for set_name, masks in mask_sets.items():
            gt = torch.from_numpy(np.stack(masks)).float()
            for kind, logits in predictions(gt, logit_side, generator).items():
                for importance in (True, False):
                    shares = measure(gt, logits, num_points, importance)
                    rows.append(
                        [
                            f"{name}: {side}px, logits {logit_side}px, {num_points} points",
                            set_name,
                            kind,
                            "importance" if importance else "uniform",
                            *(f"{100 * v:.2f} %" for v in shares.values()),
                        ]
                    )
    headers = ["resolution", "synthetic masks", "prediction", "sampling"]
    print(tabulate(rows, headers=headers + ["logit band", "label band", "label band's BCE"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
