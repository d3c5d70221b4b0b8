#!/usr/bin/env python
"""Parameters, FLOPs and training-step cost of an InstAlign config, as Detectron2's tools/analyze_model.py.

    python tools/analyze_model.py --config-file configs/grefcoco/instalign_swin_base.yaml \
        --tasks parameter flop time [--opts KEY VALUE ...]

The model is built with random weights (no checkpoint, nothing downloaded) and fed a synthetic
input of ``INPUT.IMAGE_SIZE``² (480² for the paper) with one expression per image. When the
config's text encoder directory is absent, a RoBERTa-base-sized one (hidden 768, 12 layers,
12 heads, FFN 3072, vocabulary 50265, 514 positions) is generated in a temporary directory, so
the paper config's sizes are right without the real roberta-base files.

Tasks:
  parameter  fvcore's parameter table (to --max-depth) and the count of every part of Fig. 2.
  flop       fvcore FLOP count of one inference forward (encode_images + decode_expressions).
             fvcore counts one fused multiply-add as one flop. Two ops it does not know get our
             handles: multi-scale deformable attention, 5 multiply-adds per sampled point and
             channel (4 for the bilinear sample, 1 for its attention weight), and
             scaled_dot_product_attention, the two matrix products Q K^T and A V.
             Element-wise ops are not counted (fvcore's convention); they are listed.
  time       mean wall time of a training forward + backward (losses included) over --iters
             steps after one warm-up, and the peak memory: on CUDA torch's peak allocation, on the
             CPU the process's peak resident set (ru_maxrss), next to the resident set before.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from typing import Dict, List

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Instances
from fvcore.nn import FlopCountAnalysis, parameter_count, parameter_count_table
from fvcore.nn.jit_handles import get_shape
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import instalign_d2.instalign_model  # noqa: E402,F401  (registers InstAlign and its parts)
from instalign_d2.config import add_instalign_config  # noqa: E402
from instalign_d2.synthetic.text_encoder import write_local_text_encoder  # noqa: E402
from instalign_d2.utils.paths import expand_path  # noqa: E402
from instalign_d2.utils.tokenizer import is_text_encoder_dir  # noqa: E402

logger = logging.getLogger("analyze_model")

# The vocabulary and position table of roberta-base, so a generated stand-in has its size.
ROBERTA_BASE = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072}
ROBERTA_BASE_VOCAB, ROBERTA_BASE_POSITIONS = 50265, 514
EXPRESSION = "the man on the left and the dog next to him"
PARTS = (
    "backbone",
    "pixel_decoder",
    "text_encoder",
    "transformer_decoder",
    "aggregation",
    "no_target_head",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=["parameter", "flop", "time"],
        default=["parameter", "flop", "time"],
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images (one expression each) per forward"
    )
    parser.add_argument(
        "--iters", type=int, default=3, help="timed training steps (after one warm-up)"
    )
    parser.add_argument("--max-depth", type=int, default=3, help="depth of the parameter table")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (overrides MODEL.DEVICE)")
    parser.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config overrides, KEY VALUE pairs"
    )
    return parser.parse_args(argv)


def setup_cfg(args, scratch_dir: str):
    cfg = add_instalign_config(get_cfg())
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    # Random init: the analysis needs no checkpoint, and must not fail for want of one.
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.MODEL.TEXT_ENCODER.PRETRAINED = False
    if not is_text_encoder_dir(expand_path(cfg.MODEL.TEXT_ENCODER.NAME)):
        cfg.MODEL.TEXT_ENCODER.NAME = roberta_base_sized_encoder(
            scratch_dir, cfg.MODEL.TEXT_ENCODER.MAX_TOKENS
        )
        logger.info(
            "text encoder directory absent: using a generated RoBERTa-base-sized one (%s)",
            cfg.MODEL.TEXT_ENCODER.NAME,
        )
    cfg.freeze()
    return cfg


def roberta_base_sized_encoder(scratch_dir: str, max_tokens: int) -> str:
    """A tokenizer + RobertaConfig with roberta-base's sizes (random weights are built from it)."""
    directory = write_local_text_encoder(
        os.path.join(scratch_dir, "roberta_base_sized"),
        [EXPRESSION, "a red car", "two dogs on the grass"],
        vocab_size=500,
        max_tokens=max_tokens,
        **ROBERTA_BASE,
    )
    # Our small BPE vocabulary has far fewer tokens; the embedding tables take roberta-base's size.
    config_path = os.path.join(directory, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(vocab_size=ROBERTA_BASE_VOCAB, max_position_embeddings=ROBERTA_BASE_POSITIONS)
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    return directory


def synthetic_inputs(model, cfg, batch_size: int) -> List[Dict]:
    """Random images with two rectangular instances each and one tokenised expression."""
    size = cfg.INPUT.IMAGE_SIZE
    encoded = model.text_encoder.tokenize([EXPRESSION])
    inputs = []
    for b in range(batch_size):
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        masks[0, size // 8 : size // 2, size // 8 : size // 3] = True
        masks[1, size // 3 : size - size // 8, size // 2 : size - size // 8] = True
        instances = Instances((size, size))
        instances.gt_masks = masks
        instances.gt_classes = torch.zeros(2, dtype=torch.long)
        inputs.append(
            {
                "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8),
                "height": size,
                "width": size,
                "file_name": f"synthetic_{b}.jpg",
                "instances": instances,
                "gt_mask_merged": masks.any(0),
                "empty": False,
                "input_ids": encoded["input_ids"][0],
                "attention_mask": encoded["attention_mask"][0],
            }
        )
    return inputs


# ----------------------------------------------------------------------------- parameter
def count_parameters(model, max_depth: int) -> Dict[str, int]:
    print(parameter_count_table(model, max_depth=max_depth))
    counts = parameter_count(model)
    summary = {part: counts.get(part, 0) for part in PARTS}
    summary["total"] = counts[""]
    summary["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("\nParameters by part of Fig. 2:")
    for name, value in summary.items():
        print(f"  {name:<20} {value / 1e6:9.2f} M")
    return summary


# ----------------------------------------------------------------------------- flop
class InferenceForward(nn.Module):
    """Tensors in, tensors out: what fvcore's tracer needs around the model's two paths."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        visual = self.model.encode_images([{"image": image} for image in images])
        image_index = torch.arange(images.shape[0], device=images.device)
        outputs = self.model.decode_expressions(visual, image_index, input_ids, attention_mask)
        return outputs["predictions"][-1]["merged_logits"], outputs["no_target_logits"]


def ms_deform_attn_flop(inputs, outputs) -> int:
    """5 multiply-adds per sampled point and channel: ``B * Lq * M * L * P * D * 5``."""
    batch, _, heads, head_dim = get_shape(inputs[0])
    _, num_queries, _, levels, points, _ = get_shape(inputs[3])
    return batch * num_queries * heads * levels * points * head_dim * 5


def grid_sampler_flop(inputs, outputs) -> int:
    """Bilinear sampling (the deformable attention's PyTorch fallback): 4 multiply-adds per output value."""
    count = 1
    for d in get_shape(outputs[0]):
        count *= d
    return 4 * count


def scaled_dot_product_attention_flop(inputs, outputs) -> int:
    """``Q K^T`` and ``A V``: ``B * heads * Lq * Lk * (D + Dv)`` multiply-adds."""
    query, key, value = (get_shape(v) for v in inputs[:3])
    *batch_dims, num_queries, head_dim = query
    num_keys, value_dim = key[-2], value[-1]
    batch = 1
    for d in batch_dims:
        batch *= d
    return batch * num_queries * num_keys * (head_dim + value_dim)


def count_flops(model, inputs) -> Dict[str, float]:
    model.eval()
    images = torch.stack([x["image"] for x in inputs]).to(model.device)
    input_ids = torch.stack([x["input_ids"] for x in inputs]).to(model.device)
    attention_mask = torch.stack([x["attention_mask"] for x in inputs]).to(model.device)
    analysis = FlopCountAnalysis(InferenceForward(model), (images, input_ids, attention_mask))
    analysis.set_op_handle(
        "prim::PythonOp._MSDeformAttnFunction",
        ms_deform_attn_flop,
        "aten::scaled_dot_product_attention",
        scaled_dot_product_attention_flop,
        "aten::grid_sampler",
        grid_sampler_flop,
    )
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings(
        "none"
    )
    by_module = analysis.by_module()
    summary = {part: by_module.get(f"model.{part}", 0) / 1e9 for part in PARTS}
    summary["total"] = analysis.total() / 1e9
    print(f"\nGFLOPs of one inference forward (batch {len(inputs)}, {tuple(images.shape[-2:])}):")
    for name, value in summary.items():
        print(f"  {name:<20} {value:9.2f}")
    skipped = Counter(analysis.unsupported_ops())
    if skipped:
        print(
            "  not counted (element-wise, fvcore has no handle):",
            ", ".join(f"{k} x{v}" for k, v in skipped.most_common()),
        )
    summary["not_counted_ops"] = dict(skipped)
    return summary


# ----------------------------------------------------------------------------- time
def _resident_set_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def time_training_step(model, inputs, iters: int) -> Dict[str, float]:
    model.train()
    cuda = model.device.type == "cuda"

    def step():
        losses = model(inputs)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    rss_before = _resident_set_mib()
    step()  # warm-up: lazy initialisations, allocator growth
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = (time.perf_counter() - start) / iters
    result = {"seconds_per_step": seconds, "threads": torch.get_num_threads()}
    print(
        f"\nTraining step (forward + losses + backward), batch {len(inputs)}, {model.device.type}:"
    )
    print(f"  {seconds:.2f} s per step (mean of {iters}, {torch.get_num_threads()} threads)")
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        print(f"  peak GPU memory allocated: {result['peak_memory_mib']:.0f} MiB")
    else:
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["rss_before_mib"] = rss_before
        print(
            f"  peak resident memory: {result['peak_rss_mib']:.0f} MiB "
            f"(model and inputs alone: {rss_before:.0f} MiB)"
        )
    return result


def main(argv=None) -> Dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    results = {"config": args.config_file}
    with tempfile.TemporaryDirectory(prefix="analyze_model_") as scratch:
        cfg = setup_cfg(args, scratch)
        torch.manual_seed(0)
        model = build_model(cfg)
        inputs = synthetic_inputs(model, cfg, args.batch_size)
        backbone = cfg.MODEL.BACKBONE.NAME
        if backbone == "TimmBackbone":
            backbone = cfg.MODEL.TIMM.NAME
        c = cfg.MODEL.INSTALIGN
        size = cfg.INPUT.IMAGE_SIZE
        print(f"config {args.config_file}: {backbone}, text {cfg.MODEL.TEXT_ENCODER.NAME}")
        print(f"  K={c.DEC_LAYERS}, N={c.NUM_OBJECT_QUERIES}, C={c.HIDDEN_DIM}, {size}x{size}")
        # Time first, so that the process's peak memory is the training step's, not the tracer's.
        if "parameter" in args.tasks:
            results["parameters"] = count_parameters(model, args.max_depth)
        if "time" in args.tasks:
            results["time"] = time_training_step(model, inputs, args.iters)
        if "flop" in args.tasks:
            results["gflops"] = count_flops(model, inputs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
