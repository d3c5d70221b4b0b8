#!/usr/bin/env python
"""Where the time of one InstAlign training step goes, part by part (and the peak memory).

    python tools/profile_train_step.py --config-file configs/synthetic/instalign_tiny.yaml
    python tools/profile_train_step.py --config-file CFG --iters 5 --warmup 2 --json out.json \\
        --opts SOLVER.IMS_PER_BATCH 4

It trains the config's model (from random weights; the data are the config's, generated first
when they are the embedded synthetic set) for ``--warmup`` + ``--iters`` steps with the real
train loader, optimizer and losses, and times, per step: the data loader (mapping runs in the main
process when ``DATALOADER.NUM_WORKERS`` is 0, as in the tiny config), each part of Fig. 2 (backbone,
pixel decoder, text encoder, POT decoder, AIA and the no-target head), the matcher, each loss, the
backward pass and the optimizer step. Times are "self" times: a part that runs inside another (the
matcher inside the instance loss) is subtracted from it, so the rows add up to the step. The table
gives the mean over the timed steps; "other forward" is the forward time no row accounts for.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.modeling import build_model  # noqa: E402

import train_net  # noqa: E402  (the repository root's script: prepare_data, build_config)
from instalign_d2.data.build import build_gres_train_loader  # noqa: E402
from instalign_d2.solver import build_optimizer  # noqa: E402
from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: E402
from instalign_d2.utils.host_memory import keep_freed_host_memory  # noqa: E402

# (row name, attribute path on the model) of the modules timed by forward hooks, in Fig. 2 order.
# The pixel decoder is called through its Mask2Former-style ``forward_features``: wrapped instead.
MODULE_SECTIONS = (
    ("backbone", "backbone"),
    ("pixel decoder", "pixel_decoder.forward_features"),
    ("text encoder", "text_encoder"),
    ("POT decoder (K blocks + heads)", "transformer_decoder"),
    ("AIA (Eq. 8)", "aggregation"),
    ("no-target head (Eq. 10-12)", "no_target_head"),
    ("matcher (Eq. 5-6)", "criterion.matcher"),
)
# (row name, criterion method) of the losses timed by wrapping the method.
LOSS_SECTIONS = (
    ("loss: L_inst (Eq. 7)", "instance_losses"),
    ("loss: L_merged (Eq. 9)", "merged_loss"),
    ("loss: L_nt", "no_target_loss"),
)
ROWS = (
    ["data loader (mapping)"]
    + [name for name, _ in MODULE_SECTIONS]
    + [name for name, _ in LOSS_SECTIONS]
    + ["other forward", "backward", "optimizer step"]
)


class SectionTimer:
    """Self time of nested sections: entering a section pauses the one it runs inside."""

    def __init__(self):
        self.totals: Dict[str, float] = defaultdict(float)
        self._stack: List[List] = []  # [name, start of the running slice]

    def enter(self, name: str) -> None:
        now = time.perf_counter()
        if self._stack:
            outer = self._stack[-1]
            self.totals[outer[0]] += now - outer[1]
        self._stack.append([name, now])

    def exit(self) -> None:
        now = time.perf_counter()
        name, start = self._stack.pop()
        self.totals[name] += now - start
        if self._stack:
            self._stack[-1][1] = now  # the outer section resumes

    @contextlib.contextmanager
    def section(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.exit()

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            with self.section(name):
                return fn(*args, **kwargs)

        return timed


def _attribute(root, path: str):
    for part in path.split("."):
        root = getattr(root, part, None)
        if root is None:
            return None
    return root


def instrument(model: torch.nn.Module, timer: SectionTimer) -> List[str]:
    """Hook the parts of ``model`` into ``timer``; returns the rows the model does not have."""
    missing = []
    for name, path in MODULE_SECTIONS:
        module = _attribute(model, path)
        if module is None:
            missing.append(name)
            continue
        if not isinstance(module, torch.nn.Module):  # a method: wrap it on its module
            owner, method = path.rsplit(".", 1)
            setattr(_attribute(model, owner), method, timer.wrap(name, module))
            continue
        module.register_forward_pre_hook(lambda *_, name=name: timer.enter(name))
        module.register_forward_hook(lambda *_: timer.exit())
    for name, method in LOSS_SECTIONS:
        fn = getattr(model.criterion, method, None)
        if fn is None:
            missing.append(name)
            continue
        setattr(model.criterion, method, timer.wrap(name, fn))  # shadows the bound method
    return missing


def peak_memory_mib(device: torch.device) -> Dict[str, float]:
    if device.type == "cuda":
        return {"peak_cuda_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    # ru_maxrss is in KiB on Linux: the process's peak resident memory so far.
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def profile(cfg, iters: int, warmup: int) -> Dict[str, object]:
    """Train ``warmup + iters`` steps; mean seconds per row over the last ``iters``."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = build_optimizer(cfg, model)
    loader = iter(build_gres_train_loader(cfg))
    timer = SectionTimer()
    missing = instrument(model, timer)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    steps: List[Dict[str, float]] = []
    for step in range(warmup + iters):
        timer.totals.clear()
        start = time.perf_counter()
        with timer.section("data loader (mapping)"):
            batch = next(loader)
        with timer.section("other forward"):
            losses = model(batch)
            total = sum(losses.values())
            sync()
        with timer.section("backward"):
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            sync()
        with timer.section("optimizer step"):
            optimizer.step()
            sync()
        row = dict(timer.totals)
        row["step"] = time.perf_counter() - start
        row["loss"] = float(total.detach())
        if step >= warmup:
            steps.append(row)
    mean = {name: sum(s.get(name, 0.0) for s in steps) / len(steps) for name in ROWS + ["step"]}
    return {
        "seconds": mean,
        "losses": [s["loss"] for s in steps],
        "missing_parts": missing,
        "expressions_per_step": sum(len(b) if isinstance(b, list) else 1 for b in batch),
        **peak_memory_mib(device),
    }


def format_table(result: Dict[str, object]) -> str:
    seconds = result["seconds"]
    step = seconds["step"]
    rows = [
        [name, f"{1000 * seconds[name]:.1f}", f"{100 * seconds[name] / step:.1f}"]
        for name in ROWS
        if name not in result["missing_parts"]
    ]
    rows.append(["**step (sum)**", f"{1000 * step:.1f}", "100.0"])
    return tabulate(
        rows, headers=["part", "ms / step", "%"], tablefmt="pipe", disable_numparse=True
    )


def build_cfg(config_file: str, opts: Sequence[str]):
    args = train_net.default_argument_parser().parse_args(["--config-file", config_file, *opts])
    cfg = train_net.build_config(args)
    cfg.defrost()
    # Random weights: the profile is about time, and a pre-trained trunk costs the same.
    cfg.MODEL.TIMM.PRETRAINED_WEIGHTS = ""
    cfg.MODEL.TIMM.SYNTHETIC_PRETRAIN.ITERATIONS = 0
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True)
    parser.add_argument(
        "--iters", type=int, default=5, help="timed steps (the table is their mean)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--json", default="", help="also write the numbers here")
    parser.add_argument(
        "--opts", nargs=argparse.REMAINDER, default=[], help="config KEY VALUE pairs"
    )
    args = parser.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    cfg = build_cfg(args.config_file, args.opts)
    train_net.prepare_data(cfg)
    if cfg.KEEP_FREED_HOST_MEMORY:  # as train_net.py does: the step as it runs in training
        keep_freed_host_memory()
    result = profile(cfg, args.iters, args.warmup)
    memory = ", ".join(f"{k} {v:.0f}" for k, v in result.items() if k.startswith("peak_"))
    print(
        f"One training step of {args.config_file} ({result['expressions_per_step']} expressions, "
        f"mean of {args.iters} after {args.warmup} warm-up, {torch.get_num_threads()} threads; "
        f"{memory}):"
    )
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, {"config": args.config_file, **result})
    return result


if __name__ == "__main__":
    main()
