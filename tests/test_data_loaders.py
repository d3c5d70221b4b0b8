"""Loaders of gRefCOCO, Ref-ZOM and RefCOCO/+/g on tiny hand-written files of each format, and
their registration under $DETECTRON2_DATASETS."""

import json
import logging
import os
import pickle

import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode

import instalign_d2.data  # noqa: F401  (registers the datasets)
from instalign_d2.data.datasets.grefcoco import load_grefcoco_json
from instalign_d2.data.datasets.refer_common import DatasetLayoutError
from instalign_d2.data.masks import merged_mask

H1, W1 = 20, 30  # image 1
H2, W2 = 16, 16  # image 2


def _rle_of(mask, as_str=True):
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "size": [int(s) for s in rle["size"]],
        "counts": rle["counts"].decode() if as_str else rle["counts"],
    }


def _annotation(ann_id, image_id, category_id, bbox, segmentation, iscrowd=0):
    """An entry of a COCO ``instances.json``."""
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "iscrowd": iscrowd,
        "segmentation": segmentation,
    }


MASK_102 = np.zeros((H1, W1), bool)
MASK_102[10:15, 20:28] = True
MASK_103 = np.zeros((H1, W1), bool)
MASK_103[0:4, 25:30] = True
# MASK_103 as COCO's uncompressed RLE, counted by hand: column-major runs starting with zeros, so
# the 25 empty columns (25 * 20 pixels), then in each of the last 5 columns 4 ones and 16 zeros.
RLE_103 = {"size": [H1, W1], "counts": [25 * H1] + [4, H1 - 4] * 5}
POLY_101 = [2.0, 2.0, 10.0, 2.0, 10.0, 8.0, 2.0, 8.0]
POLY_104 = [12.0, 12.0, 18.0, 12.0, 15.0, 18.0]

ANNOTATIONS = [
    _annotation(101, 1, 1, [2, 2, 8, 6], [POLY_101]),
    _annotation(102, 1, 2, [20, 10, 8, 5], _rle_of(MASK_102)),
    _annotation(103, 1, 3, [25, 0, 5, 4], RLE_103),
    # one invalid polygon (2 points) beside a valid one: the invalid one is dropped
    _annotation(104, 1, 1, [12, 12, 6, 6], [[1.0, 1.0, 3.0, 3.0], POLY_104]),
    _annotation(105, 1, 4, [0, 0, 5, 5], _rle_of(np.ones((H1, W1), bool)), iscrowd=1),
    _annotation(106, 2, 1, [0, 0, 1, 1], [[0.0, 0.0, 1.0, 1.0]]),
    _annotation(107, 2, 1, [0, 0, 0, 0], _rle_of(np.zeros((H2, W2), bool))),
]
IMAGES = [
    {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H1, "width": W1},
    {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": H2, "width": W2},
]


def _ref(ref_id, image_id, split, ann_id, category_id, texts, **fields):
    """A ref in the REFER layout, with one sentence per text; ``fields`` go before the sentences."""
    sentences = [
        {"sent_id": ref_id * 10 + i, "raw": t, "sent": t.lower(), "tokens": t.lower().split()}
        for i, t in enumerate(texts)
    ]
    return {
        "ref_id": ref_id,
        "image_id": image_id,
        "split": split,
        "ann_id": ann_id,
        "category_id": category_id,
        **fields,
        "sentences": sentences,
    }


GREFS = [
    _ref(1, 1, "train", [101], [1], ["The left box", "box on the left"], no_target=False),
    _ref(2, 1, "train", [102, 103], [2, 3], ["both things on the right"], no_target=False),
    _ref(3, 1, "train", [-1], [-1], ["a purple elephant", "the dog"], no_target=True),
    _ref(4, 1, "train", [104, 105], [1, 4], ["the triangle and the crowd"], no_target=False),
    _ref(5, 2, "train", [106], [1], ["bad polygon"]),
    _ref(6, 1, "val", 101, 1, ["val box"]),
    _ref(7, 99, "train", [101], [1], ["no image"]),
    _ref(8, 1, "train", [999], [1], ["no ann"]),
    _ref(9, 2, "train", [107], [1], ["zero area"]),
]


def _write_instances(path):
    with open(path, "w") as f:
        json.dump(
            {
                "images": IMAGES,
                "annotations": ANNOTATIONS,
                "categories": [{"id": i, "name": f"c{i}"} for i in range(1, 5)],
            },
            f,
        )


def _write_images(folder, images=IMAGES):
    """Stand-ins for the image files (the loaders only check that they are there)."""
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        (folder / image["file_name"]).write_bytes(b"x")


def _write_grefcoco(root, pickled=False):
    folder = root / "grefcoco"
    folder.mkdir(parents=True)
    _write_images(root / "images" / "train2014")
    if pickled:
        with open(folder / "grefs(unc).p", "wb") as f:
            pickle.dump(GREFS, f)
    else:
        with open(folder / "grefs(unc).json", "w") as f:
            json.dump(GREFS, f)
    _write_instances(folder / "instances.json")
    return folder


def _pycocotools_union(ann_ids, height, width):
    """The expected merged mask, decoded straight from the fixture with pycocotools."""
    out = np.zeros((height, width), bool)
    for ann in ANNOTATIONS:
        if ann["id"] not in ann_ids:
            continue
        seg = ann["segmentation"]
        if isinstance(seg, list):
            rles = mask_util.frPyObjects([p for p in seg if len(p) >= 6], height, width)
            out |= mask_util.decode(mask_util.merge(rles)).astype(bool)
        elif isinstance(seg["counts"], list):
            out |= mask_util.decode(mask_util.frPyObjects(seg, height, width)).astype(bool)
        else:
            out |= mask_util.decode({"size": seg["size"], "counts": seg["counts"].encode()}).astype(
                bool
            )
    return out


@pytest.mark.parametrize("pickled", [False, True])
def test_grefcoco_train_split_counts_fields_and_masks(tmp_path, pickled, caplog):
    folder = _write_grefcoco(tmp_path, pickled)
    refs_file = str(folder / ("grefs(unc).p" if pickled else "grefs(unc).json"))
    with caplog.at_level(logging.WARNING):
        dicts = load_grefcoco_json(
            refs_file,
            str(folder / "instances.json"),
            str(tmp_path / "images" / "train2014"),
            "train",
        )
    # refs 1 (2 sentences), 2, 3 (2 sentences), 4 survive; 5, 7, 8, 9 are skipped, 6 is val
    assert [d["sentence"]["ref_id"] for d in dicts] == [1, 1, 2, 3, 3, 4]
    assert [d["expression_kind"] for d in dicts] == [
        "single",
        "single",
        "multi",
        "no_target",
        "no_target",
        "single",
    ]
    assert [d["empty"] for d in dicts] == [False, False, False, True, True, False]
    assert [[a["id"] for a in d["annotations"]] for d in dicts] == [
        [101],
        [101],
        [102, 103],
        [],
        [],
        [104],
    ]
    first = dicts[0]
    assert first["file_name"] == os.path.join(
        str(tmp_path / "images" / "train2014"), "COCO_train2014_000000000001.jpg"
    )
    assert (first["height"], first["width"], first["image_id"], first["source"]) == (
        H1,
        W1,
        1,
        "grefcoco",
    )
    assert first["sentence"] == {"raw": "The left box", "sent_id": 10, "ref_id": 1}
    ann = first["annotations"][0]
    assert (
        ann["bbox"] == [2, 2, 8, 6]
        and ann["bbox_mode"] == BoxMode.XYWH_ABS
        and ann["category_id"] == 1
    )
    # the sentences of a ref share one annotation list (no per-sentence copies)
    assert dicts[0]["annotations"] is dicts[1]["annotations"]
    # the invalid polygon of annotation 104 is gone, its valid one stays
    assert dicts[5]["annotations"][0]["segmentation"] == [POLY_104]
    for d in dicts:
        ids = {a["id"] for a in d["annotations"]}
        np.testing.assert_array_equal(
            merged_mask(d["annotations"], d["height"], d["width"]), _pycocotools_union(ids, H1, W1)
        )
    assert merged_mask(dicts[2]["annotations"], H1, W1).sum() == MASK_102.sum() + MASK_103.sum()
    # every skipped ref is logged with its id
    logged = caplog.text
    for ref_id in (5, 7, 8, 9):
        assert f"ref {ref_id}:" in logged
    assert (
        "crowd_annotation" in logged
        and "zero_area_mask" in logged
        and "missing_annotation" in logged
    )


def test_grefcoco_val_split_and_int_ann_id(tmp_path):
    folder = _write_grefcoco(tmp_path)
    dicts = load_grefcoco_json(
        str(folder / "grefs(unc).json"),
        str(folder / "instances.json"),
        str(tmp_path / "images" / "train2014"),
        "val",
    )
    assert len(dicts) == 1
    assert dicts[0]["sentence"]["raw"] == "val box" and [
        a["id"] for a in dicts[0]["annotations"]
    ] == [101]


def test_registered_grefcoco_reads_the_root_when_loaded(tmp_path, monkeypatch):
    _write_grefcoco(tmp_path)
    # the variable is set after the import that registered the dataset: it must still count
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("grefcoco_unc_train")
    assert len(dicts) == 6
    meta = MetadataCatalog.get("grefcoco_unc_train")
    assert meta.evaluator_type == "grefcoco" and meta.split == "train"
    assert meta.dataset_root == str(tmp_path / "grefcoco")
    assert meta.image_root == str(tmp_path / "images" / "train2014")


def test_missing_files_raise_one_error_naming_path_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetLayoutError) as err:
        DatasetCatalog.get("grefcoco_unc_val")
    message = str(err.value)
    assert str(tmp_path / "grefcoco" / "grefs(unc).json") in message
    assert "instances.json" in message and "train2014/" in message
    # a missing image folder is named too
    folder = tmp_path / "grefcoco"
    folder.mkdir()
    with open(folder / "grefs(unc).json", "w") as f:
        json.dump(GREFS, f)
    _write_instances(folder / "instances.json")
    with pytest.raises(DatasetLayoutError, match="image folder not found"):
        DatasetCatalog.get("grefcoco_unc_val")


# ----------------------------------------------------------------------------- Ref-ZOM
REFZOM_IMAGES = [
    {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H1, "width": W1},
    {"id": 3, "file_name": "COCO_val2014_000000000003.jpg", "height": H1, "width": W1},
]
REFZOM_ANNOTATIONS = [
    {**ANNOTATIONS[0]},
    {**ANNOTATIONS[1]},
    _annotation(301, 3, 5, [20, 10, 8, 5], _rle_of(MASK_102)),
]
REFZOM_REFS = [
    _ref(1, 1, "train", 101, 1, ["the box"], source="one"),
    _ref(2, 1, "train", [101, 102], [1, 2], ["all things", "the two things"], source="many"),
    # one-to-zero: its ann_id is not a target
    _ref(3, 1, "train", 101, 1, ["a giraffe"], source="zero"),
    _ref(4, 3, "train", 301, 5, ["the val thing"], source="one"),
    _ref(5, 1, "test", 101, 1, ["test box"], source="one"),
]


def _write_refzom(root, refs_name="refs(final).p"):
    folder = root / "ref-zom"
    folder.mkdir(parents=True)
    with open(folder / refs_name, "wb") as f:
        pickle.dump(REFZOM_REFS, f)
    with open(folder / "instances.json", "w") as f:
        json.dump({"images": REFZOM_IMAGES, "annotations": REFZOM_ANNOTATIONS, "categories": []}, f)
    # image 1 is in the merged folder; image 3 only in val2014 (the fallback)
    (root / "images" / "trainval2014").mkdir(parents=True)
    (root / "images" / "val2014").mkdir(parents=True)
    (root / "images" / "trainval2014" / REFZOM_IMAGES[0]["file_name"]).write_bytes(b"x")
    (root / "images" / "val2014" / REFZOM_IMAGES[1]["file_name"]).write_bytes(b"x")


@pytest.mark.parametrize("refs_name", ["refs(final).p", "Ref-ZOM(final).p"])
def test_refzom_kinds_sources_and_image_fallback(tmp_path, monkeypatch, refs_name):
    _write_refzom(tmp_path, refs_name)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    dicts = DatasetCatalog.get("refzom_final_train")
    assert [d["sentence"]["ref_id"] for d in dicts] == [1, 2, 2, 3, 4]
    assert [d["refzom_kind"] for d in dicts] == [
        "one_to_one",
        "one_to_many",
        "one_to_many",
        "one_to_zero",
        "one_to_one",
    ]
    assert [d["expression_kind"] for d in dicts] == [
        "single",
        "multi",
        "multi",
        "no_target",
        "single",
    ]
    assert [d["source"] for d in dicts] == ["one", "many", "many", "zero", "one"]
    assert dicts[3]["empty"] and dicts[3]["annotations"] == []
    assert not merged_mask(dicts[3]["annotations"], H1, W1).any()
    np.testing.assert_array_equal(
        merged_mask(dicts[1]["annotations"], H1, W1), _pycocotools_union({101, 102}, H1, W1)
    )
    assert dicts[0]["file_name"] == str(
        tmp_path / "images" / "trainval2014" / "COCO_train2014_000000000001.jpg"
    )
    assert dicts[4]["file_name"] == str(
        tmp_path / "images" / "val2014" / "COCO_val2014_000000000003.jpg"
    )
    assert MetadataCatalog.get("refzom_final_train").evaluator_type == "refzom"
    assert [d["sentence"]["raw"] for d in DatasetCatalog.get("refzom_final_test")] == ["test box"]


def test_refzom_without_any_image_folder_names_the_layout(tmp_path, monkeypatch):
    _write_refzom(tmp_path)
    for sub in ("trainval2014", "val2014"):
        for f in (tmp_path / "images" / sub).iterdir():
            f.unlink()
        (tmp_path / "images" / sub).rmdir()
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    with pytest.raises(DatasetLayoutError, match="trainval2014"):
        DatasetCatalog.get("refzom_final_test")


# ----------------------------------------------------------------------------- RefCOCO family
def _refcoco_ref(ref_id, split, ann_id, category_id, texts):
    """A ref of image 1 as RefCOCO's REFER files write it: they also list the sentence ids and
    name a per-object crop of the image."""
    return _ref(
        ref_id,
        1,
        split,
        ann_id,
        category_id,
        texts,
        sent_ids=[ref_id * 10 + i for i in range(len(texts))],
        file_name=f"COCO_train2014_000000000001_{ann_id}.jpg",
    )


REFCOCO_REFS = [
    _refcoco_ref(1, "train", 101, 1, ["left box", "box at left"]),
    _refcoco_ref(2, "testA", 102, 2, ["right thing"]),
]


def test_refcoco_family_names_aliases_and_single_targets(tmp_path, monkeypatch):
    for folder, refs_name in (
        ("refcoco", "refs(unc).p"),
        ("refcoco+", "refs(unc).p"),
        ("refcocog", "refs(umd).p"),
    ):
        (tmp_path / folder).mkdir()
        with open(tmp_path / folder / refs_name, "wb") as f:
            pickle.dump(REFCOCO_REFS, f)
        _write_instances(tmp_path / folder / "instances.json")
    _write_images(tmp_path / "images" / "train2014")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    train = DatasetCatalog.get("refcoco_unc_train")
    assert [d["sentence"]["raw"] for d in train] == ["left box", "box at left"]
    assert all(
        d["expression_kind"] == "single" and not d["empty"] and d["source"] == "refcoco"
        for d in train
    )
    # the image path comes from instances.json, not from the ref's per-object file name
    assert train[0]["file_name"].endswith(
        os.path.join("train2014", "COCO_train2014_000000000001.jpg")
    )
    np.testing.assert_array_equal(
        merged_mask(train[0]["annotations"], H1, W1), _pycocotools_union({101}, H1, W1)
    )
    plus = DatasetCatalog.get("refcoco+_unc_testA")
    alias = DatasetCatalog.get("refcocop_unc_testA")
    assert (
        [d["sentence"]["raw"] for d in plus]
        == [d["sentence"]["raw"] for d in alias]
        == ["right thing"]
    )
    assert plus[0]["source"] == "refcoco+"
    assert (
        len(DatasetCatalog.get("refcocog_umd_train")) == 2
        and DatasetCatalog.get("refcocog_umd_test") == []
    )
    for name in (
        "refcoco_unc_val",
        "refcocop_unc_testB",
        "refcocog_google_val",
        "refcocog_umd_test",
    ):
        assert MetadataCatalog.get(name).evaluator_type == "refcoco"
    with pytest.raises(DatasetLayoutError, match=r"refs\(google\)"):
        DatasetCatalog.get("refcocog_google_train")


def test_every_design_name_is_registered():
    names = set(DatasetCatalog.list())
    expected = {f"grefcoco_unc_{s}" for s in ("train", "val", "testA", "testB")}
    expected |= {"refzom_final_train", "refzom_final_test"}
    expected |= {
        f"{p}_unc_{s}"
        for p in ("refcoco", "refcoco+", "refcocop")
        for s in ("train", "val", "testA", "testB")
    }
    expected |= {f"refcocog_umd_{s}" for s in ("train", "val", "test")} | {
        "refcocog_google_train",
        "refcocog_google_val",
    }
    expected |= {f"synthetic_gres_{s}" for s in ("train", "val", "test")}
    expected |= {
        "synthetic_gres_train_all_objects",
        "synthetic_gres_train_more_spatial",
        "synthetic_gres_train_shape_colour",
    }
    assert expected <= names
