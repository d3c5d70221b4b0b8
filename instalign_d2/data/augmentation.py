"""Optional train-time augmentation of the GRES mapper (off by default, as in the paper).

Photometric jitter and a random crop. Never a horizontal flip: it would swap "left" and "right"
in the expressions. A crop could also cut a target out of the image while the expression still
names it; the mapper therefore keeps a crop only when every target keeps most of its pixels
(:data:`MIN_TARGET_KEPT`), else it tries again and finally uses no crop.
"""

from __future__ import annotations

from typing import List

from detectron2.data import transforms as T

MIN_TARGET_KEPT = 0.8  # share of each target instance's pixels a crop must keep
CROP_TRIES = 5


def build_gres_augmentations(
    *,
    enabled: bool,
    scale_range=(0.8, 1.0),
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
) -> List[T.Augmentation]:
    """The augmentations applied before the resize to S x S (empty when disabled).

    Args:
        enabled: INPUT.AUGMENT.ENABLED.
        scale_range: each side of the random crop keeps a fraction drawn from this range
            (1.0 disables the crop).
        brightness, contrast, saturation: jitter strengths, e.g. 0.2 -> factors in [0.8, 1.2]
            (0 disables one).
    """
    if not enabled:
        return []
    augs: List[T.Augmentation] = []
    low = float(min(scale_range))
    if not 0 < low <= 1:
        raise ValueError(
            f"INPUT.AUGMENT.SCALE_RANGE={tuple(scale_range)}: expected fractions in (0, 1]"
        )
    if low < 1:
        augs.append(T.RandomCrop("relative_range", (low, low)))
    for strength, aug in (
        (brightness, T.RandomBrightness),
        (contrast, T.RandomContrast),
        (saturation, T.RandomSaturation),
    ):
        if strength > 0:
            augs.append(aug(1 - strength, 1 + strength))
    return augs
