"""demo/predictor.py and demo/demo.py on generated images, including every bad input."""

import json
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from PIL import Image
from predictor import GRESPredictor

import demo as demo_cli
from instalign_d2.engine import AtomicCheckpointer


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_cfg):
    """A tiny (untrained) model saved as a checkpoint, and its config written as a yaml file."""
    folder = tmp_path_factory.mktemp("demo_model")
    cfg = tiny_cfg()
    cfg.MODEL.INSTALIGN.TEST.INSTANCE_SCORE_THRESH = (
        0.0  # an untrained model: keep instances to draw
    )
    cfg.MODEL.INSTALIGN.TEST.NO_TARGET_THRESHOLD = 0.999
    torch.manual_seed(0)
    from detectron2.modeling import build_model

    model = build_model(cfg)
    AtomicCheckpointer(model, save_dir=str(folder)).save("model")
    cfg.MODEL.WEIGHTS = str(folder / "model.pth")
    config_file = folder / "config.yaml"
    config_file.write_text(cfg.dump())
    return cfg, str(config_file)


def scene(height=90, width=120):
    image = np.full((height, width, 3), 30, np.uint8)
    image[10:40, 10:50] = (0, 0, 220)  # red in BGR
    image[50:80, 70:110] = (220, 0, 0)  # blue in BGR
    return image


def test_predictor_encodes_the_image_once_and_matches_single_expressions(trained):
    cfg, _ = trained
    predictor = GRESPredictor(cfg)
    calls = []
    original = predictor.model.encode_images
    predictor.model.encode_images = lambda inputs: calls.append(len(inputs)) or original(inputs)
    image = scene()
    outputs = predictor(image, ["the red square", "both blue circles", "the purple cone"])
    assert calls == [1]  # one image, one visual pass for three expressions
    assert len(outputs) == 3
    for text, out in zip(["the red square", "both blue circles", "the purple cone"], outputs):
        assert out["expression"] == text
        assert out["ref_seg"].shape == (90, 120) and out["mask"].dtype == torch.bool
        assert 0.0 <= float(out["nt_prob"]) <= 1.0
        assert len(out["instance_words"]) == len(out["instances"])
        words = text.split()
        assert all(w in words for ws in out["instance_words"] for w in ws)
        single = predictor(image, [text])[0]
        assert torch.allclose(single["ref_seg"], out["ref_seg"], atol=1e-5)
        assert float(single["nt_prob"]) == pytest.approx(float(out["nt_prob"]), abs=1e-6)


def test_predictor_keeps_the_encoding_of_recent_images(trained):
    cfg, _ = trained
    predictor = GRESPredictor(cfg, cache_size=2)
    backbone_calls = []
    predictor.model.backbone.register_forward_hook(
        lambda module, args, out: backbone_calls.append(args[0].shape[0])
    )
    first = predictor(scene(), ["the red square"])
    again = predictor(
        scene().copy(), ["both blue circles", "the red square"]
    )  # same pixels, new array
    assert backbone_calls == [1]
    assert torch.allclose(again[1]["ref_seg"], first[0]["ref_seg"], atol=1e-5)
    # The cached path gives what the model's own forward gives.
    inputs = predictor._model_inputs(scene(), ["both blue circles", "the red square"])
    reference = predictor.model(inputs)
    for ours, theirs in zip(again, reference):
        assert torch.allclose(ours["ref_seg"], theirs["ref_seg"], atol=1e-6)
        assert float(ours["nt_prob"]) == pytest.approx(float(theirs["nt_prob"]), abs=1e-6)
    backbone_calls.clear()
    other = scene()
    other[0, 0] = 255  # one pixel differs: another image
    predictor(other, ["the red square"])
    predictor(scene(60, 80), ["the red square"])  # a third image evicts the least recently used
    predictor(other, ["the red square"])
    predictor(scene(), ["the red square"])
    assert backbone_calls == [1, 1, 1]


def test_predictor_rejects_bad_inputs_clearly(trained):
    predictor = GRESPredictor(trained[0])
    from predictor import BadInputError

    with pytest.raises(BadInputError, match="expression 2 is empty"):
        predictor(scene(), ["the red square", "   "])
    with pytest.raises(BadInputError, match="at least 32 px"):
        predictor(scene(20, 100), ["the red square"])
    with pytest.raises(BadInputError, match="largest side may be 4000"):
        predictor(np.zeros((40, 4100, 3), np.uint8), ["the red square"])
    grey = predictor(scene()[:, :, 0], ["the red square"])  # (H, W) greyscale works
    assert grey[0]["ref_seg"].shape == (90, 120)


def write_inputs(folder):
    """Images that must work, and bad files; returns (good: {path: (h, w)}, bad: [paths])."""
    rgb = scene()[:, :, ::-1]
    good = {}
    Image.fromarray(rgb).save(folder / "rgb.png")
    good["rgb.png"] = (90, 120)
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    good["grey.png"] = (90, 120)
    Image.fromarray(rgb).convert("RGBA").save(folder / "rgba.png")
    good["rgba.png"] = (90, 120)
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(folder / "deep16.png")
    assert Image.open(folder / "deep16.png").mode.startswith("I;16")
    good["deep16.png"] = (90, 120)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg")
    good["cmyk.jpg"] = (90, 120)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees -> the image is 120 high, 90 wide
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    good["rotated.jpg"] = (120, 90)
    bad = []
    Image.fromarray(rgb[:20]).save(folder / "tiny.png")
    bad.append("tiny.png")
    Image.fromarray(np.zeros((40, 4100, 3), np.uint8)).save(folder / "huge.png")
    bad.append("huge.png")
    (folder / "notes.png").write_text("this is not an image")
    bad.append("notes.png")
    bad.append("missing.jpg")
    return good, bad


def test_demo_writes_pictures_and_json_and_reports_each_bad_input(trained, tmp_path, capsys):
    _, config_file = trained
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good, bad = write_inputs(inputs)
    long_text = "the small red circle and the blue square " * 4
    texts = ["the red square", "le cercle rouge très grand ✓", long_text, ""]
    output = tmp_path / "out"
    argv = [
        "--config-file",
        config_file,
        "--input",
        *[str(inputs / n) for n in list(good) + bad],
        "--output",
        str(output),
    ]
    for text in texts:
        argv += ["--text", text]
    rc = demo_cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 1  # some inputs were bad

    errors = [line for line in err.splitlines() if line.startswith("demo: error:")]
    assert len(errors) == len(bad) + 1  # one line per bad image, and one for the empty text
    assert any("--text #4" in line and "empty" in line for line in errors)
    for name in bad:
        assert sum(name in line for line in errors) == 1, name
    assert any("tiny.png" in line and "32 px" in line for line in errors)
    assert any("huge.png" in line and "4000" in line for line in errors)
    assert any("missing.jpg" in line and "no such file" in line for line in errors)
    assert any("notes.png" in line and "not a readable image" in line for line in errors)
    assert (
        "longer than MAX_TOKENS=12 were truncated" in captured.out + captured.err
    )  # the long expression

    for name, (height, width) in good.items():
        stem = os.path.splitext(name)[0]
        record = json.loads((output / f"{stem}.json").read_text())
        assert (record["height"], record["width"]) == (height, width)
        assert [a["expression"] for a in record["answers"]] == [t.strip() for t in texts[:3]]
        for k, answer in enumerate(record["answers"]):
            mask = mask_util.decode(
                {
                    "size": answer["mask_rle"]["size"],
                    "counts": answer["mask_rle"]["counts"].encode(),
                }
            )
            assert mask.shape == (height, width)
            assert int(mask.sum()) == answer["mask_area"]
            for instance in answer["instances"]:
                assert tuple(instance["mask_rle"]["size"]) == (height, width)
                assert 0.0 <= instance["score"] <= 1.0
            picture = Image.open(output / f"{stem}__{k}.png")
            assert picture.mode == "RGB" and picture.width >= 2 * width
    assert not [p for p in os.listdir(output) if p.startswith(".")]
