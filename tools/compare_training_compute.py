#!/usr/bin/env python
"""Training compute of several configs, side by side in one process: seconds per step and the
seconds of the whole schedule (seconds per step x SOLVER.MAX_ITER), with their ratio to the first.

    python tools/compare_training_compute.py \\
        --variant before configs/synthetic/instalign_tiny.yaml SOLVER.MAX_ITER 4000 \\
        --variant now configs/synthetic/instalign_tiny.yaml

Each ``--variant NAME CONFIG [KEY VALUE ...]`` builds its model, optimizer and train loader (random
weights: the time of a step does not depend on them). After ``--warmup`` untimed steps each, the
variants take one step in turn, ``--rounds`` times, the first one of each round rotating, so that
a machine that slows down or speeds up meanwhile weighs on all of them alike; the table gives the
median step. Run it on a quiet machine: other processes on the same cores slow each variant by a
different factor.

Its ratios are a first look, not a budget: the savings of a smaller variant come out larger here
than in whole runs (96 x 96 against 128 x 128 inputs for the tiny config: 0.59-0.66 here, 0.75-0.77
from ``train_net.py`` runs one at a time), probably because variants that take turns in one process
evict each other's data from the CPU caches. Set budgets from whole runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from detectron2.modeling import build_model  # noqa: E402

import train_net  # noqa: E402  (the repository root's script: prepare_data)
from instalign_d2.data.build import build_gres_train_loader  # noqa: E402
from instalign_d2.solver import build_optimizer  # noqa: E402
from instalign_d2.utils.atomic_io import atomic_write_json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from profile_train_step import build_cfg  # noqa: E402  (random weights, no pre-training)


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` gives it (``platform.processor()`` where it cannot)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


class Trainee:
    """One variant: its model, optimizer and loader, stepped on demand."""

    def __init__(self, name: str, cfg):
        self.name = name
        self.max_iter = int(cfg.SOLVER.MAX_ITER)
        torch.manual_seed(0)
        self.model = build_model(cfg).train()
        self.optimizer = build_optimizer(cfg, self.model)
        self.loader = iter(build_gres_train_loader(cfg))
        self.seconds: List[float] = []

    def step(self, timed: bool) -> None:
        start = time.perf_counter()
        losses = self.model(next(self.loader))
        self.optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self.optimizer.step()
        if timed:
            self.seconds.append(time.perf_counter() - start)


def compare(trainees: Sequence[Trainee], rounds: int, warmup: int) -> List[Dict[str, object]]:
    for trainee in trainees:
        for _ in range(warmup):
            trainee.step(timed=False)
    for r in range(rounds):
        for i in range(len(trainees)):
            trainees[(r + i) % len(trainees)].step(timed=True)
    rows = []
    for trainee in trainees:
        per_step = statistics.median(trainee.seconds)
        rows.append(
            {
                "variant": trainee.name,
                "max_iter": trainee.max_iter,
                "seconds_per_step": per_step,
                "training_seconds": per_step * trainee.max_iter,
                "steps": trainee.seconds,
            }
        )
    for row in rows:
        row["ratio_to_first"] = row["training_seconds"] / rows[0]["training_seconds"]
    return rows


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    return tabulate(
        [
            [
                r["variant"],
                r["max_iter"],
                f"{r['seconds_per_step']:.3f}",
                f"{r['training_seconds']:.0f}",
                f"{r['ratio_to_first']:.2f}",
            ]
            for r in rows
        ],
        headers=["variant", "SOLVER.MAX_ITER", "s / step (median)", "training s", "ratio"],
        tablefmt="pipe",
        disable_numparse=True,
    )


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME CONFIG [KEY VALUE ...]",
        help="a name, a config file and config KEY VALUE pairs; give it once per config",
    )
    parser.add_argument("--rounds", type=int, default=7, help="timed steps of each variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument("--json", default="", help="also write the numbers here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    for variant in args.variant:
        if len(variant) < 2 or len(variant) % 2:
            parser.error(f"--variant {' '.join(variant)}: expected NAME CONFIG [KEY VALUE ...]")

    trainees = []
    for name, config, *opts in args.variant:
        cfg = build_cfg(config, opts)
        train_net.prepare_data(cfg)
        trainees.append(Trainee(name, cfg))
    rows = compare(trainees, args.rounds, args.warmup)
    print(
        f"Training compute, {args.rounds} steps of each variant in turn after {args.warmup} "
        f"warm-up ({cpu_model()}, {torch.get_num_threads()} threads):"
    )
    print(format_table(rows))
    if args.json:
        atomic_write_json(args.json, {"cpu": cpu_model(), "variants": rows})
    return rows


if __name__ == "__main__":
    main()
