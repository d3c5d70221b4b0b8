"""GRESDatasetMapper: shapes, dtypes and values of train and test outputs, bad samples, image modes."""

import copy

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T
from PIL import Image

from instalign_d2.config import add_instalign_config
from instalign_d2.data.dataset_mapper import GRESDatasetMapper
from instalign_d2.data.image_io import read_image_uint8
from instalign_d2.data.masks import instance_masks, mask_to_rle, merged_mask
from instalign_d2.synthetic.text_encoder import write_local_text_encoder
from instalign_d2.utils.tokenizer import load_tokenizer

H, W, S, MAX_TOKENS = 24, 36, 16, 12
CORPUS = [
    "the red circle",
    "the blue square and the red circle",
    "all triangles",
    "the green star on the left",
]


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    return write_local_text_encoder(
        str(tmp_path_factory.mktemp("enc") / "text_encoder"), CORPUS, max_tokens=MAX_TOKENS
    )


@pytest.fixture(scope="module")
def sample_image(tmp_path_factory):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("img") / "image.png"
    Image.fromarray(pixels).save(path)
    return str(path), pixels


def _box(y0, y1, x0, x1):
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


ANNOTATIONS = [
    {
        "id": 1,
        "category_id": 7,
        "bbox": [2, 3, 10, 9],
        "segmentation": [[2.0, 3.0, 12.0, 3.0, 12.0, 12.0, 2.0, 12.0]],
    },
    {
        "id": 2,
        "category_id": 9,
        "bbox": [20, 10, 15, 12],
        "segmentation": mask_to_rle(_box(10, 22, 20, 35)),
    },
]


def _dict(file_name, annotations, raw="the blue square and the red circle", **extra):
    return {
        "file_name": file_name,
        "height": H,
        "width": W,
        "image_id": 5,
        "annotations": annotations,
        "sentence": {"raw": raw, "sent_id": 11, "ref_id": 3},
        "empty": not annotations,
        "expression_kind": (
            "multi" if len(annotations) > 1 else ("single" if annotations else "no_target")
        ),
        "source": "grefcoco",
        **extra,
    }


def _mapper(text_encoder, is_train=True, **kwargs):
    return GRESDatasetMapper(
        is_train, image_size=S, text_encoder_name=text_encoder, max_tokens=MAX_TOKENS, **kwargs
    )


@pytest.mark.parametrize("is_train", [True, False])
def test_output_fields_shapes_and_values(text_encoder, sample_image, is_train):
    path, pixels = sample_image
    record = _dict(path, ANNOTATIONS, expression_template="conjunction")
    before = copy.deepcopy(record)
    out = _mapper(text_encoder, is_train)(record)
    assert record == before  # the dataset dict is not modified

    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, S, S)
    expected_image = np.asarray(Image.fromarray(pixels).resize((S, S), Image.BILINEAR))
    np.testing.assert_array_equal(out["image"].permute(1, 2, 0).numpy(), expected_image)

    inst = out["instances"]
    assert inst.image_size == (S, S)
    assert inst.gt_masks.dtype == torch.bool and inst.gt_masks.shape == (2, S, S)
    assert inst.gt_classes.dtype == torch.int64 and inst.gt_classes.tolist() == [7, 9]
    for i, ann in enumerate(ANNOTATIONS):
        np.testing.assert_array_equal(
            inst.gt_masks[i].numpy(), merged_mask([ann], H, W, out_size=S)
        )
    assert out["gt_mask_merged"].dtype == torch.bool and out["gt_mask_merged"].shape == (S, S)
    np.testing.assert_array_equal(
        out["gt_mask_merged"].numpy(), merged_mask(ANNOTATIONS, H, W, out_size=S)
    )
    assert out["gt_mask_merged"].any() and not out["empty"]

    tokenizer = load_tokenizer(text_encoder)
    real_ids = tokenizer("the blue square and the red circle")["input_ids"]
    assert tokenizer.pad_token_id == 1 and tokenizer.unk_token_id not in real_ids
    assert out["input_ids"].dtype == torch.int64 and out["input_ids"].shape == (MAX_TOKENS,)
    assert out["input_ids"].tolist() == real_ids + [1] * (MAX_TOKENS - len(real_ids))
    assert out["attention_mask"].tolist() == [1] * len(real_ids) + [0] * (
        MAX_TOKENS - len(real_ids)
    )

    for key in (
        "height",
        "width",
        "file_name",
        "image_id",
        "sentence",
        "expression_kind",
        "source",
        "expression_template",
    ):
        assert out[key] == record[key]
    assert (out["height"], out["width"]) == (H, W)
    assert "skipped_reason" not in out and "gt_mask_merged_original" not in out


def test_no_target_sample_has_no_instances_and_an_empty_mask(text_encoder, sample_image):
    out = _mapper(text_encoder)(
        _dict(sample_image[0], [], raw="the red circle", refzom_kind="one_to_zero")
    )
    assert (
        out["empty"] is True
        and out["expression_kind"] == "no_target"
        and out["refzom_kind"] == "one_to_zero"
    )
    assert out["instances"].gt_masks.shape == (0, S, S) and out["instances"].gt_classes.shape == (
        0,
    )
    assert out["gt_mask_merged"].shape == (S, S) and not out["gt_mask_merged"].any()


def test_original_resolution_mask_for_evaluation(text_encoder, sample_image):
    out = _mapper(text_encoder, False, eval_resolution="original")(
        _dict(sample_image[0], ANNOTATIONS)
    )
    original = out["gt_mask_merged_original"]
    assert original.dtype == torch.bool and original.shape == (H, W)
    np.testing.assert_array_equal(original.numpy(), _box(3, 12, 2, 12) | _box(10, 22, 20, 35))
    np.testing.assert_array_equal(original.numpy(), merged_mask(ANNOTATIONS, H, W))
    empty = _mapper(text_encoder, False, eval_resolution="original")(_dict(sample_image[0], []))
    assert (
        empty["gt_mask_merged_original"].shape == (H, W)
        and not empty["gt_mask_merged_original"].any()
    )


@pytest.mark.parametrize("content", [None, b"not an image at all", "wrong_size"])
def test_bad_image_train_returns_none_test_reports_reason(text_encoder, tmp_path, caplog, content):
    path = tmp_path / "bad.png"
    if content == "wrong_size":
        Image.new("RGB", (W + 1, H)).save(path)
    elif content is not None:
        path.write_bytes(content)
    record = _dict(str(path), ANNOTATIONS)
    train_mapper = _mapper(text_encoder, True)
    assert train_mapper(record) is None
    assert "skipping ref 3" in caplog.text and train_mapper.num_skipped == 1
    out = _mapper(text_encoder, False)(record)
    reason = out["skipped_reason"]
    assert isinstance(reason, str) and "\n" not in reason and str(path) in reason
    expected_word = {
        None: "not found",
        b"not an image at all": "unreadable",
        "wrong_size": "37x24",
    }[content]
    assert expected_word in reason
    assert out["image"].shape == (3, S, S) and not out["image"].any()
    # the ground truth is still there; the evaluator decides to leave the sample out
    np.testing.assert_array_equal(
        out["gt_mask_merged"].numpy(), merged_mask(ANNOTATIONS, H, W, out_size=S)
    )


def test_bgr_format_reverses_channels(text_encoder, sample_image):
    rgb = _mapper(text_encoder)(_dict(sample_image[0], ANNOTATIONS))["image"]
    bgr = _mapper(text_encoder, image_format="BGR")(_dict(sample_image[0], ANNOTATIONS))["image"]
    assert torch.equal(bgr, rgb.flip(0))
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        read_image_uint8(sample_image[0], "L")


def test_image_modes_come_out_as_three_channel_uint8(tmp_path):
    gray = np.tile(np.arange(0, 240, 10, dtype=np.uint8), (4, 1))  # 4 x 24
    Image.fromarray(gray, mode="L").save(tmp_path / "gray.png")
    out = read_image_uint8(str(tmp_path / "gray.png"))
    assert out.shape == (4, 24, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], gray)

    Image.new("RGBA", (5, 3), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_image_uint8(str(tmp_path / "rgba.png"))[0, 0], [10, 20, 30])

    sixteen = np.full((3, 5), 32896, dtype=np.uint16)  # 128 * 257: mid grey in 16 bits
    sixteen[0, 0] = 65535
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    out = read_image_uint8(str(tmp_path / "gray16.png"))
    assert out.shape == (3, 5, 3) and out.dtype == np.uint8
    assert out[1, 1].tolist() == [128, 128, 128] and out[0, 0].tolist() == [255, 255, 255]

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    red = read_image_uint8(str(tmp_path / "cmyk.jpg"))[2, 2].astype(int)
    assert red.shape == (3,) and red[0] > 240 and red[1] < 15 and red[2] < 15

    Image.new("RGB", (4, 4), (0, 200, 0)).convert("P", palette=Image.ADAPTIVE).save(
        tmp_path / "palette.png"
    )
    assert read_image_uint8(str(tmp_path / "palette.png"))[0, 0].tolist() == [0, 200, 0]


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((10, 20, 3), np.uint8)  # stored 20 wide, 10 high; left half red
    stored[:, :10] = (255, 0, 0)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    out = read_image_uint8(str(tmp_path / "rotated.jpg"))
    assert out.shape == (20, 10, 3)  # displayed 10 wide, 20 high
    assert out[2, 5, 0] > 200 and out[17, 5, 0] < 50  # the red half is now on top


def _cfg(text_encoder):
    cfg = get_cfg()
    add_instalign_config(cfg)
    cfg.INPUT.IMAGE_SIZE = S
    cfg.MODEL.TEXT_ENCODER.NAME = text_encoder
    cfg.MODEL.TEXT_ENCODER.MAX_TOKENS = MAX_TOKENS
    return cfg


def test_from_config_and_augmentation(text_encoder, sample_image):
    cfg = _cfg(text_encoder)
    mapper = GRESDatasetMapper(cfg, True)
    assert (mapper.image_size, mapper.max_tokens, mapper.image_format) == (S, MAX_TOKENS, "RGB")
    assert mapper.augmentations == []  # off by default, as the paper
    cfg.INPUT.AUGMENT.ENABLED = True
    augmented = GRESDatasetMapper(cfg, True)
    assert [type(a) for a in augmented.augmentations] == [
        T.RandomCrop,
        T.RandomBrightness,
        T.RandomContrast,
        T.RandomSaturation,
    ]
    assert not any(
        isinstance(a, T.RandomFlip) for a in augmented.augmentations
    )  # would swap left/right
    assert GRESDatasetMapper(cfg, False).augmentations == []  # never at test time

    # every crop the mapper keeps leaves at least 80 % of each target's pixels
    masks = instance_masks(ANNOTATIONS, H, W)
    np.random.seed(0)
    for _ in range(20):
        transforms = augmented._augment(sample_image[1], masks)
        kept = (
            np.stack([transforms.apply_segmentation(m.astype(np.uint8)) for m in masks])
            .reshape(2, -1)
            .sum(1)
        )
        assert np.all(kept >= 0.8 * masks.reshape(2, -1).sum(1))
    out = augmented(_dict(sample_image[0], ANNOTATIONS))
    assert out["image"].shape == (3, S, S) and out["instances"].gt_masks.shape == (2, S, S)


def test_bad_settings_are_named(text_encoder):
    with pytest.raises(ValueError, match="EVAL_RESOLUTION"):
        _mapper(text_encoder, eval_resolution="native")


def test_expressions_of_one_image_share_one_input_tensor_without_augmentation(
    text_encoder, sample_image, tmp_path
):
    path, pixels = sample_image
    other = tmp_path / "other.png"
    Image.fromarray(255 - pixels).save(other)
    mapper = _mapper(text_encoder, True)
    first = mapper(_dict(path, ANNOTATIONS))
    second = mapper(_dict(path, ANNOTATIONS[:1], raw="the red circle"))
    assert second["image"] is first["image"]
    third = mapper(_dict(str(other), ANNOTATIONS))
    assert third["image"] is not first["image"]
    expected = np.asarray(Image.fromarray(255 - pixels).resize((S, S), Image.BILINEAR))
    np.testing.assert_array_equal(third["image"].permute(1, 2, 0).numpy(), expected)
    # the masks are still the expression's own
    assert second["instances"].gt_masks.shape == (1, S, S)


def test_augmented_expressions_get_their_own_input_tensor(text_encoder, sample_image):
    cfg = _cfg(text_encoder)
    cfg.INPUT.AUGMENT.ENABLED = True
    mapper = GRESDatasetMapper(cfg, True)
    np.random.seed(0)
    first = mapper(_dict(sample_image[0], ANNOTATIONS))
    second = mapper(_dict(sample_image[0], ANNOTATIONS))
    assert second["image"] is not first["image"]
    assert not torch.equal(second["image"], first["image"])  # a different random crop


def test_a_new_image_size_is_used_from_the_next_sample_of_the_same_image(
    text_encoder, sample_image
):
    """A coarse-to-fine schedule changes ``image_size`` between samples; the input tensor kept for
    the image's next expression must not be the one of the old size."""
    mapper = _mapper(text_encoder, True)
    coarse = mapper(_dict(sample_image[0], ANNOTATIONS))
    mapper.image_size = S // 2
    fine = mapper(_dict(sample_image[0], ANNOTATIONS))
    assert tuple(coarse["image"].shape[1:]) == (S, S)
    assert tuple(fine["image"].shape[1:]) == (S // 2, S // 2)
    assert fine["instances"].gt_masks.shape[1:] == (S // 2, S // 2)
    assert tuple(fine["gt_mask_merged"].shape[-2:]) == (S // 2, S // 2)


def _images(tmp_path, pixels, count):
    paths = []
    for k in range(count):
        path = tmp_path / f"image{k}.png"
        Image.fromarray(np.roll(pixels, 7 * k, axis=1)).save(path)
        paths.append(str(path))
    return paths


def _count_reads(monkeypatch):
    import instalign_d2.data.dataset_mapper as mapper_module

    reads = []

    def counting_read(file_name, image_format):
        reads.append(file_name)
        return read_image_uint8(file_name, image_format)

    monkeypatch.setattr(mapper_module, "read_image_uint8", counting_read)
    return reads


@pytest.mark.parametrize("is_train", [True, False])
def test_input_cache_keeps_resized_images_for_the_next_epoch(
    text_encoder, sample_image, tmp_path, monkeypatch, is_train
):
    paths = _images(tmp_path, sample_image[1], 3)
    reads = _count_reads(monkeypatch)
    uncached = _mapper(text_encoder, is_train)
    cached = _mapper(text_encoder, is_train, cache_mb=1)
    first_epoch = [cached(_dict(p, ANNOTATIONS)) for p in paths]
    second_epoch = [cached(_dict(p, ANNOTATIONS[1:], raw="the red circle")) for p in paths]
    assert reads == paths  # each image decoded once (the uncached mapper has read nothing yet)
    for before, after, path in zip(first_epoch, second_epoch, paths):
        assert after["image"] is before["image"]
        reference = uncached(_dict(path, ANNOTATIONS[1:], raw="the red circle"))
        torch.testing.assert_close(after["image"], reference["image"], rtol=0, atol=0)
        # the masks and tokens are still the expression's own
        assert torch.equal(after["instances"].gt_masks, reference["instances"].gt_masks)
        assert torch.equal(after["input_ids"], reference["input_ids"])
    # without a budget only the last image is kept
    reads.clear()
    [uncached(_dict(p, ANNOTATIONS)) for p in paths + paths[-1:]]
    assert reads == paths


def test_input_cache_drops_the_least_recently_used_image_beyond_its_budget(
    text_encoder, sample_image, tmp_path, monkeypatch
):
    paths = _images(tmp_path, sample_image[1], 3)
    reads = _count_reads(monkeypatch)
    two_images = 2 * 3 * S * S / 2**20  # megabytes of two uint8 inputs
    mapper = _mapper(text_encoder, True, cache_mb=two_images)
    for p in (paths[0], paths[1], paths[0], paths[2]):  # image 1 is the least recently used
        mapper(_dict(p, ANNOTATIONS))
    assert reads == [paths[0], paths[1], paths[2]]
    reads.clear()
    for p in (paths[0], paths[2], paths[1]):
        mapper(_dict(p, ANNOTATIONS))
    assert reads == [paths[1]]


def _augmenting_mapper(text_encoder, cache_mb):
    cfg = _cfg(text_encoder)
    cfg.INPUT.AUGMENT.ENABLED = True
    cfg.INPUT.CACHE_MB = cache_mb
    return GRESDatasetMapper(cfg, True)


def test_input_cache_is_not_used_with_augmentation_and_rejects_a_negative_budget(
    text_encoder, sample_image, monkeypatch
):
    mapper = _augmenting_mapper(text_encoder, cache_mb=64)
    reads = _count_reads(monkeypatch)
    np.random.seed(0)
    mapper(_dict(sample_image[0], ANNOTATIONS))
    mapper._last_image = (None, None)  # forget the decoded image: only the input cache is left
    mapper(_dict(sample_image[0], ANNOTATIONS))
    assert len(reads) == 2 and not mapper._inputs
    with pytest.raises(ValueError, match="INPUT.CACHE_MB"):
        _mapper(text_encoder, cache_mb=-1)


def _count_calls(monkeypatch, *names):
    """Count the mapper module's calls of the functions ``names``."""
    import instalign_d2.data.dataset_mapper as mapper_module

    calls = {name: 0 for name in names}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    for name in names:
        monkeypatch.setattr(mapper_module, name, counting(name, getattr(mapper_module, name)))
    return calls


@pytest.mark.parametrize("is_train", [True, False])
def test_a_budget_keeps_each_annotations_mask_and_each_expressions_tokens(
    text_encoder, sample_image, tmp_path, monkeypatch, is_train
):
    paths = _images(tmp_path, sample_image[1], 2)
    samples = [
        d
        for p in paths
        for d in (
            _dict(p, ANNOTATIONS),
            _dict(p, ANNOTATIONS[1:], raw="the red circle"),
            _dict(p, [], raw="all triangles"),
        )
    ]
    uncached = _mapper(text_encoder, is_train)
    expected = [uncached(d) for d in samples]
    calls = _count_calls(monkeypatch, "instance_masks", "transform_masks", "tokenize")
    cached = _mapper(text_encoder, is_train, cache_mb=1)
    [cached(d) for d in samples]
    # the first epoch decodes each image's annotations once (the second expression's annotation
    # is one of the first's; the third has none) and tokenises each of the three texts once
    assert calls == {"instance_masks": 2, "transform_masks": 2, "tokenize": 3}
    calls.update(dict.fromkeys(calls, 0))
    second_epoch = [cached(d) for d in samples]
    assert calls == {"instance_masks": 0, "transform_masks": 0, "tokenize": 0}
    for got, want in zip(second_epoch, expected):
        assert torch.equal(got["instances"].gt_masks, want["instances"].gt_masks)
        assert torch.equal(got["instances"].gt_classes, want["instances"].gt_classes)
        assert torch.equal(got["gt_mask_merged"], want["gt_mask_merged"])
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])
    # a sample's masks are its own: writing into them changes no later sample
    second_epoch[0]["instances"].gt_masks.zero_()
    again = cached(samples[0])
    assert torch.equal(again["instances"].gt_masks, expected[0]["instances"].gt_masks)


def test_masks_are_not_kept_under_augmentation_or_without_annotation_ids(
    text_encoder, sample_image, monkeypatch
):
    augmented = _augmenting_mapper(text_encoder, cache_mb=64)
    without_ids = _mapper(text_encoder, True, cache_mb=64)
    no_ids = [{k: v for k, v in a.items() if k != "id"} for a in ANNOTATIONS]
    calls = _count_calls(monkeypatch, "instance_masks", "tokenize")
    np.random.seed(0)
    for _ in range(2):
        augmented(_dict(sample_image[0], ANNOTATIONS))
        without_ids(_dict(sample_image[0], no_ids))
    assert calls == {"instance_masks": 4, "tokenize": 2}  # each mapper keeps its tokens
    assert len(augmented._parts) == 1 and len(without_ids._parts) == 1


# An object over part of the first annotation's square, listed after it.
ON_TOP = {
    "id": 3,
    "category_id": 4,
    "bbox": [4, 5, 4, 4],
    "segmentation": mask_to_rle(_box(5, 9, 4, 8)),
}


def test_category_map_names_the_object_at_each_pixel_and_is_kept(
    text_encoder, sample_image, monkeypatch
):
    objects = ANNOTATIONS + [ON_TOP]
    expected = np.zeros((S, S), np.uint8)
    for obj in objects:  # a later object over an earlier one
        expected[merged_mask([obj], H, W, out_size=S)] = obj["category_id"]
    assert {7, 9, 4, 0} <= set(np.unique(expected).tolist())
    mapper = _mapper(text_encoder, True, cache_mb=1, category_maps=True)
    calls = _count_calls(monkeypatch, "instance_masks")
    first = mapper(_dict(sample_image[0], ANNOTATIONS[:1], image_annotations=objects))
    assert first["category_map"].dtype == torch.uint8
    np.testing.assert_array_equal(first["category_map"].numpy(), expected)
    # another expression of the image (no target) gets the same map without decoding again
    calls.update(instance_masks=0)
    second = mapper(_dict(sample_image[0], [], raw="all triangles", image_annotations=objects))
    assert calls == {"instance_masks": 0}
    np.testing.assert_array_equal(second["category_map"].numpy(), expected)
    # none without the switch or without the image's objects
    plain = _mapper(text_encoder, True)(
        _dict(sample_image[0], ANNOTATIONS, image_annotations=objects)
    )
    assert "category_map" not in plain
    assert "category_map" not in mapper(_dict(sample_image[0], ANNOTATIONS))
    too_many = [dict(ANNOTATIONS[0], category_id=300)]
    with pytest.raises(ValueError, match="category_id 300 does not fit"):
        _mapper(text_encoder, True, category_maps=True)(
            _dict(sample_image[0], ANNOTATIONS, image_annotations=too_many)
        )


def test_category_maps_follow_the_config_in_training_only(text_encoder):
    cfg = _cfg(text_encoder)
    assert not GRESDatasetMapper(cfg, True).category_maps
    cfg.MODEL.INSTALIGN.DENSE_CATEGORY_WEIGHT = 2.0
    assert GRESDatasetMapper(cfg, True).category_maps
    assert not GRESDatasetMapper(cfg, False).category_maps
