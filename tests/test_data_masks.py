"""GT masks (instalign_d2.data.masks): pycocotools decode of every segmentation format, union,
nearest-neighbour resize."""

import numpy as np
import pycocotools.mask as mask_util
import pytest

from instalign_d2.data.masks import (
    decode_segmentation,
    instance_masks,
    mask_area,
    mask_to_rle,
    merged_mask,
    resize_masks_nearest,
    valid_polygons,
)

H, W = 12, 10


def _box(y0, y1, x0, x1):
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _uncompressed_rle(mask):
    """Column-major run lengths starting with a run of zeros, written out by hand."""
    flat = mask.T.reshape(-1).astype(int)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [H, W], "counts": counts}


def test_polygon_decodes_like_pycocotools_and_drops_invalid_polygons():
    square = [1.0, 1.0, 6.0, 1.0, 6.0, 5.0, 1.0, 5.0]
    expected = mask_util.decode(mask_util.merge(mask_util.frPyObjects([square], H, W))).astype(bool)
    assert expected.sum() > 10
    # a 2-point "polygon" is invalid and ignored, not treated as a box by pycocotools
    got = decode_segmentation([square, [0.0, 0.0, 9.0, 11.0]], H, W)
    np.testing.assert_array_equal(got, expected)
    assert valid_polygons([[1, 2, 3, 4], square, [1, 2, 3, 4, 5]]) == [square]


def test_compressed_and_uncompressed_rle_decode_to_the_mask():
    mask = _box(2, 7, 3, 9) | _box(9, 11, 0, 2)
    compressed = mask_to_rle(mask)
    assert isinstance(compressed["counts"], str)  # as COCO JSON stores it
    np.testing.assert_array_equal(decode_segmentation(compressed, H, W), mask)
    np.testing.assert_array_equal(decode_segmentation(_uncompressed_rle(mask), H, W), mask)
    assert mask_area(compressed, H, W) == int(mask.sum()) == 30 + 4


def test_rle_of_another_size_is_rejected_with_the_sizes():
    with pytest.raises(ValueError, match=r"\[12, 10\]"):
        decode_segmentation({"size": [5, 5], "counts": [25]}, H, W)


def test_instance_masks_and_merged_mask_are_the_union():
    a, b = _box(0, 4, 0, 4), _box(2, 8, 2, 9)
    anns = [{"segmentation": mask_to_rle(a)}, {"segmentation": _uncompressed_rle(b)}]
    masks = instance_masks(anns, H, W)
    assert masks.shape == (2, H, W) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], a)
    np.testing.assert_array_equal(masks[1], b)
    np.testing.assert_array_equal(merged_mask(anns, H, W), a | b)
    assert merged_mask([], H, W).shape == (H, W) and not merged_mask([], H, W).any()
    assert instance_masks([], H, W).shape == (0, H, W)


def test_nearest_resize_repeats_or_samples_pixel_centres():
    rng = np.random.default_rng(0)
    mask = rng.random((H, W)) > 0.5
    # integer upscaling repeats every pixel
    up = resize_masks_nearest(mask, (3 * H, 2 * W))
    np.testing.assert_array_equal(up, mask.repeat(3, axis=0).repeat(2, axis=1))
    # integer downscaling takes the pixel at each output pixel's centre
    big = rng.random((48, 48)) > 0.5
    np.testing.assert_array_equal(resize_masks_nearest(big, 16), big[1::3, 1::3])
    stack = resize_masks_nearest(np.stack([mask, ~mask]), (3 * H, 2 * W))
    assert stack.shape == (2, 3 * H, 2 * W)
    np.testing.assert_array_equal(stack[1], ~up)


def test_merged_mask_at_out_size_equals_union_of_resized_masks():
    a, b = _box(0, 5, 0, 3), _box(4, 12, 6, 10)
    anns = [{"segmentation": mask_to_rle(a)}, {"segmentation": mask_to_rle(b)}]
    resized = resize_masks_nearest(np.stack([a, b]), 7)
    np.testing.assert_array_equal(merged_mask(anns, H, W, out_size=7), resized[0] | resized[1])
    assert resize_masks_nearest(np.zeros((0, H, W), bool), 7).shape == (0, 7, 7)
