#!/usr/bin/env python
"""Benchmark multi-scale deformable attention: our C++ kernel (and CUDA kernel, when there is a
GPU) against the grid_sample reference, at the pixel decoder's real shapes.

Shapes: a 480x480 image gives the deformable encoder levels 60x60, 30x30 and 15x15 (strides
8, 16, 32), so S = Lq = 4725 (every token is a query); 8 heads x 32 channels; 4 points per head
and level.  Sampling locations are what the encoder makes of them: each query's own pixel
centre on every level plus offsets of a few pixels; attention weights are a softmax over the
12 samples of a head.

Time: median of --runs calls after --warmup calls, of the forward alone (inputs requiring
grad, as in training) and of forward + backward; all implementations in this one process,
one after the other, at the same torch thread count.

Peak memory, CPU: each (implementation, batch, forward or forward+backward) case runs once in a
fresh child process, which builds the inputs, warms the implementation up on tiny inputs (so
code loading and thread start-up are not counted), then resets the kernel's resident-set high
-water mark (``echo 5 > /proc/self/clear_refs``) and reports VmHWM - VmRSS from
/proc/self/status around the one call: the most memory the call held at once beyond its
inputs, outputs and gradients included.  The child runs with glibc's mmap threshold pinned at
64 KiB, so every tensor larger than that is its own mapping, counted while it lives and
returned when freed (rather than reusing heap pages that were already resident, which would
hide it).  Where clear_refs is not writable, the child falls back to the growth of
getrusage's ru_maxrss (an under-estimate when import-time peaks were higher).

Peak memory, CUDA: torch.cuda.max_memory_allocated around the call, minus what was
allocated before it.

    python tools/benchmark_ms_deform_attn.py                  # batch 1 and 2
    python tools/benchmark_ms_deform_attn.py --batches 1 --runs 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

LEVELS = ((60, 60), (30, 30), (15, 15))
HEADS, HEAD_DIM, POINTS = 8, 32, 4
TARGET_SPEEDUP = 4.0  # what impl="cpu" must reach, forward+backward at batch 1


def make_inputs(batch: int, device: str = "cpu", dtype=torch.float32, seed: int = 0, levels=LEVELS):
    """value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [h * w for h, w in levels]
    tokens = sum(sizes)
    spatial_shapes = torch.tensor(levels, dtype=torch.int64)
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    # Every token is a query; its reference point is its pixel centre, normalised.
    centres = []
    for height, width in levels:
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        centres.append(
            torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=-1)
        )
    reference = torch.cat(centres).view(1, tokens, 1, 1, 1, 2)
    level_wh = spatial_shapes.flip(-1).to(torch.float32).view(1, 1, 1, len(levels), 1, 2)
    offsets_px = 2.0 * torch.randn(
        batch, tokens, HEADS, len(levels), POINTS, 2, generator=generator
    )
    locations = reference + offsets_px / level_wh
    weights = torch.randn(batch, tokens, HEADS, len(levels) * POINTS, generator=generator).softmax(
        -1
    )
    weights = weights.view(batch, tokens, HEADS, len(levels), POINTS)
    value = torch.randn(batch, tokens, HEADS, HEAD_DIM, generator=generator)
    grad_output = torch.randn(batch, tokens, HEADS * HEAD_DIM, generator=generator)

    def prepare(t, grad):
        if not t.is_floating_point():
            # The level tables stay on the CPU, as the pixel decoder's python shapes reach the
            # op: a table on the GPU would be read back on every call, which is no kernel's cost.
            return t
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_() if grad else t

    return (
        prepare(value, True),
        prepare(spatial_shapes, False),
        prepare(starts, False),
        prepare(locations, True),
        prepare(weights, True),
        prepare(grad_output, False),
    )


def run_once(impl: str, inputs, backward: bool) -> None:
    from instalign_d2.layers.ms_deform_attn import ms_deform_attn

    value, spatial_shapes, starts, locations, weights, grad_output = inputs
    output = ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl=impl)
    if backward:
        # Gradients straight back, not accumulated into .grad: repeated runs stay alike.
        torch.autograd.grad(output, (value, locations, weights), grad_output)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(impl: str, inputs, backward: bool, device: str, warmup: int, runs: int) -> float:
    for _ in range(warmup):
        run_once(impl, inputs, backward)
    synchronize(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run_once(impl, inputs, backward)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# --------------------------------------------------------------------------- peak memory
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure_cpu_peak_in_this_process(impl: str, batch: int, backward: bool, threads: int) -> dict:
    """Child side of the CPU memory measurement (see the module docstring)."""
    torch.set_num_threads(threads)
    inputs = make_inputs(batch)
    run_once(impl, make_inputs(1, levels=((4, 4), (2, 2), (1, 1))), backward)  # warm-up, tiny
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current VmRSS
        before = _proc_status_kib("VmRSS")
        run_once(impl, inputs, backward)
        peak_kib = _proc_status_kib("VmHWM") - before
        method = "VmHWM"
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run_once(impl, inputs, backward)
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        method = "ru_maxrss"
    return {"peak_mib": peak_kib / 1024.0, "method": method}


def cpu_peak_mib(impl: str, batch: int, backward: bool, threads: int) -> tuple[float, str]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child-memory",
        impl,
        str(batch),
        str(int(backward)),
        str(threads),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"memory child for {impl} batch {batch} failed:\n{result.stderr[-2000:]}"
        )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return report["peak_mib"], report["method"]


def cuda_peak_mib(impl: str, inputs, backward: bool) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run_once(impl, inputs, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


# --------------------------------------------------------------------------- main
def describe_machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"torch {torch.__version__}, {threads} threads on {os.cpu_count()} cores ({cpu}){gpu}; "
        f"load average {load}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--runs", type=int, default=15, help="timed runs per case (median; at least 10)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurements"
    )
    parser.add_argument("--child-memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_memory:
        impl, batch, backward, threads = args.child_memory
        print(
            json.dumps(
                measure_cpu_peak_in_this_process(
                    impl, int(batch), bool(int(backward)), int(threads)
                )
            )
        )
        return 0
    if args.runs < 10:
        parser.error("--runs must be at least 10")

    from instalign_d2.layers.ms_deform_attn import msda_extension_info

    torch.set_num_threads(args.threads)
    build = msda_extension_info()
    cases = [("pytorch", "cpu")]
    if build != "missing":
        cases.append(("cpu", "cpu"))
    else:
        print(
            "instalign_d2._C is missing: only the reference is timed (pip install --no-build-isolation -e .)"
        )
    if torch.cuda.is_available():
        cases.append(("pytorch", "cuda"))
        if "cuda" in build:
            cases.append(("cuda", "cuda"))

    print(describe_machine(args.threads))
    print(
        f"levels {LEVELS}, Lq = S = {sum(h * w for h, w in LEVELS)}, {HEADS} heads x {HEAD_DIM} channels, "
        f"{POINTS} points; float32; median of {args.runs} runs after {args.warmup} warm-up; extension: {build}"
    )
    rows = []
    memory_methods = set()
    for batch in args.batches:
        baseline = {}
        for impl, device in cases:
            inputs = make_inputs(batch, device=device)
            forward = median_ms(impl, inputs, False, device, args.warmup, args.runs)
            both = median_ms(impl, inputs, True, device, args.warmup, args.runs)
            if args.no_memory:
                peak_fwd = peak_both = float("nan")
            elif device == "cuda":
                peak_fwd, peak_both = cuda_peak_mib(impl, inputs, False), cuda_peak_mib(
                    impl, inputs, True
                )
            else:
                (peak_fwd, method_f), (peak_both, method_b) = (
                    cpu_peak_mib(impl, batch, False, args.threads),
                    cpu_peak_mib(impl, batch, True, args.threads),
                )
                memory_methods.update((method_f, method_b))
            if impl == "pytorch":
                baseline[device] = (forward, both)
            ref_forward, ref_both = baseline[device]
            rows.append(
                (
                    f"{impl} ({device})",
                    batch,
                    forward,
                    both,
                    ref_forward / forward,
                    ref_both / both,
                    peak_fwd,
                    peak_both,
                )
            )

    header = (
        "impl",
        "batch",
        "forward ms",
        "fwd+bwd ms",
        "fwd x",
        "fwd+bwd x",
        "peak fwd MiB",
        "peak fwd+bwd MiB",
    )
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for name, batch, forward, both, speed_f, speed_b, peak_f, peak_b in rows:
        print(
            f"| {name} | {batch} | {forward:.1f} | {both:.1f} | {speed_f:.1f} | {speed_b:.1f} | "
            f"{peak_f:.1f} | {peak_b:.1f} |"
        )
    print(
        "\n'x' columns: speed-up over the grid_sample reference on the same device (higher is faster)."
    )
    if memory_methods:
        print(
            f"CPU peak memory: per case in a fresh process, via {', '.join(sorted(memory_methods))}."
        )

    verdict = [row for row in rows if row[0] == "cpu (cpu)" and row[1] == 1]
    if verdict:
        (_, _, _, _, _, speed, _, peak), ref_peak = verdict[0], next(
            row[7] for row in rows if row[0] == "pytorch (cpu)" and row[1] == 1
        )
        ok_speed = speed >= TARGET_SPEEDUP
        ok_memory = args.no_memory or peak <= ref_peak
        print(
            f"Target (cpu, batch 1, fwd+bwd >= {TARGET_SPEEDUP:.0f}x, peak memory <= reference): "
            f"{speed:.1f}x, {'met' if ok_speed and ok_memory else 'NOT met'}"
            + ("" if args.no_memory else f" ({peak:.1f} vs {ref_peak:.1f} MiB)")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
