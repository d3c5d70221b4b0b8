"""tools/analyze_model.py: parameter, FLOP and time counts of a tiny model."""

import os

from detectron2.config import get_cfg
from detectron2.modeling import build_model

import instalign_d2  # noqa: F401  (registers InstAlign)
from instalign_d2.config import add_instalign_config


def test_analyze_model_tool_counts_parameters_flops_and_time(
    load_tool, repo_root, tiny_text_encoder, tiny_max_tokens, tiny_image_size, tmp_path
):
    tool = load_tool("analyze_model")
    root = repo_root
    opts = [
        "MODEL.TIMM.NAME",
        "test_efficientnet",
        "MODEL.TEXT_ENCODER.NAME",
        tiny_text_encoder,
        "MODEL.TEXT_ENCODER.MAX_TOKENS",
        str(tiny_max_tokens),
        "INPUT.IMAGE_SIZE",
        str(tiny_image_size),
        "MODEL.INSTALIGN.DEC_LAYERS",
        "2",
        "MODEL.INSTALIGN.TRAIN_NUM_POINTS",
        "256",
    ]
    results = tool.main(
        [
            "--config-file",
            os.path.join(root, "configs", "synthetic", "instalign_tiny.yaml"),
            "--iters",
            "1",
            "--json",
            str(tmp_path / "out.json"),
            "--opts",
            *opts,
        ]
    )
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(os.path.join(root, "configs", "synthetic", "instalign_tiny.yaml"))
    cfg.merge_from_list(opts)
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = False
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""  # as the tool: random init, nothing read
    reference = build_model(cfg)
    params = results["parameters"]
    assert params["total"] == sum(p.numel() for p in reference.parameters())
    assert params["text_encoder"] == sum(p.numel() for p in reference.text_encoder.parameters())
    flops = results["gflops"]
    assert (
        flops["total"] > 0
        and flops["backbone"] > 0
        and flops["pixel_decoder"] > 0
        and flops["transformer_decoder"] > 0
    )
    # The deformable attention and SDPA are counted by our handles, not skipped.
    assert not any(
        "MSDeformAttn" in op or "scaled_dot_product" in op for op in flops["not_counted_ops"]
    )
    assert (
        results["time"]["seconds_per_step"] > 0
        and results["time"]["peak_rss_mib"] >= results["time"]["rss_before_mib"]
    )
    assert os.path.isfile(tmp_path / "out.json")
