"""The synthetic GRES generator: determinism, proportions, masks that match the drawn pixels, and
expressions whose referents an independent reading of the sentence confirms."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

import instalign_d2.data  # noqa: F401  (registers the datasets)
from instalign_d2.data.masks import decode_segmentation
from instalign_d2.synthetic import __main__ as synthetic_cli
from instalign_d2.synthetic import generator
from instalign_d2.synthetic.generator import (
    SyntheticDatasetMismatch,
    ensure_synthetic_gres,
    generate_synthetic_gres,
)
from instalign_d2.synthetic.params import SyntheticParams, synthetic_root

# The closed vocabulary, written out here rather than imported, so the reading below is independent.
COLOUR_WORDS = {
    "red": (214, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 85, 220),
    "yellow": (238, 205, 30),
    "purple": (145, 60, 185),
}
SHAPE_WORDS = {
    "circle": "circle",
    "circles": "circle",
    "square": "square",
    "squares": "square",
    "triangle": "triangle",
    "triangles": "triangle",
    "star": "star",
    "stars": "star",
    "cross": "cross",
    "crosses": "cross",
}
SIZE_WORDS = {"big", "small"}
SPATIAL = {"leftmost": (0, 1), "rightmost": (0, -1), "topmost": (1, 1), "bottommost": (1, -1)}

TINY = dict(num_train_images=40, num_val_images=8, num_test_images=8, image_size=64)


def _train_split_only(num_train_images, **params):
    """Small images and no val or test split: for the tests that look at one split only."""
    return SyntheticParams(
        num_train_images=num_train_images,
        num_val_images=0,
        num_test_images=0,
        image_size=48,
        **params,
    )


def _read(root, name):
    with open(os.path.join(root, name), "rb") as f:
        return f.read()


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def read_phrase(part, objects):
    """(quantifier, matching objects, spatial word) of one 'the/all/both ...' phrase."""
    words = part.split()
    quantifier, rest = words[0], words[1:]
    spatial = rest[0] if rest[0] in SPATIAL else None
    if spatial:
        rest = rest[1:]
    *adjectives, noun = rest
    wanted = {}
    for word in adjectives:
        assert word in SIZE_WORDS or word in COLOUR_WORDS, part
        wanted["size" if word in SIZE_WORDS else "colour"] = word
    if noun not in ("shape", "shapes"):
        wanted["shape"] = SHAPE_WORDS[noun]
    matches = [o for o in objects if all(o[k] == v for k, v in wanted.items())]
    return quantifier, matches, spatial


def referents(sentence, objects, image_size):
    """Annotation ids a sentence names, read independently of the generator's own logic."""
    named = set()
    for part in sentence.split(" and "):
        quantifier, matches, spatial = read_phrase(part, objects)
        if not matches:
            continue
        if spatial:
            axis, sign = SPATIAL[spatial]
            ranked = sorted(matches, key=lambda o: sign * o["center"][axis])
            assert len(ranked) >= 2, f"{sentence!r}: spatial word for a single object"
            gap = sign * (ranked[1]["center"][axis] - ranked[0]["center"][axis])
            assert (
                gap >= 0.1 * image_size
            ), f"{sentence!r}: extreme not well separated ({gap:.1f} px)"
            named.add(ranked[0]["id"])
        elif quantifier == "the":
            assert len(matches) == 1, f"{sentence!r} is ambiguous: {len(matches)} objects match"
            named.add(matches[0]["id"])
        else:
            assert quantifier in ("all", "both"), sentence
            if quantifier == "both":
                assert len(matches) == 2, sentence
            named |= {o["id"] for o in matches}
    return named


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic") / "synthetic_gres")
    stats = generate_synthetic_gres(root, SyntheticParams(seed=7, **TINY), workers=1)
    return root, stats


def test_layout_and_marker(tiny_dataset):
    root, stats = tiny_dataset
    for name in (
        "grefs(unc).json",
        "instances.json",
        "generator.json",
        "text_encoder/config.json",
        "text_encoder/vocab.json",
    ):
        assert os.path.exists(os.path.join(root, name)), name
    assert len(os.listdir(os.path.join(root, "images", "train"))) == 40
    marker = json.loads(_read(root, "generator.json"))
    assert marker["params"]["seed"] == 7 and marker["params"]["image_size"] == 64
    assert stats["train"]["images"] == 40 and stats["val"]["images"] == 8
    # nothing half-written is left beside the root
    assert [n for n in os.listdir(os.path.dirname(root)) if n.startswith(".")] == []


def test_masks_are_the_drawn_pixels(tiny_dataset):
    root, _ = tiny_dataset
    instances = json.loads(_read(root, "instances.json"))
    images = {img["id"]: img for img in instances["images"]}
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image_id, anns in by_image.items():
        img = images[image_id]
        pixels = np.asarray(
            Image.open(os.path.join(root, "images", img["file_name"])).convert("RGB")
        ).astype(float)
        assert pixels.shape == (64, 64, 3)
        covered = np.zeros((64, 64), int)
        for ann in anns:
            mask = decode_segmentation(ann["segmentation"], img["height"], img["width"])
            assert mask.sum() > 0 and mask.sum() == ann["area"]
            ys, xs = np.nonzero(mask)
            assert ann["bbox"] == [
                xs.min(),
                ys.min(),
                xs.max() - xs.min() + 1,
                ys.max() - ys.min() + 1,
            ]
            covered += mask
            # the typical hue under the mask is the annotated colour's (brightness aside: the
            # outline is a darker shade of the same colour)
            median = np.median(pixels[mask], axis=0)
            nearest = max(
                COLOUR_WORDS, key=lambda c: _cosine(median, np.asarray(COLOUR_WORDS[c], float))
            )
            assert nearest == ann["colour"], (image_id, ann["id"])
        assert covered.max() == 1  # visible masks never overlap
        assert 2 <= len(anns) <= 6
        triples = {(a["shape"], a["colour"], a["size"]) for a in anns}
        assert len(triples) == len(anns)  # every object is nameable


def test_every_expression_names_exactly_its_targets(tiny_dataset):
    root, _ = tiny_dataset
    refs = json.loads(_read(root, "grefs(unc).json"))
    instances = json.loads(_read(root, "instances.json"))
    objects = {}
    for ann in instances["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    kinds = set()
    for ref in refs:
        targets = set() if ref["ann_id"] == [-1] else set(ref["ann_id"])
        assert ref["no_target"] == (not targets)
        for sentence in ref["sentences"]:
            text = sentence["raw"]
            assert referents(text, objects[ref["image_id"]], 64) == targets, text
            kind = sentence["expression_kind"]
            kinds.add(sentence["expression_template"])
            assert kind == (
                "no_target" if not targets else "single" if len(targets) == 1 else "multi"
            )
            if kind == "no_target":
                # really nothing: each phrase of the sentence matches no object at all
                for part in text.split(" and "):
                    assert read_phrase(part, objects[ref["image_id"]])[1] == [], text
    assert kinds == {
        "attribute",
        "spatial",
        "conjunction",
        "all_of_shape",
        "all_of_colour",
        "no_target",
    }


def test_loader_reads_the_generated_split(tiny_dataset, monkeypatch):
    root, stats = tiny_dataset
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(root))
    assert synthetic_root() == root
    dicts = DatasetCatalog.get("synthetic_gres_val")
    assert len(dicts) == stats["val"]["expressions"]
    assert {d["source"] for d in dicts} == {"synthetic_gres"}
    assert all(d["file_name"].startswith(os.path.join(root, "images", "val")) for d in dicts)
    assert all(
        d["empty"] == (d["expression_kind"] == "no_target") == (d["annotations"] == [])
        for d in dicts
    )
    assert {d["expression_template"] for d in dicts} <= set(generator.TEMPLATE_NAMES)
    meta = MetadataCatalog.get("synthetic_gres_val")
    assert meta.evaluator_type == "grefcoco" and meta.dataset_root == root


def test_statistics_follow_the_requested_proportions(tmp_path):
    weights = (0.2, 0.2, 0.6)
    params = _train_split_only(150, seed=1, kind_weights=weights)
    stats = generate_synthetic_gres(str(tmp_path / "s"), params, workers=1)
    train = stats["train"]
    assert train["expressions"] >= 150 * 5.5  # ~6 per image
    for kind, weight in zip(("single", "multi", "no_target"), weights):
        assert abs(train["kind_share"][kind] - weight) < 0.06, (kind, train["kind_share"])
    refs = json.loads((tmp_path / "s" / "grefs(unc).json").read_text())
    no_target = sum(len(r["sentences"]) for r in refs if r["no_target"])
    assert no_target == round(train["kind_share"]["no_target"] * train["expressions"])
    assert (
        train["no_target_styles"]["near_miss"] > train["no_target_styles"]["absent"] > 0
    )  # mostly hard ones
    assert train["occluded_object_share"] > 0.05 and train["touching_object_share"] > 0.05
    assert set(train["objects_histogram"]) == {2, 3, 4, 5, 6}


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    params = SyntheticParams(
        num_train_images=70, num_val_images=2, num_test_images=2, image_size=48, seed=3
    )
    generate_synthetic_gres(str(tmp_path / "a"), params, workers=1)
    generate_synthetic_gres(str(tmp_path / "b"), params, workers=2)  # >= 64 images: a pool
    other_seed = dataclasses.replace(params, seed=4)
    generate_synthetic_gres(str(tmp_path / "c"), other_seed, workers=1)
    for name in ("grefs(unc).json", "instances.json", "images/train/000069.png"):
        assert _read(tmp_path / "a", name) == _read(tmp_path / "b", name), name
        assert _read(tmp_path / "a", name) != _read(tmp_path / "c", name), name


def _files(root) -> dict:
    """Every file under ``root`` (relative path -> bytes)."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = _read(folder, name)
    return out


def test_output_does_not_depend_on_the_string_hash_seed(tmp_path):
    """Python draws a new string-hash seed per process: two processes with different
    PYTHONHASHSEED values must write the same bytes, file for file."""
    args = ["--num-train-images", "40", "--num-val-images", "20", "--num-test-images", "0"]
    args += ["--image-size", "48", "--seed", "11", "--workers", "1"]
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        root = str(tmp_path / f"hash{hash_seed}")
        subprocess.run(
            [sys.executable, "-m", "instalign_d2.synthetic", "--root", root, *args],
            env=env,
            check=True,
            capture_output=True,
        )
    first, second = _files(tmp_path / "hash1"), _files(tmp_path / "hash2")
    assert len(first) > 60 and sorted(first) == sorted(second)
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_ensure_generates_once_and_never_replaces_a_dataset(tmp_path, monkeypatch):
    root = str(tmp_path / "synthetic_gres")
    params = SyntheticParams(
        num_train_images=3, num_val_images=1, num_test_images=1, image_size=48, seed=0
    )
    assert ensure_synthetic_gres(root, params, workers=1) == root
    first = _read(root, "grefs(unc).json")

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an up-to-date dataset")

    monkeypatch.setattr(generator, "generate_synthetic_gres", fail)
    ensure_synthetic_gres(root, params, workers=1)
    # Other parameters: one error that names the folder and what differs; nothing is touched.
    with pytest.raises(SyntheticDatasetMismatch) as error:
        ensure_synthetic_gres(root, dataclasses.replace(params, seed=5), workers=1)
    message = str(error.value)
    assert root in message and "seed 0 (asked: 5)" in message and "\n" not in message
    assert _read(root, "grefs(unc).json") == first


def test_foreign_folder_is_never_replaced(tmp_path):
    root = tmp_path / "synthetic_gres"
    root.mkdir()
    (root / "precious.txt").write_text("user data")
    params = _train_split_only(1)
    with pytest.raises(FileExistsError, match="generator.json"):
        ensure_synthetic_gres(str(root), params)
    assert (root / "precious.txt").read_text() == "user data"


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generator, "write_local_text_encoder", interrupted)
    params = _train_split_only(2)
    with pytest.raises(KeyboardInterrupt):
        generate_synthetic_gres(str(tmp_path / "s"), params)
    assert os.listdir(tmp_path) == []


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="image_size"):
        SyntheticParams(image_size=8)
    with pytest.raises(ValueError, match="kind_weights"):
        SyntheticParams(kind_weights=(1.0, 0.0))


def test_params_from_the_config_are_the_dataclass_defaults():
    from detectron2.config import get_cfg

    from instalign_d2.config import add_instalign_config

    cfg = add_instalign_config(get_cfg())
    assert SyntheticParams.from_config(cfg) == SyntheticParams()
    cfg.DATASETS.SYNTHETIC.SEED = 9
    cfg.DATASETS.SYNTHETIC.KIND_WEIGHTS = [1, 1, 1]  # YAML gives lists of ints: same params
    assert SyntheticParams.from_config(cfg) == SyntheticParams(seed=9, kind_weights=(1.0,) * 3)


def test_cli_writes_the_dataset_and_refuses_other_parameters(tmp_path, capsys):
    root = tmp_path / "cli"
    args = ["--root", str(root), "--num-train-images", "2", "--num-val-images", "1"]
    args += ["--num-test-images", "1", "--image-size", "48", "--workers", "1"]
    assert synthetic_cli.main(args + ["--seed", "2"]) == 0
    marker = json.loads((root / "generator.json").read_text())
    assert marker["params"]["seed"] == 2 and marker["params"]["num_train_images"] == 2
    assert synthetic_cli.main(args + ["--seed", "3"]) == 2
    assert "seed 2 (asked: 3)" in capsys.readouterr().err
    assert synthetic_cli.main(args + ["--seed", "3", "--force"]) == 0
    assert json.loads((root / "generator.json").read_text())["params"]["seed"] == 3


def test_text_encoder_knows_every_word_and_maps_samples(tiny_dataset, monkeypatch):
    from transformers import AutoModel

    from instalign_d2.data.dataset_mapper import GRESDatasetMapper
    from instalign_d2.utils.tokenizer import load_tokenizer

    root, _ = tiny_dataset
    encoder_dir = os.path.join(root, "text_encoder")
    tokenizer = load_tokenizer(encoder_dir)
    refs = json.loads(_read(root, "grefs(unc).json"))
    sentences = [s["raw"] for r in refs for s in r["sentences"]] + [
        f"the {word}" for word in generator.VOCABULARY
    ]
    for text in sentences:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) <= 20, text
    model = AutoModel.from_pretrained(encoder_dir)  # seeded weights are saved beside the tokenizer
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2

    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(root))
    dicts = DatasetCatalog.get("synthetic_gres_train")
    mapper = GRESDatasetMapper(True, image_size=48, text_encoder_name=encoder_dir, max_tokens=20)
    for d in dicts[:12]:
        out = mapper(d)
        assert out["image"].shape == (3, 48, 48)
        assert out["instances"].gt_masks.shape[0] == len(d["annotations"])
        assert out["gt_mask_merged"].any() == (not d["empty"])


def _added_and_generated(tiny_dataset, monkeypatch, added_split):
    """(added dicts, generated train dicts, objects by image id, train image ids)."""
    root, _ = tiny_dataset
    monkeypatch.setenv("DETECTRON2_DATASETS", os.path.dirname(root))
    added = DatasetCatalog.get(added_split)
    generated = DatasetCatalog.get("synthetic_gres_train")
    instances = json.loads(_read(root, "instances.json"))
    objects = {}
    for ann in instances["annotations"]:
        objects.setdefault(ann["image_id"], []).append(ann)
    train_images = {
        img["id"] for img in instances["images"] if img["file_name"].startswith("train/")
    }
    return added, generated, objects, train_images


def test_all_objects_split_refers_to_every_object_of_each_train_image(tiny_dataset, monkeypatch):
    from instalign_d2.data.build import group_by_image
    from instalign_d2.utils.tokenizer import load_tokenizer

    root, _ = tiny_dataset
    added, generated, objects, train_images = _added_and_generated(
        tiny_dataset, monkeypatch, "synthetic_gres_train_all_objects"
    )
    assert sorted(d["image_id"] for d in added) == sorted(train_images & set(objects))
    for d in added:
        targets = {a["id"] for a in d["annotations"]}
        assert targets == {o["id"] for o in objects[d["image_id"]]}
        # the independent reading of the sentence agrees: "all shapes" is every object
        assert referents(d["sentence"]["raw"], objects[d["image_id"]], 64) == targets
        assert d["expression_kind"] == ("single" if len(targets) == 1 else "multi")
        assert not d["empty"] and d["expression_template"] == "all_objects"
    # never a sentence of the generated set, with ids of its own, and grouped with the image's
    # generated expressions (same file_name) when both splits are trained on
    assert "all shapes" not in {d["sentence"]["raw"] for d in generated}
    assert not {d["sentence"]["sent_id"] for d in added} & {
        d["sentence"]["sent_id"] for d in generated
    }
    groups = group_by_image(generated + added)
    assert len(groups) == len({d["file_name"] for d in generated})
    assert all(group[-1]["sentence"]["raw"] == "all shapes" for group in groups)
    tokenizer = load_tokenizer(os.path.join(root, "text_encoder"))
    assert tokenizer.unk_token_id not in tokenizer("all shapes")["input_ids"]


def _spatial_phrases(objects, image_size):
    """Every 'the <spatial word> <noun phrase>' an image allows, enumerated independently."""
    out = {}
    for obj in objects:
        # every filter of at most two attributes, the empty one ("the leftmost shape") included
        for keys in ((), ("size",), ("colour",), ("shape",), ("size", "colour")) + (
            ("size", "shape"),
            ("colour", "shape"),
        ):
            wanted = {k: obj[k] for k in keys}
            group = [o for o in objects if all(o[k] == v for k, v in wanted.items())]
            if len(group) < 2:
                continue
            words = [wanted[k] for k in ("size", "colour") if k in wanted]
            words.append(wanted.get("shape", "shape"))
            for word, (axis, sign) in SPATIAL.items():
                ranked = sorted(group, key=lambda o: sign * o["center"][axis])
                gap = sign * (ranked[1]["center"][axis] - ranked[0]["center"][axis])
                if gap >= 0.25 * image_size:
                    out[f"the {word} {' '.join(words)}"] = ranked[0]["id"]
    return out


def test_more_spatial_split_adds_unseen_spatial_expressions(tiny_dataset, monkeypatch):
    from instalign_d2.data.datasets.synthetic import SPATIAL_EXTRA_PER_IMAGE

    added, generated, objects, train_images = _added_and_generated(
        tiny_dataset, monkeypatch, "synthetic_gres_train_more_spatial"
    )
    present = {}
    for d in generated:
        present.setdefault(d["image_id"], set()).add(d["sentence"]["raw"])
    per_image = {}
    for d in added:
        per_image.setdefault(d["image_id"], []).append(d)
        text = d["sentence"]["raw"]
        targets = {a["id"] for a in d["annotations"]}
        # the independent reading of the sentence names exactly its one target
        assert referents(text, objects[d["image_id"]], 64) == targets and len(targets) == 1
        assert text not in present[d["image_id"]]
        assert d["expression_template"] == "spatial" and d["expression_kind"] == "single"
    assert set(per_image) <= train_images
    for image_id in train_images & set(objects):
        allowed = _spatial_phrases(objects[image_id], 64)
        unseen = set(allowed) - present.get(image_id, set())
        texts = [d["sentence"]["raw"] for d in per_image.get(image_id, [])]
        assert len(texts) == len(set(texts)) == min(SPATIAL_EXTRA_PER_IMAGE, len(unseen))
        assert set(texts) <= unseen
    assert sum(len(v) for v in per_image.values()) > len(per_image) > 5
    ids = [d["sentence"]["sent_id"] for d in added]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {d["sentence"]["sent_id"] for d in generated}
    # the same draw on every load
    again = DatasetCatalog.get("synthetic_gres_train_more_spatial")
    assert [d["sentence"]["raw"] for d in again] == [d["sentence"]["raw"] for d in added]


def test_shape_colour_split_names_each_target_by_its_shape_and_colour(tiny_dataset, monkeypatch):
    from instalign_d2.data.datasets.synthetic import SHAPE_COLOUR_CLASSES
    from instalign_d2.synthetic.scene import COLOURS, SHAPES

    relabelled, generated, objects, _ = _added_and_generated(
        tiny_dataset, monkeypatch, "synthetic_gres_train_shape_colour"
    )
    by_id = {o["id"]: o for image_objects in objects.values() for o in image_objects}
    pairs = {(s, c): 1 + i * 5 + j for i, s in enumerate(SHAPES) for j, c in enumerate(COLOURS)}
    assert SHAPE_COLOUR_CLASSES == 26 and sorted(pairs.values()) == list(range(1, 26))
    # the same expressions, targets and masks; only the category ids differ
    assert [d["sentence"]["sent_id"] for d in relabelled] == [
        d["sentence"]["sent_id"] for d in generated
    ]
    seen = set()
    for ours, plain in zip(relabelled, generated):
        assert [a["id"] for a in ours["annotations"]] == [a["id"] for a in plain["annotations"]]
        assert [a["segmentation"] for a in ours["annotations"]] == [
            a["segmentation"] for a in plain["annotations"]
        ]
        for ann, plain_ann in zip(ours["annotations"], plain["annotations"]):
            obj = by_id[ann["id"]]
            assert ann["category_id"] == pairs[(obj["shape"], obj["colour"])]
            assert plain_ann["category_id"] == 1 + SHAPES.index(obj["shape"])  # untouched
            seen.add(ann["category_id"])
        # every object of the image, referred to or not, for the dense category loss
        image_objects = ours["image_annotations"]
        assert [a["id"] for a in image_objects] == sorted(
            o["id"] for o in objects.get(ours["image_id"], [])
        )
        assert {a["id"] for a in ours["annotations"]} <= {a["id"] for a in image_objects}
        for ann in image_objects:
            obj = by_id[ann["id"]]
            assert ann["category_id"] == pairs[(obj["shape"], obj["colour"])]
            assert ann["segmentation"] == obj["segmentation"]
    assert len(seen) > 5  # more categories than the five shapes
