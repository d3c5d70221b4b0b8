"""Malformed datasets stop with one line before anything is written; partly damaged ones warn,
count and run.

Each bad case is built as a tiny gRefCOCO dataset (real JPEG files) in a tmp dir, then damaged
the way a user's hand-made download is: a file cut short, an HTML page, a dict around the refs,
a ref without a key, the refs of another dataset, images elsewhere, too many images missing, a
split with nothing usable. It goes through the loader, ``train_net.py`` (training) and
``train_net.py --eval-only``.
"""

import io
import json
import logging
import os
import pickle
import shutil

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetFromList, MapDataset
from PIL import Image

import train_net
from instalign_d2.config import add_instalign_config
from instalign_d2.data import checked
from instalign_d2.data.datasets import grefcoco as grefcoco_module
from instalign_d2.data.datasets.errors import (
    DatasetError,
    DatasetLayoutError,
    error_line,
    one_line_layout,
)
from instalign_d2.data.datasets.image_presence import ImageFolders
from instalign_d2.data.datasets.load_report import report_of
from instalign_d2.data.datasets.validation import check_refs, read_pickle_file, ref_format
from instalign_d2.data.unreadable import UnreadableImageGuard
from instalign_d2.synthetic.text_encoder import write_local_text_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml")
SIDE = 16
TARGET_TEXT, NO_TARGET_TEXT = "the red square", "the blue circle"
RESULT_FILES = ("metrics.json", "last_checkpoint", "inference")


# ----------------------------------------------------------------------------- tiny datasets
def _jpeg_bytes(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _sentence(sent_id, text):
    return {"sent_id": sent_id, "raw": text, "sent": text, "tokens": text.split()}


def build_refs_and_instances(num_train, num_val):
    """One image per target ref; each image also has a no-target ref."""
    images, annotations, refs = [], [], []
    for i in range(num_train + num_val):
        image_id = i + 1
        split = "train" if i < num_train else "val"
        images.append(
            {
                "id": image_id,
                "file_name": f"COCO_train2014_{image_id:012d}.jpg",
                "height": SIDE,
                "width": SIDE,
            }
        )
        annotations.append(
            {
                "id": 100 + image_id,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [2, 2, 8, 8],
                "iscrowd": 0,
                "segmentation": [[2.0, 2.0, 10.0, 2.0, 10.0, 10.0, 2.0, 10.0]],
            }
        )
        refs.append(
            {
                "ref_id": 2 * image_id,
                "image_id": image_id,
                "split": split,
                "ann_id": [100 + image_id],
                "category_id": [1],
                "no_target": False,
                "sentences": [_sentence(20 * image_id, TARGET_TEXT)],
            }
        )
        refs.append(
            {
                "ref_id": 2 * image_id + 1,
                "image_id": image_id,
                "split": split,
                "ann_id": [-1],
                "category_id": [-1],
                "no_target": True,
                "sentences": [_sentence(20 * image_id + 1, NO_TARGET_TEXT)],
            }
        )
    instances = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "square"}],
    }
    return refs, instances


def _refs_text(refs):
    # One ref per line, as a download cut at a line boundary would leave it.
    return "[\n" + ",\n".join(json.dumps(r) for r in refs) + "\n]\n"


class TinyGRefCOCO:
    """A valid gRefCOCO layout under ``root``, with helpers to damage it."""

    def __init__(self, root, num_train=4, num_val=2):
        self.root = root
        self.folder = root / "grefcoco"
        self.image_root = root / "images" / "train2014"
        self.folder.mkdir(parents=True)
        self.image_root.mkdir(parents=True)
        self.refs, self.instances = build_refs_and_instances(num_train, num_val)
        self.write_refs(self.refs)
        self.write_instances(self.instances)
        colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
        for i, image in enumerate(self.instances["images"]):
            (self.image_root / image["file_name"]).write_bytes(_jpeg_bytes(colours[i % 3]))

    @property
    def refs_file(self):
        return self.folder / "grefs(unc).json"

    @property
    def instances_file(self):
        return self.folder / "instances.json"

    def write_refs(self, refs):
        self.refs_file.write_text(_refs_text(refs))

    def write_instances(self, instances):
        self.instances_file.write_text(json.dumps(instances))

    def image_path(self, image_id):
        return self.image_root / self.instances["images"][image_id - 1]["file_name"]

    def image_ids(self, split):
        return sorted({r["image_id"] for r in self.refs if r["split"] == split})


@pytest.fixture(autouse=True)
def isolated_run_loggers():
    """Each test starts without the handlers earlier in-process runs attached, and leaves none.

    Detectron2's setup_logger writes to the sys.stdout of its moment: pytest's capture of that
    test, closed once it ends, so a later message to it prints "Logging error" on stderr.
    """
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore", "d2", "instalign_d2")]
    before = [list(logger.handlers) for logger in loggers]
    for logger in loggers:
        logger.handlers.clear()
    yield
    for logger, handlers in zip(loggers, before):
        for handler in logger.handlers:
            handler.close()
        logger.handlers[:] = handlers


@pytest.fixture
def dataset(tmp_path, monkeypatch):
    root = tmp_path / "datasets"
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    return TinyGRefCOCO(root)


@pytest.fixture(scope="module")
def text_encoder(tmp_path_factory):
    return write_local_text_encoder(
        str(tmp_path_factory.mktemp("enc") / "text_encoder"),
        [TARGET_TEXT, NO_TARGET_TEXT],
        max_tokens=8,
    )


@pytest.fixture
def weights(tmp_path):
    # --eval-only checks the file exists; a bad dataset stops the run before it is read.
    path = tmp_path / "model.pth"
    path.write_bytes(b"")
    return str(path)


def _cfg(**datasets):
    cfg = get_cfg()
    add_instalign_config(cfg)
    for key, value in datasets.items():
        cfg.DATASETS[key] = value
    return cfg


def allow_missing(monkeypatch, fraction):
    """Config options that set the share of missing images a run accepts."""
    return ["DATASETS.MAX_MISSING_IMAGE_FRACTION", str(fraction)]


def argv(text_encoder, output, *extra, eval_only=None):
    args = ["--config-file", CONFIG]
    if eval_only:
        args += ["--eval-only"]
    args += [
        "DATASETS.TRAIN", "('grefcoco_unc_train',)",
        "DATASETS.TEST", "('grefcoco_unc_val',)",
        "MODEL.TEXT_ENCODER.NAME", text_encoder,
        "MODEL.TEXT_ENCODER.MAX_TOKENS", "8",
        "MODEL.TIMM.NAME", "test_resnet",
        "MODEL.TIMM.PRETRAINED_WEIGHTS", "",
        "MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS", "0",
        "INPUT.IMAGE_SIZE", "64",
        "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2",
        "SOLVER.CHECKPOINT_PERIOD", "100",
        "TEST.EVAL_PERIOD", "0",
        "OUTPUT_DIR", str(output),
    ]  # fmt: skip
    if eval_only:
        args += ["MODEL.WEIGHTS", eval_only]
    return args + list(extra)


def run(args, capsys):
    rc = train_net.invoke_main(args)
    captured = capsys.readouterr()
    return rc, captured.err, captured.out


def assert_one_line(err, *expected, others_before=False):
    """stderr is the one error line (``others_before``: after lines that are not ours, e.g.
    torch's note that it found no CUDA, printed when Detectron2's setup collects the
    environment)."""
    lines = err.strip().splitlines()
    if others_before:
        assert not any(line.startswith("instalign_d2") for line in lines[:-1]), err
        lines = lines[-1:]
    assert len(lines) == 1, err
    assert lines[0].startswith("instalign_d2: error: "), lines[0]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def assert_no_results(output):
    """Nothing but Detectron2's own log.txt and config.yaml (here: nothing at all)."""
    if not output.exists():
        return
    names = set(os.listdir(output))
    assert names <= {"log.txt", "config.yaml"}, names
    assert not any(n.startswith(("model_", "events.")) for n in names)
    assert not any(n in RESULT_FILES for n in names)


# ----------------------------------------------------------------------------- the bad cases
def _cut_refs(d):
    text = d.refs_file.read_text()
    d.refs_file.write_text(text[: text.index("\n", len(text) // 2) + 1])


def _cut_instances(d):
    data = d.instances_file.read_bytes()
    d.instances_file.write_bytes(data[: len(data) * 2 // 3])


def _drop_key(d):
    refs = [dict(r) for r in d.refs]
    del refs[1]["ann_id"]
    d.write_refs(refs)


def _sentence_without_text(d):
    refs = [dict(r) for r in d.refs]
    refs[2]["sentences"] = [{"sent_id": 7, "tokens": []}]
    d.write_refs(refs)


def _refzom_refs(d):
    d.write_refs([{**r, "source": "zero" if r["no_target"] else "one"} for r in d.refs])


def _refcoco_refs(d):
    single = [r for r in d.refs if not r["no_target"]]
    d.write_refs(
        [
            {k: v for k, v in r.items() if k != "no_target"} | {"ann_id": r["ann_id"][0]}
            for r in single
        ]
    )


def _pickle_cut(d):
    d.refs_file.unlink()
    data = pickle.dumps(d.refs, protocol=2)
    (d.folder / "grefs(unc).p").write_bytes(data[: len(data) // 2])


def _images_elsewhere(d):
    elsewhere = d.root / "downloads"
    shutil.move(str(d.image_root), str(elsewhere))
    d.image_root.mkdir()


def _too_many_missing(d):
    d.image_path(d.image_ids("train")[0]).unlink()
    d.image_path(d.image_ids("val")[0]).unlink()


def _val_ref_names_absent_annotation(d):
    val_image = d.image_ids("val")[0]
    only = {**d.refs[2 * (val_image - 1)], "ann_id": [9999]}
    d.write_refs([r for r in d.refs if r["split"] != "val"] + [only])


def _crowd_only(d):
    instances = json.loads(d.instances_file.read_text())
    for ann in instances["annotations"]:
        ann["iscrowd"] = 1
    d.write_instances(instances)
    d.write_refs([r for r in d.refs if not r["no_target"]])


def _no_val_split(d):
    d.write_refs([r for r in d.refs if r["split"] != "val"])


# (id, damage, train-run line parts, eval-only line parts); "{split}" = the split named first.
BAD_CASES = [
    ("refs_cut_short", _cut_refs, ["grefs(unc).json", "cut short", "download it again"]),
    ("refs_empty", lambda d: d.refs_file.write_text(""), ["grefs(unc).json", "is empty (0 bytes)"]),
    (
        "refs_html_page",
        lambda d: d.refs_file.write_text("<!DOCTYPE html>\n<html><body>Not Found</body></html>"),
        ["grefs(unc).json", "is an HTML page"],
    ),
    (
        "refs_in_a_dict",
        lambda d: d.refs_file.write_text(json.dumps({"refs": d.refs})),
        ["grefs(unc).json", "found a dict with keys ['refs']", "save that list itself"],
    ),
    ("ref_without_ann_id", _drop_key, ["ref 1 (ref_id 3) has no 'ann_id'"]),
    ("sentence_without_text", _sentence_without_text, ["ref 2 (ref_id 4), sentence 0 has no text"]),
    (
        "instances_without_annotations",
        lambda d: d.write_instances({"images": d.instances["images"]}),
        ["instances.json", "needs a list 'annotations'"],
    ),
    (
        "instances_without_images",
        lambda d: d.write_instances({"annotations": d.instances["annotations"]}),
        ["instances.json", "needs a list 'images'"],
    ),
    ("instances_cut_short", _cut_instances, ["instances.json", "cut short"]),
    ("refzom_refs_in_grefcoco", _refzom_refs, ["these are Ref-ZOM refs", "ref-zom/refs(final).p"]),
    (
        "refcoco_refs_in_grefcoco",
        _refcoco_refs,
        ["these are RefCOCO/+/g refs", "refcoco/refs(unc).p"],
    ),
    ("pickle_cut_short", _pickle_cut, ["grefs(unc).p", "cut short"]),
    (
        "images_elsewhere",
        _images_elsewhere,
        ["none of the split's", "is on disk", "images/train2014", "COCO train2014 images"],
    ),
    (
        "image_folder_missing",
        lambda d: shutil.rmtree(d.image_root),
        ["image folder not found", "images/train2014"],
    ),
    (
        "refs_file_missing",
        lambda d: d.refs_file.unlink(),
        ["refs file not found", "grefs(unc).json"],
    ),
    (
        "too_many_images_missing",
        _too_many_missing,
        ["are missing under", "MAX_MISSING_IMAGE_FRACTION=0.01", "download the images again"],
    ),
]
# Cases that damage only one split: (id, damage, dataset key + name, line parts).
ONE_SPLIT_CASES = [
    (
        "only_val_ref_names_absent_annotation",
        _val_ref_names_absent_annotation,
        "DATASETS.TEST: grefcoco_unc_val:",
        ["no usable expression", "the only ref of split 'val'", "annotation is not in instances"],
    ),
    (
        "crowd_only_targets",
        _crowd_only,
        "DATASETS.TRAIN: grefcoco_unc_train:",
        ["no usable expression", "all 4 refs of split 'train'", "4 for crowd-only targets"],
    ),
    (
        "no_val_split",
        _no_val_split,
        "DATASETS.TEST: grefcoco_unc_val:",
        ["has no ref of split 'val'", "its splits: train (8)"],
    ),
]


@pytest.mark.parametrize(
    "damage, expected", [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES]
)
def test_malformed_dataset_stops_training_and_evaluation_with_one_line(
    damage, expected, dataset, text_encoder, weights, tmp_path, capsys
):
    damage(dataset)
    with pytest.raises(DatasetLayoutError) as caught:
        checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=True)
    assert "\n" not in str(caught.value)

    output = tmp_path / "train_out"
    rc, err, _ = run(argv(text_encoder, output), capsys)
    assert rc == 2
    assert_one_line(err, "DATASETS.TRAIN: grefcoco_unc_train: ", *expected)
    assert_no_results(output)

    output = tmp_path / "eval_out"
    rc, err, _ = run(argv(text_encoder, output, eval_only=weights), capsys)
    assert rc == 2
    assert_one_line(err, "DATASETS.TEST: grefcoco_unc_val: ", *expected)
    assert_no_results(output)


@pytest.mark.parametrize(
    "damage, prefix, expected",
    [c[1:] for c in ONE_SPLIT_CASES],
    ids=[c[0] for c in ONE_SPLIT_CASES],
)
def test_split_without_usable_expression_stops_with_the_counts(
    damage, prefix, expected, dataset, text_encoder, weights, tmp_path, capsys
):
    damage(dataset)
    eval_only = weights if prefix.startswith("DATASETS.TEST") else None
    output = tmp_path / "out"
    rc, err, _ = run(argv(text_encoder, output, eval_only=eval_only), capsys)
    assert rc == 2
    assert_one_line(err, prefix, *expected)
    assert_no_results(output)


def test_eval_only_skips_the_training_split(dataset, text_encoder, weights, tmp_path, capsys):
    """A broken train split does not stop --eval-only, which reads only DATASETS.TEST."""
    _crowd_only_train_only(dataset)
    rc, err, _ = run(
        argv(text_encoder, tmp_path / "out", "DATASETS.TEST", "('nope_val',)", eval_only=weights),
        capsys,
    )
    assert rc == 2 and "DATASETS.TEST: unknown dataset 'nope_val'" in err  # config checks first
    with pytest.raises(DatasetError, match="crowd-only"):
        checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=True)
    assert len(checked.checked_dicts(_cfg(), "grefcoco_unc_val", training=False)) == 4


def _crowd_only_train_only(d):
    instances = json.loads(d.instances_file.read_text())
    train_images = set(d.image_ids("train"))
    for ann in instances["annotations"]:
        ann["iscrowd"] = int(ann["image_id"] in train_images)
    d.write_instances(instances)
    d.write_refs([r for r in d.refs if not (r["no_target"] and r["split"] == "train")])


def test_a_launched_worker_prints_one_line_and_exits_2(dataset, text_encoder, tmp_path, capsys):
    """The checks before launch are skipped here (as in a process started by launch)."""
    _images_elsewhere(dataset)
    output = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(argv(text_encoder, output))
    with pytest.raises(SystemExit) as exit_info:
        train_net.main(args)
    assert exit_info.value.code == 2
    assert_one_line(
        capsys.readouterr().err,
        "DATASETS.TRAIN: grefcoco_unc_train: none of the split's",
        others_before=True,
    )
    assert_no_results(output)


# ----------------------------------------------------------------------------- partial damage
def test_few_missing_images_warn_and_the_split_loads(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    d = TinyGRefCOCO(tmp_path, num_train=150, num_val=1)
    d.image_path(7).unlink()  # 1 of 150 (0.7 %): under the default 1 %
    dicts = checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=False)
    assert len(dicts) == 300 and sum(bool(x.get("image_missing")) for x in dicts) == 2
    assert "1 of its 150 images (0.7 %) are missing" in caplog.text
    assert "COCO_train2014_000000000007.jpg" in caplog.text
    assert "their 2 expressions are left out of training" in caplog.text
    train = checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=True)
    assert len(train) == 298 and not any(x.get("image_missing") for x in train)
    report = report_of("grefcoco_unc_train")
    assert report.refs_skipped["image_missing"] == 2 and report.images == 150

    d.image_path(8).unlink()  # 2 of 150 (1.3 %): a broken download
    with pytest.raises(DatasetError, match=r"2 of its 150 images \(1.3 %\) are missing"):
        checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=True)
    assert (
        len(
            checked.checked_dicts(
                _cfg(MAX_MISSING_IMAGE_FRACTION=0.02), "grefcoco_unc_train", training=True
            )
        )
        == 296
    )


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_partly_damaged_dataset_trains_and_counts_what_it_skipped(
    dataset, text_encoder, tmp_path, monkeypatch, capsys
):
    """One train image missing, one truncated, one val image missing: warnings, a full run, the
    missing val expressions counted as skipped; each split is read once."""
    train_ids, val_ids = dataset.image_ids("train"), dataset.image_ids("val")
    dataset.image_path(train_ids[0]).unlink()
    _truncate(dataset.image_path(train_ids[1]))
    dataset.image_path(val_ids[0]).unlink()
    loads = []
    original = grefcoco_module.load_grefcoco_json

    def counting(*args, **kwargs):
        loads.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(grefcoco_module, "load_grefcoco_json", counting)
    output = tmp_path / "out"
    rc, err, out = run(argv(text_encoder, output, *allow_missing(monkeypatch, 0.5)), capsys)
    assert rc == 0, err
    assert sorted(loads) == ["train", "val"]
    assert "grefcoco_unc_train: 1 of its 4 images (25.0 %) are missing" in out
    assert "grefcoco_unc_val: 1 of its 2 images (50.0 %) are missing" in out
    # 3 training images, 2 iterations of 2: every image is drawn, the truncated one included
    log = (output / "log.txt").read_text()
    assert "training: 1 damaged image skipped so far (33.33 % of 3;" in log
    assert f"unreadable image {dataset.image_path(train_ids[1])}: OSError" in log
    assert (output / "model_final.pth").exists()
    with open(output / "inference" / "grefcoco_unc_val_results.json") as f:
        counts = json.load(f)["counts"]
    assert counts["num_skipped"] == 2 and counts["num_expressions"] == 2


def test_training_on_undecodable_images_stops_with_one_line(
    dataset, text_encoder, tmp_path, capsys
):
    for image_id in dataset.image_ids("train"):
        _truncate(dataset.image_path(image_id))
    output = tmp_path / "out"
    rc, err, _ = run(argv(text_encoder, output), capsys)
    assert rc == 2
    assert_one_line(
        err,
        "DATASETS.TRAIN: 1 of the 4 training images cannot be decoded",
        "unreadable image",
        "OSError",
        "MAX_MISSING_IMAGE_FRACTION=0.01",
        others_before=True,
    )
    assert not any(n.startswith("model_") for n in os.listdir(output))


# ----------------------------------------------------------------------------- the parts
def test_guard_never_retries_forever_in_detectron2s_map_dataset():
    calls = []

    def mapper(d):
        calls.append(d["file_name"])
        return None if d["file_name"] in bad else d

    records = [{"file_name": f"{i}.jpg"} for i in range(10)]
    bad = {"0.jpg", "1.jpg", "2.jpg"}
    guard = UnreadableImageGuard(mapper, num_images=10, max_fraction=0.5)
    dataset = MapDataset(DatasetFromList(records, copy=False, serialize=False), guard)
    for _ in range(5):
        for i in range(10):
            assert dataset[i]["file_name"] not in bad
    assert guard.unreadable == bad
    assert sorted(c for c in calls if c in bad) == sorted(bad)  # each damaged image decoded once

    bad = {f"{i}.jpg" for i in range(10)}  # every image damaged, any threshold
    guard = UnreadableImageGuard(mapper, num_images=10, max_fraction=1.0)
    dataset = MapDataset(DatasetFromList(records, copy=False, serialize=False), guard)
    with pytest.raises(DatasetError, match="10 of the 10 training images cannot be decoded"):
        dataset[0]


def _raise_in_worker(_):
    raise DatasetError("DATASETS.TRAIN: 3 of the 4 training images cannot be decoded")


def test_error_from_a_loader_worker_keeps_its_one_line():
    loader = torch.utils.data.DataLoader(list(range(2)), num_workers=1, collate_fn=_raise_in_worker)
    with pytest.raises(DatasetError) as caught:
        next(iter(loader))
    assert "Traceback" in str(caught.value)
    assert (
        error_line(caught.value) == "DATASETS.TRAIN: 3 of the 4 training images cannot be decoded"
    )


def test_image_folders_list_each_folder_once(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / "a" / name).write_bytes(b"x")
    scans = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p: scans.append(p) or real_scandir(p))
    folders = ImageFolders([str(tmp_path / "a")], "  images/\n    a/")
    paths = [str(tmp_path / "a" / n) for n in ("x.jpg", "y.jpg", "z.jpg")] * 100
    assert folders.missing(set(paths), "demo") == [str(tmp_path / "a" / "z.jpg")]
    assert scans == [str(tmp_path / "a")]
    with pytest.raises(
        DatasetError, match=r"none of the split's 1 image is on disk .*\(a/ holds 2 other entries\)"
    ):
        folders.missing({str(tmp_path / "a" / "q.jpg")}, "demo")


def test_refs_file_checks_name_the_ref_and_key():
    path = "grefs(unc).json"
    refs, _ = build_refs_and_instances(1, 0)
    assert check_refs(refs, path) == refs
    for bad, message in [
        ([], "the refs list is empty"),
        ("text", "found a str"),
        ({"images": [], "annotations": []}, "this is a COCO instances file"),
        ([refs[0], 5], "ref 1 is a int"),
        ([{**refs[0], "ann_id": "12"}], "ref 0 (ref_id 2) has ann_id '12'"),
        ([{**refs[0], "sentences": "a dog"}], "ref 0 (ref_id 2) has 'sentences' of type str"),
        ([{**refs[0], "sentences": [{"raw": "a"}]}], "sentence 0 has no 'sent_id'"),
    ]:
        with pytest.raises(DatasetError) as caught:
            check_refs(bad, path)
        assert message in str(caught.value) and str(caught.value).startswith(path)


def test_ref_families_are_told_apart():
    grefs, _ = build_refs_and_instances(2, 0)
    assert ref_format(grefs) == "grefcoco"
    assert ref_format([{**r, "source": "one"} for r in grefs]) == "refzom"
    single = [{**r, "ann_id": r["ann_id"][0]} for r in grefs if not r["no_target"]]
    assert (
        ref_format([{k: v for k, v in r.items() if k != "no_target"} for r in single]) == "refcoco"
    )


def test_pickle_that_is_json_or_html(tmp_path):
    path = tmp_path / "refs(unc).p"
    path.write_text('[{"ref_id": 1}]')
    with pytest.raises(
        DatasetError, match=r"holds JSON text, not a pickle; rename it to refs\(unc\).json"
    ):
        read_pickle_file(str(path), "refs file")
    path.write_text("<html><head><title>403</title></head></html>")
    with pytest.raises(DatasetError, match="is an HTML page"):
        read_pickle_file(str(path), "refs file")


def test_refzom_with_no_image_names_every_folder_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    refs, instances = build_refs_and_instances(1, 0)
    (tmp_path / "ref-zom").mkdir()
    with open(tmp_path / "ref-zom" / "refs(final).p", "wb") as f:
        pickle.dump([{**r, "source": "zero" if r["no_target"] else "one"} for r in refs], f)
    (tmp_path / "ref-zom" / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "images" / "train2014").mkdir(parents=True)
    with pytest.raises(DatasetError) as caught:
        DatasetCatalog.get("refzom_final_train")
    message = str(caught.value)
    for folder in ("trainval2014", "train2014", "val2014"):
        assert str(tmp_path / "images" / folder) in message
    assert "val2014/ does not exist" in message and "train2014/ is empty" in message
    # and the gRefCOCO refs placed under ref-zom/ are named as such
    with open(tmp_path / "ref-zom" / "refs(final).p", "wb") as f:
        pickle.dump(refs, f)
    with pytest.raises(DatasetError, match="these are gRefCOCO refs .* not Ref-ZOM refs"):
        DatasetCatalog.get("refzom_final_train")


def test_layout_trees_become_one_line():
    layout = "  grefcoco/\n    grefs(unc).json        (or .p)\n    instances.json\n  images/\n    train2014/             COCO images"
    assert one_line_layout(layout) == (
        "grefcoco/grefs(unc).json (or .p); grefcoco/instances.json; images/train2014/ (COCO images)"
    )


def test_preloaded_split_is_handed_to_the_loader_once(dataset, monkeypatch):
    loads = []
    original = checked._load
    monkeypatch.setattr(checked, "_load", lambda name: loads.append(name) or original(name))
    checked.preload(_cfg(), ["grefcoco_unc_train", "grefcoco_unc_val"])
    first = checked.checked_dicts(_cfg(), "grefcoco_unc_val", training=False)
    assert loads == ["grefcoco_unc_train", "grefcoco_unc_val"]
    again = checked.checked_dicts(_cfg(), "grefcoco_unc_val", training=False)  # taken: loads anew
    assert loads[-1] == "grefcoco_unc_val" and len(loads) == 3 and again == first
    checked.release()
    checked.checked_dicts(_cfg(), "grefcoco_unc_train", training=True)
    assert len(loads) == 4  # released: nothing is kept past the run
