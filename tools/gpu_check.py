#!/usr/bin/env python
"""One command that proves a GPU machine for instalign_d2: the build, the CUDA op, its speed,
a training step and inference throughput of the paper config, and optionally ``make train``.

    python tools/gpu_check.py                              # every part but make-train
    python tools/gpu_check.py --output gpu_check.json      # the table also as JSON (atomic)
    python tools/gpu_check.py --parts build op             # some parts
    python tools/gpu_check.py --train                      # and the synthetic make train on the GPU
    python tools/gpu_check.py --text-encoder models/roberta-base   # a real text encoder folder

Without a GPU it prints one line saying so and exits 0.  With one it prints one table (part,
check, status, detail), writes it with every measured number to ``--output``, and exits 1 when
any check failed.  Statuses: ok, FAIL, warn (worth a look, not a failure), info, skip.

Parts:
  build       instalign_d2._C's kernels, the GPU and its architecture, and whether this build
              carries kernels the GPU can run (else how to rebuild with TORCH_CUDA_ARCH_LIST);
              whether an error raised inside _C reaches Python (a C++ runtime mismatch between
              the compiler and the loaded libstdc++ kills the process instead).
  op          the CUDA kernel against the C++ CPU kernel and the float64 grid_sample reference
              (computed from the same rounded inputs): forward and the three gradients, in
              float64/32/16 and bfloat16, at the paper's shapes and at edge cases; outside samples
              with non-finite weights; the non-determinism alert; no synchronisation per step.
  speed       our kernel against the reference on the GPU (tools/benchmark_ms_deform_attn.py's
              inputs and timers): forward and forward+backward, batch 1 and 8, peak memory.
  train-step  the paper config (configs/grefcoco/instalign_swin_base.yaml, random weights, a
              RoBERTa-base-sized text encoder unless --text-encoder) at the paper's batch per GPU:
              training steps in fp32, bf16 autocast and fp16 autocast with the grad scaler; the
              step-0 losses must be finite and agree across precisions; expressions/s, peak memory.
  eval        --eval-only-style throughput of the paper config, one forward per expression
              against the expressions of an image decoded together (tools/benchmark_inference.py).
  make-train  (with --train) the synthetic ``make train`` on the GPU: time to the end, metrics.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
for folder in (REPO, TOOLS):
    if folder not in sys.path:
        sys.path.insert(0, folder)

PARTS = ("build", "op", "speed", "train-step", "eval", "make-train")
DEFAULT_PARTS = PARTS[:-1]
PAPER_CONFIG = os.path.join(REPO, "configs", "grefcoco", "instalign_swin_base.yaml")
TINY_CONFIG = os.path.join(REPO, "configs", "synthetic", "instalign_tiny.yaml")
STATUSES = ("ok", "FAIL", "warn", "info", "skip")

# Largest error the CUDA kernel may show, relative to the largest magnitude of the compared
# tensor, against float64 computed from the same rounded inputs (as tests/test_ms_deform_attn.py).
OP_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
# Step-0 losses under autocast against fp32, each loss's difference relative to the fp32 total.
LOSS_TOLERANCE = {"bf16": 0.05, "fp16": 0.02}
# Largest difference of ref_seg probabilities between grouped and one-at-a-time inference.
EVAL_TOLERANCE = 1e-2


@dataclass
class Row:
    """One line of the table; ``values`` holds the numbers behind it for the JSON."""

    part: str
    check: str
    status: str
    detail: str = ""
    values: Dict = field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"Row: status must be one of {STATUSES}, got {self.status!r}")


def log(message: str) -> None:
    """Progress goes to stderr, so stdout carries only the table."""
    print(f"gpu_check: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- table and JSON
def format_table(rows: Sequence[Row]) -> str:
    """A GitHub-style table of the rows (``|`` inside a cell is escaped)."""
    header = ("part", "check", "status", "detail")
    cells = [header] + [
        tuple(str(text).replace("|", "\\|").replace("\n", " ") for text in row_cells)
        for row_cells in ((r.part, r.check, r.status, r.detail) for r in rows)
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]

    def line(values):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(c) for c in cells[1:]])


def failed(rows: Sequence[Row]) -> List[Row]:
    return [row for row in rows if row.status == "FAIL"]


def _json_safe(value):
    """NaN and infinities as strings (JSON has none), tuples as lists, dtypes as names."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def make_report(rows: Sequence[Row], machine: Dict, parts: Sequence[str]) -> Dict:
    return _json_safe(
        {
            "machine": machine,
            "parts": list(parts),
            "passed": not failed(rows),
            "failures": [f"{r.part}: {r.check}: {r.detail}" for r in failed(rows)],
            "rows": [asdict(r) for r in rows],
        }
    )


def write_report(path: str, report: Dict) -> str:
    """The report as JSON at ``path``: a temporary file renamed into place, so a reader never
    sees half a report."""
    from instalign_d2.utils.atomic_io import atomic_write_json

    return atomic_write_json(path, report)


def describe_machine() -> Dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {
                    "index": index,
                    "name": props.name,
                    "arch": f"sm_{props.major}{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return info


def no_gpu_line() -> str:
    return (
        f"gpu_check: no CUDA GPU visible (torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda or 'none'}); nothing to check here."
    )


# ----------------------------------------------------------------------------- comparisons
def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 on the CPU: errors on the scale of
    the tensor, so entries that cancel to near zero do not demand impossible digits.  0 for
    empty tensors, inf for a shape mismatch or a non-finite entry in either."""
    if tuple(actual.shape) != tuple(expected.shape):
        return math.inf
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not (torch.isfinite(a).all() and torch.isfinite(e).all()):
        return math.inf
    scale = e.abs().max().item()
    error = (a - e).abs().max().item()
    if error == 0.0:
        return 0.0
    return error / scale if scale > 0 else math.inf


def worst_error(
    actual: Sequence[torch.Tensor],
    expected: Sequence[torch.Tensor],
    skip_locations: Optional[torch.Tensor] = None,
) -> Dict:
    """relative_error of output and the three gradients, by name.  ``skip_locations``: a bool
    mask over the samples (B, Lq, heads, levels, points) whose location gradients are left out
    (see near_pixel_lines)."""
    names = ("output", "grad_value", "grad_locations", "grad_weights")
    actual, expected = list(actual), list(expected)
    if skip_locations is not None and skip_locations.any():
        keep = ~skip_locations.cpu()[..., None]
        actual[2] = actual[2].detach().cpu() * keep
        expected[2] = expected[2].detach().cpu() * keep
    return {name: relative_error(a, e) for name, a, e in zip(names, actual, expected)}


def near_pixel_lines(
    locations: torch.Tensor, shapes: Sequence[Tuple[int, int]], dtype: torch.dtype
) -> torch.Tensor:
    """Samples (B, Lq, heads, levels, points) within rounding of a pixel-centre line.

    The bilinear sample's derivative in x jumps where x * W - 0.5 crosses an integer (a new pair
    of columns takes over), and likewise in y.  A kernel computing that pixel coordinate in
    float32 can land on the other side of the line than the float64 reference, for a sample
    within a few float32 ulps of it: its location gradient then differs by O(1), correctly on
    both sides.  A large case (the paper's 1.8 million coordinates) has a few such samples;
    their location gradients are not compared.  Float64 kernels compute in float64, and
    half-precision inputs times a level size are exact in float32, so only float32 needs this.
    """
    if dtype != torch.float32 or locations.numel() == 0:
        return torch.zeros(locations.shape[:-1], dtype=torch.bool)
    sizes = torch.tensor([(w, h) for h, w in shapes], dtype=torch.float64)  # (levels, 2) as (x, y)
    pixel = locations.detach().double().cpu() * sizes[:, None, :] - 0.5
    distance = (pixel - pixel.round()).abs()
    margin = 8 * torch.finfo(torch.float32).eps * (pixel.abs() + 1)
    return (distance < margin).any(-1)


def compare_losses(
    reference: Dict[str, float], other: Dict[str, float], tolerance: float
) -> Tuple[bool, str, float]:
    """Whether ``other`` (a precision's step-0 losses) matches ``reference`` (fp32's): each
    loss's difference relative to the reference total must be at most ``tolerance``, and every
    loss finite.  Returns (ok, worst loss name, its relative difference)."""
    if set(reference) != set(other):
        missing = sorted(set(reference) ^ set(other))
        return False, f"losses differ in name: {missing}", math.inf
    total = abs(sum(reference.values()))
    worst_name, worst = "", 0.0
    for name in reference:
        if not (math.isfinite(reference[name]) and math.isfinite(other[name])):
            return False, name, math.inf
        difference = abs(other[name] - reference[name]) / max(total, 1e-12)
        if difference >= worst:
            worst_name, worst = name, difference
    return worst <= tolerance, worst_name, worst


# ----------------------------------------------------------------------------- part: build
def rebuild_hint(capability: Tuple[int, int]) -> str:
    arch = f"{capability[0]}.{capability[1]}"
    return (
        f'rebuild in the repository root with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="{arch}" '
        "pip install --no-build-isolation --no-deps -e . (nvcc needed; list several "
        'architectures as "8.0;9.0")'
    )


def arch_verdict(
    capability: Tuple[int, int],
    build_info: str,
    kernel_version: Optional[Tuple[int, int]],
    launch_error: Optional[str] = None,
) -> Tuple[str, str]:
    """(status, detail): can this build's CUDA kernels run on a GPU of ``capability``?

    ``build_info``: instalign_d2._C.build_info() ("missing" without the extension);
    ``kernel_version``: (binaryVersion, ptxVersion) of the kernels' image for the GPU as the
    extension reports it ((-1, -1): none it can run), or None where the extension cannot say, in
    which case ``launch_error`` is the error of a tiny launch (None when it ran).
    """
    sm = f"sm_{capability[0]}{capability[1]}"
    hint = rebuild_hint(capability)
    if build_info == "missing":
        return "FAIL", f"instalign_d2._C is not built; {hint}"
    if "cuda" not in build_info:
        return "FAIL", f"instalign_d2._C has no CUDA kernels (build: {build_info}); {hint}"
    if kernel_version is None:
        if launch_error is None:
            return "ok", f"a test launch on {sm} ran"
        if "no kernel image" in launch_error:
            return "FAIL", f"the CUDA kernels were not built for {sm} (this GPU); {hint}"
        return "FAIL", f"a test launch on {sm} failed: {launch_error}"
    binary, ptx = kernel_version
    device = 10 * capability[0] + capability[1]
    if binary < 0:
        return "FAIL", f"the CUDA kernels were not built for {sm} (this GPU); {hint}"
    if binary == device and ptx in (device, 0):
        return "ok", f"kernels compiled for {sm}"
    if binary == device:
        return (
            "ok",
            f"kernels for {sm} from compute_{ptx} code (JIT-compiled unless built as such); "
            f"native ones: {hint}",
        )
    return "ok", f"{sm} runs the kernels compiled for sm_{binary} (compatible); native ones: {hint}"


def _kernel_version(extension, device: int) -> Tuple[Optional[Tuple[int, int]], Optional[str]]:
    """The extension's report of its image for ``device``, else the outcome of a tiny launch."""
    if hasattr(extension, "ms_deform_attn_cuda_kernel_version"):
        return tuple(extension.ms_deform_attn_cuda_kernel_version(device)), None
    from instalign_d2.layers.ms_deform_attn import ms_deform_attn

    try:
        value = torch.zeros(1, 1, 1, 1, device=f"cuda:{device}")
        ms_deform_attn(
            value,
            [(1, 1)],
            None,
            torch.zeros(1, 1, 1, 1, 1, 2, device=value.device),
            torch.ones(1, 1, 1, 1, 1, device=value.device),
            impl="cuda",
        )
        torch.cuda.synchronize(device)
        return None, None
    except RuntimeError as error:
        return None, str(error).splitlines()[0]


# A call into _C whose input check fails: it must come back as a RuntimeError.  Run in a child
# process, because where it does not, the process dies.
ERROR_PROBE = """
import torch
from instalign_d2 import _C
value = torch.zeros(1, 10, 1, 2, dtype=torch.float64)
try:
    _C.ms_deform_attn_forward(value, torch.tensor([[4, 4]]), torch.tensor([0]),
        torch.zeros(1, 1, 1, 1, 1, 2, dtype=torch.float64),
        torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64), 64)
    print("nothing raised")
except RuntimeError as error:
    print("raised:", str(error).splitlines()[0])
"""


def error_probe_verdict(returncode: int, stdout: str, stderr: str) -> Tuple[str, str]:
    """(status, detail) of ERROR_PROBE's run: the level check's message, or why not."""
    said = [line for line in stdout.splitlines() if line.startswith("raised:")]
    if returncode == 0 and said and "does not fit" in said[0]:
        return "ok", "a failed input check inside _C raises RuntimeError with its message"
    if returncode < 0:
        compiler = os.environ.get("CXX")
        where = f" (CXX is {compiler} here)" if compiler else ""
        return "FAIL", (
            f"a failed input check inside _C kills the process (signal {-returncode}) instead of "
            "raising: the extension carries or expects another C++ runtime (libstdc++) than the "
            f"one this Python loads, as when the compiler links it statically{where}; rebuild "
            "with the system compiler: CC=gcc CXX=g++ pip install --no-build-isolation --no-deps -e ."
        )
    last = (stderr.strip().splitlines() or stdout.strip().splitlines() or [""])[-1]
    return "FAIL", f"exit status {returncode}: {last[:200]}"


def check_errors_reach_python() -> Row:
    done = subprocess.run(
        [sys.executable, "-c", ERROR_PROBE], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    status, detail = error_probe_verdict(done.returncode, done.stdout, done.stderr)
    return Row("build", "errors of _C reach Python", status, detail)


def check_build(args) -> List[Row]:
    from instalign_d2.layers.ms_deform_attn import msda_extension_info

    rows = []
    build = msda_extension_info()
    rows.append(
        Row(
            "build",
            "instalign_d2._C",
            "ok" if "cuda" in build else "FAIL",
            f"kernels: {build}",
            {"build_info": build},
        )
    )
    torch_arches = torch.cuda.get_arch_list()
    rows.append(
        Row(
            "build",
            "torch",
            "info",
            f"torch {torch.__version__}, CUDA {torch.version.cuda}, built for "
            f"{' '.join(torch_arches)}",
            {"torch": torch.__version__, "cuda": torch.version.cuda, "arch_list": torch_arches},
        )
    )
    extension = None
    if build != "missing":
        from instalign_d2 import _C as extension

        rows.append(check_errors_reach_python())
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        capability = (props.major, props.minor)
        sm = f"sm_{props.major}{props.minor}"
        version, launch_error = (
            _kernel_version(extension, index) if "cuda" in build else (None, None)
        )
        status, detail = arch_verdict(capability, build, version, launch_error)
        values = {
            "name": props.name,
            "arch": sm,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "kernel_version": version,
        }
        rows.append(Row("build", f"cuda:{index} {props.name} ({sm})", status, detail, values))
        compute = f"compute_{props.major}{props.minor}"
        if sm not in torch_arches and compute not in torch_arches:
            rows.append(
                Row(
                    "build",
                    f"torch on {sm}",
                    "warn",
                    f"this torch lists no {sm} kernels ({' '.join(torch_arches)}); its own ops "
                    "may be JIT-compiled or missing",
                )
            )
    return rows


# ----------------------------------------------------------------------------- part: op
@dataclass
class OpCase:
    """One comparison of the CUDA kernel with the CPU kernel and the reference."""

    name: str
    levels: Tuple[Tuple[int, int], ...]
    batch: int = 2
    heads: int = 2
    channels: int = 8
    queries: int = 9
    points: int = 2
    im2col_step: int = 64
    non_contiguous: bool = False
    device_index: int = 0
    dtypes: Tuple[torch.dtype, ...] = tuple(OP_TOLERANCE)
    paper_inputs: bool = False  # the benchmark's realistic locations and softmax weights


def op_cases(items_per_pass: int, device_count: int) -> List[OpCase]:
    """The paper's shapes and the edge cases.  ``items_per_pass``: (batch, query, head) items
    one CUDA launch covers before its warps loop (the extension's MSDA_CUDA_ITEMS_PER_PASS)."""
    from benchmark_ms_deform_attn import HEAD_DIM, HEADS, LEVELS, POINTS

    paper_queries = sum(h * w for h, w in LEVELS)
    cases = [
        OpCase(
            "paper shapes: 60x60, 30x30, 15x15; 8 heads x 32; 4 points; batch 2",
            LEVELS,
            batch=2,
            heads=HEADS,
            channels=HEAD_DIM,
            queries=paper_queries,
            points=POINTS,
            paper_inputs=True,
        ),
        OpCase("points outside, a 1x1 level, H != W", ((7, 5), (1, 1), (3, 4)), heads=3),
        OpCase("40 channels (not a multiple of 32)", ((6, 4), (3, 2)), channels=40),
        OpCase("7 channels", ((5, 5), (1, 1)), channels=7),
        OpCase("batch 3 with im2col_step 2", ((4, 3), (1, 1)), batch=3, im2col_step=2),
        OpCase("non-contiguous inputs", ((4, 3), (2, 2)), batch=2, heads=3, non_contiguous=True),
        OpCase("no queries", ((3, 3), (1, 1)), queries=0),
        OpCase("no images", ((3, 3), (1, 1)), batch=0),
        OpCase(
            f"more items than one launch pass ({items_per_pass})",
            ((8, 8), (1, 1)),
            batch=1,
            heads=1,
            channels=8,
            queries=items_per_pass + 1000,
            points=1,
            dtypes=(torch.float32,),
        ),
    ]
    if device_count >= 2:
        cases.append(OpCase("tensors on cuda:1", ((4, 3), (1, 1)), device_index=1))
    return cases


def case_inputs(case: OpCase, seed: int = 0) -> List:
    """float64 CPU inputs of a case: value, shapes (python), locations, weights, grad_output.
    Locations spread over [-0.3, 1.3], so that some samples lie partly or wholly outside."""
    generator = torch.Generator().manual_seed(seed)
    if case.paper_inputs:
        from benchmark_ms_deform_attn import make_inputs

        value, _, _, locations, weights, grad_output = make_inputs(
            case.batch, dtype=torch.float64, seed=seed, levels=case.levels
        )
        return [
            value.detach(),
            list(case.levels),
            locations.detach(),
            weights.detach(),
            grad_output,
        ]
    tokens = sum(h * w for h, w in case.levels)
    value = torch.randn(
        case.batch, tokens, case.heads, case.channels, dtype=torch.float64, generator=generator
    )
    shape = (case.batch, case.queries, case.heads, len(case.levels), case.points)
    locations = torch.rand(*shape, 2, dtype=torch.float64, generator=generator) * 1.6 - 0.3
    weights = torch.rand(*shape, dtype=torch.float64, generator=generator)
    grad_output = torch.randn(
        case.batch,
        case.queries,
        case.heads * case.channels,
        dtype=torch.float64,
        generator=generator,
    )
    return [value, list(case.levels), locations, weights, grad_output]


def non_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same numbers, laid out in reversed dimension order in memory."""
    order = list(range(tensor.dim()))[::-1]
    return tensor.permute(order).contiguous().permute(order)


def output_and_grads(impl, value, shapes, locations, weights, grad_output, im2col_step=64):
    from instalign_d2.layers.ms_deform_attn import ms_deform_attn

    value, locations, weights = (
        t.detach().clone().requires_grad_() for t in (value, locations, weights)
    )
    output = ms_deform_attn(
        value, shapes, None, locations, weights, im2col_step=im2col_step, impl=impl
    )
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output)
    return [output.detach()] + list(grads)


def compare_case(
    case: OpCase, dtype: torch.dtype, device: str, impl: str = "cuda", cpu_kernel: bool = True
) -> Dict:
    """Run ``impl`` on ``device`` in ``dtype`` and compare it with the reference and the CPU
    kernel, both in float64 from the same rounded inputs.  Returns the errors by name and
    whether they are within OP_TOLERANCE."""
    value, shapes, locations, weights, grad_output = case_inputs(case)
    # What the kernel sees, rounded to dtype; the comparisons widen exactly those numbers.
    rounded = [t.to(dtype) for t in (value, locations, weights, grad_output)]
    wide = [t.double() for t in rounded]
    candidate_inputs = [t.to(device) for t in rounded]
    if case.non_contiguous:
        candidate_inputs = [non_contiguous(t) for t in candidate_inputs]
        if any(t.is_contiguous() for t in candidate_inputs[:3]):
            raise AssertionError("the non-contiguous case built a contiguous input")
    v, loc, w, g = candidate_inputs
    result = output_and_grads(impl, v, shapes, loc, w, g, case.im2col_step)
    if result[0].device != torch.device(device):
        raise AssertionError(f"output on {result[0].device}, inputs on {device}")
    errors: Dict[str, Dict[str, float]] = {}
    v, loc, w, g = wide
    skipped = near_pixel_lines(loc, shapes, dtype)
    expected = output_and_grads("pytorch", v, shapes, loc, w, g)
    errors["reference"] = worst_error(result, expected, skipped)
    if cpu_kernel:
        expected = output_and_grads("cpu", v, shapes, loc, w, g)
        errors["cpu kernel"] = worst_error(result, expected, skipped)
    worst = max((e for by_name in errors.values() for e in by_name.values()), default=0.0)
    return {
        "dtype": dtype,
        "errors": errors,
        "worst": worst,
        "tolerance": OP_TOLERANCE[dtype],
        "ok": worst <= OP_TOLERANCE[dtype],
        "samples_on_pixel_lines": int(skipped.sum()),
    }


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float64: "f64", torch.float32: "f32", torch.float16: "f16"}.get(
        dtype, str(dtype).replace("torch.", "")
    )


def summarize_case(case: OpCase, results: Sequence[Dict]) -> Row:
    status = "ok" if all(r["ok"] for r in results) else "FAIL"
    parts = []
    for r in results:
        mark = "" if r["ok"] else f" > {r['tolerance']:.0e}!"
        parts.append(f"{dtype_name(r['dtype'])} {r['worst']:.1e}{mark}")
    against = " and ".join(sorted({k for r in results for k in r["errors"]}))
    detail = f"worst relative error of output and 3 gradients vs {against}: " + ", ".join(parts)
    on_lines = sum(r["samples_on_pixel_lines"] for r in results)
    if on_lines:
        detail += f" ({on_lines} f32 samples on pixel-centre lines: location gradient not compared)"
    return Row("op", case.name, status, detail, {"results": list(results)})


def outside_non_finite_inputs():
    """Samples wholly outside their level with weights inf, -inf, NaN and 1, and one inside."""
    value = torch.randn(
        1, 22, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    outside = [[-5.0, 0.5], [0.5, 1.75], [-0.2, -0.2], [2.0, 2.0], [0.4, 0.6]]
    locations = torch.tensor(outside, dtype=torch.float64).view(1, 5, 1, 1, 1, 2)
    locations = locations.expand(1, 5, 1, 2, 1, 2).contiguous()
    weights = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.5], dtype=torch.float64)
    weights = weights.view(1, 5, 1, 1, 1).expand(1, 5, 1, 2, 1).contiguous()
    return value, [(4, 4), (2, 3)], locations, weights, torch.ones(1, 5, 3, dtype=torch.float64)


def outside_non_finite_verdict(
    cuda: Sequence[torch.Tensor], cpu: Sequence[torch.Tensor]
) -> Tuple[str, str]:
    """(status, detail) of the outside-sample check: the location and weight gradients of the
    four outside samples exactly 0, and every tensor within 1e-12 of the CPU kernel's, NaN
    nowhere.  Not bit for bit: the CUDA kernels add the same products in another order (a
    warp's shuffle reduction, fused multiply-adds), so an inside sample differs in the last bits."""
    names = ("output", "value gradient", "location gradient", "weight gradient")
    zero = bool((cuda[2][:, :4].cpu() == 0).all() and (cuda[3][:, :4].cpu() == 0).all())
    differences = []
    for name, a, b in zip(names, cuda, cpu):
        a = a.cpu()
        if not bool(torch.isfinite(a).all()):
            differences.append(f"{name} has non-finite values")
        elif not torch.allclose(a, b, rtol=0, atol=1e-12):
            differences.append(f"{name} differs by {float((a - b).abs().max()):.1e}")
    if zero and not differences:
        return "ok", "location and weight gradients 0, every tensor within 1e-12 of the CPU kernel"
    problems = ([] if zero else ["outside samples' gradients not 0"]) + differences
    return "FAIL", "; ".join(problems)


def check_outside_non_finite(device: str = "cuda") -> Row:
    value, shapes, locations, weights, grad_output = outside_non_finite_inputs()
    cpu = output_and_grads("cpu", value, shapes, locations, weights, grad_output)
    cuda = output_and_grads(
        "cuda",
        value.to(device),
        shapes,
        locations.to(device),
        weights.to(device),
        grad_output.to(device),
    )
    status, detail = outside_non_finite_verdict(cuda, cpu)
    return Row("op", "outside samples with inf/NaN weights", status, detail)


def check_deterministic_alert(device: str = "cuda") -> Row:
    from instalign_d2.layers.ms_deform_attn import ms_deform_attn

    value, shapes, locations, weights, _ = outside_non_finite_inputs()
    weights = torch.ones_like(weights)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = ms_deform_attn(
            value.to(device).requires_grad_(),
            shapes,
            None,
            locations.to(device),
            weights.to(device),
            impl="cuda",
        )
        out.sum().backward()
        status, detail = "FAIL", "the backward ran under use_deterministic_algorithms(True)"
    except RuntimeError as error:
        said = "ms_deform_attn_backward_cuda" in str(error)
        status = "ok" if said else "FAIL"
        detail = "the backward refuses, naming itself" if said else str(error).splitlines()[0]
    finally:
        torch.use_deterministic_algorithms(previous)
    return Row("op", "non-deterministic backward is declared", status, detail)


def check_no_synchronisation(device: str = "cuda") -> Row:
    """A layer step with python level shapes (what the pixel decoder passes) must not wait for
    the GPU: CUDA's sync debug mode turns any synchronisation into an error."""
    from instalign_d2.layers.ms_deform_attn import MSDeformAttn

    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=2).to(device)
    shapes = [(6, 5), (3, 2)]
    query = torch.randn(2, 36, 32, device=device)
    reference_points = torch.rand(2, 36, 2, 2, device=device)
    layer(query, reference_points, query, shapes).sum().backward()  # first use of the layout
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(query, reference_points, query, shapes).sum().backward()
        status, detail = "ok", "a forward+backward with python level shapes never synchronises"
    except RuntimeError as error:
        status, detail = "FAIL", str(error).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return Row("op", "no host-device synchronisation per step", status, detail)


def check_op(args) -> List[Row]:
    from instalign_d2.layers.ms_deform_attn import msda_extension_info

    build = msda_extension_info()
    if "cuda" not in build:
        return [Row("op", "CUDA kernel", "FAIL", f"instalign_d2._C has no CUDA kernels ({build})")]
    from instalign_d2 import _C

    rows = []
    for case in op_cases(_C.MSDA_CUDA_ITEMS_PER_PASS, torch.cuda.device_count()):
        log(f"op: {case.name}")
        device = f"cuda:{case.device_index}"
        results = [compare_case(case, dtype, device) for dtype in case.dtypes]
        rows.append(summarize_case(case, results))
    if torch.cuda.device_count() < 2:
        rows.append(Row("op", "tensors on cuda:1", "skip", "one GPU"))
    for check in (check_outside_non_finite, check_deterministic_alert, check_no_synchronisation):
        rows.append(check())
    return rows


# ----------------------------------------------------------------------------- part: speed
def check_speed(args) -> List[Row]:
    import benchmark_ms_deform_attn as bench

    from instalign_d2.layers.ms_deform_attn import msda_extension_info

    if "cuda" not in msda_extension_info():
        return [Row("speed", "CUDA kernel", "FAIL", "instalign_d2._C has no CUDA kernels")]
    rows = []
    for batch in args.speed_batches:
        measured = {}
        for impl in ("pytorch", "cuda"):
            log(f"speed: {impl}, batch {batch}")
            inputs = bench.make_inputs(batch, device="cuda")
            measured[impl] = {
                "forward_ms": bench.median_ms(impl, inputs, False, "cuda", args.warmup, args.runs),
                "fwd_bwd_ms": bench.median_ms(impl, inputs, True, "cuda", args.warmup, args.runs),
                "peak_forward_mib": bench.cuda_peak_mib(impl, inputs, False),
                "peak_fwd_bwd_mib": bench.cuda_peak_mib(impl, inputs, True),
            }
            del inputs
            torch.cuda.empty_cache()
        ours, ref = measured["cuda"], measured["pytorch"]
        speedup_f = ref["forward_ms"] / ours["forward_ms"]
        speedup_b = ref["fwd_bwd_ms"] / ours["fwd_bwd_ms"]
        detail = (
            f"forward {ours['forward_ms']:.2f} ms vs grid_sample {ref['forward_ms']:.2f} "
            f"({speedup_f:.1f}x); fwd+bwd {ours['fwd_bwd_ms']:.2f} vs {ref['fwd_bwd_ms']:.2f} "
            f"({speedup_b:.1f}x); peak fwd+bwd {ours['peak_fwd_bwd_mib']:.0f} vs "
            f"{ref['peak_fwd_bwd_mib']:.0f} MiB"
        )
        status = "ok" if speedup_b >= 1.0 else "warn"
        rows.append(
            Row(
                "speed",
                f"paper shapes, batch {batch}, float32",
                status,
                detail,
                {
                    "cuda": ours,
                    "pytorch": ref,
                    "speedup_forward": speedup_f,
                    "speedup_fwd_bwd": speedup_b,
                },
            )
        )
    return rows


# ----------------------------------------------------------------------------- part: train-step
def paper_cfg(args, scratch: str):
    """The paper config with random weights (tools/analyze_model.py's setup)."""
    from analyze_model import setup_cfg

    opts = list(args.opts)
    if args.text_encoder:
        opts += ["MODEL.TEXT_ENCODER.NAME", args.text_encoder]
    return setup_cfg(
        argparse.Namespace(config_file=args.config_file, opts=opts, device=args.device), scratch
    )


def batch_per_gpu(ims_per_batch: int, gpus: int, override: Optional[int] = None) -> int:
    """The paper's batch (IMS_PER_BATCH over all GPUs) as one GPU's share."""
    if override:
        return override
    return max(1, ims_per_batch // max(1, gpus))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, inputs, precision: str, steps: int, lr: float = 1e-4) -> Dict:
    """``steps`` training steps from the model's current weights, on the model's device: the
    losses of the first (seeded, so that every precision samples the same points and dropout
    masks), the mean time of the others, and (on a GPU) the peak memory."""
    device = next(model.parameters()).device
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    model.train()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_losses, times, skipped = None, [], 0
    for step in range(steps):
        torch.manual_seed(step)  # seeds the GPUs too
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(inputs)
        total = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.scale(total).backward()
            scaler.step(optimizer)
            scaler.update()
            skipped += int(scaler.get_scale() < scale_before)
        else:
            total.backward()
            optimizer.step()
        _synchronize(device)
        if step == 0:
            first_losses = {k: float(v.detach()) for k, v in losses.items()}
        else:
            times.append(time.perf_counter() - start)
        if not math.isfinite(float(total.detach())):
            break
    seconds = sum(times) / len(times) if times else math.nan
    return {
        "losses": first_losses,
        "total": sum(first_losses.values()),
        "finite": all(math.isfinite(v) for v in first_losses.values()),
        "seconds_per_step": seconds,
        "expressions_per_second": len(inputs) / seconds if times else math.nan,
        "peak_memory_mib": (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else math.nan
        ),
        "steps_skipped_by_grad_scaler": skipped if scaler is not None else None,
    }


def train_step_rows(cfg, batch: int, steps: int) -> List[Row]:
    """fp32, bf16 and fp16 (with the grad scaler) training steps of ``cfg``'s model (on
    cfg.MODEL.DEVICE) from the same initial weights and inputs, and their step-0 losses
    compared with fp32's."""
    from analyze_model import synthetic_inputs
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    inputs = synthetic_inputs(model, cfg, batch)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    size = cfg.INPUT.IMAGE_SIZE
    rows, results = [], {}
    for precision in ("fp32", "bf16", "fp16"):
        log(f"train-step: {precision}, batch {batch} at {size}x{size}")
        model.load_state_dict(initial)
        try:
            result = train_steps(model, inputs, precision, steps)
        except torch.OutOfMemoryError as error:
            first_line = str(error).splitlines()[0][:120]
            rows.append(
                Row(
                    "train-step",
                    f"{precision}, batch {batch}",
                    "FAIL",
                    f"out of memory ({first_line}); try --batch-per-gpu",
                )
            )
            torch.cuda.empty_cache()
            continue
        results[precision] = result
        detail = (
            f"step-0 loss {result['total']:.3f}; {result['expressions_per_second']:.1f} "
            f"expressions/s ({result['seconds_per_step']:.2f} s/step)"
        )
        if math.isfinite(result["peak_memory_mib"]):
            detail += f"; peak {result['peak_memory_mib'] / 1024:.1f} GiB"
        if result["steps_skipped_by_grad_scaler"]:
            detail += f"; grad scaler skipped {result['steps_skipped_by_grad_scaler']} step(s)"
        if not result["finite"]:
            detail = f"non-finite step-0 losses: {result['losses']}"
        rows.append(
            Row(
                "train-step",
                f"{precision}, batch {batch} at {size}x{size}",
                "ok" if result["finite"] else "FAIL",
                detail,
                result,
            )
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    for precision in ("bf16", "fp16"):
        if "fp32" in results and precision in results:
            tolerance = LOSS_TOLERANCE[precision]
            ok, name, difference = compare_losses(
                results["fp32"]["losses"], results[precision]["losses"], tolerance
            )
            rows.append(
                Row(
                    "train-step",
                    f"{precision} step-0 losses vs fp32",
                    "ok" if ok else "FAIL",
                    f"largest difference {difference:.2%} of the total ({name}); tolerance "
                    f"{tolerance:.0%}",
                    {"loss": name, "difference": difference},
                )
            )
    return rows


def check_train_step(args) -> List[Row]:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        cfg = paper_cfg(args, scratch)
        gpus = torch.cuda.device_count() if args.device == "cuda" else 1
        batch = batch_per_gpu(cfg.SOLVER.IMS_PER_BATCH, gpus, args.batch_per_gpu)
        return train_step_rows(cfg, batch, args.train_steps)


# ----------------------------------------------------------------------------- part: eval
def check_eval(args) -> List[Row]:
    import benchmark_inference

    opts = list(args.opts)
    if args.text_encoder:
        opts += ["MODEL.TEXT_ENCODER.NAME", args.text_encoder]
    options = argparse.Namespace(
        opts=opts,
        device=args.device,
        images=args.eval_images,
        expressions_per_image=args.expressions_per_image,
        repeats=args.eval_repeats,
    )
    log(f"eval: {args.eval_images} images x {args.expressions_per_image} expressions")
    single, grouped = benchmark_inference.benchmark(args.config_file, options)
    single_rate, grouped_rate = float(single[2]), float(grouped[2])
    difference = float(grouped[4])
    status = "ok" if difference <= EVAL_TOLERANCE else "FAIL"
    return [
        Row(
            "eval",
            f"inference, {args.expressions_per_image} expressions per image",
            status,
            f"{grouped_rate:.1f} expressions/s grouped by image vs {single_rate:.1f} one forward "
            f"per expression ({grouped_rate / single_rate:.1f}x); ref_seg agree to "
            f"{difference:.1e}",
            {
                "grouped_expressions_per_second": grouped_rate,
                "single_expressions_per_second": single_rate,
                "max_ref_seg_difference": difference,
            },
        )
    ]


# ----------------------------------------------------------------------------- part: make-train
def read_results(output_dir: str) -> Dict[str, Dict[str, float]]:
    """The metrics of every ``<dataset>_results.json`` the evaluator wrote under ``output_dir``."""
    metrics = {}
    for path in sorted(glob.glob(os.path.join(output_dir, "**", "*_results.json"), recursive=True)):
        with open(path) as f:
            content = json.load(f)
        for task, values in content.get("results", {}).items():
            metrics[f"{content.get('dataset', os.path.basename(path))}/{task}"] = values
    return metrics


def check_make_train(args) -> List[Row]:
    output_dir = args.train_output or tempfile.mkdtemp(prefix="gpu_check_train_")
    command = [
        sys.executable,
        os.path.join(REPO, "train_net.py"),
        "--config-file",
        TINY_CONFIG,
        "MODEL.DEVICE",
        "cuda",
        "OUTPUT_DIR",
        output_dir,
    ]
    log(f"make-train: {' '.join(command)}")
    start = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=REPO, capture_output=True, text=True, timeout=args.train_timeout
        )
    except subprocess.TimeoutExpired:
        return [
            Row(
                "make-train",
                "synthetic make train on the GPU",
                "FAIL",
                f"not done after {args.train_timeout} s (--train-timeout); logs in {output_dir}",
            )
        ]
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        return [
            Row(
                "make-train",
                "synthetic make train on the GPU",
                "FAIL",
                f"exit status {done.returncode} after {seconds:.0f} s: {tail[0][:200]}",
            )
        ]
    metrics = read_results(output_dir)
    shown = "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in values.items() if isinstance(v, float))
        for name, values in metrics.items()
    )
    return [
        Row(
            "make-train",
            "synthetic make train on the GPU",
            "ok" if metrics else "FAIL",
            f"{seconds / 60:.1f} min; {shown or 'no results JSON written'} ({output_dir})",
            {"seconds": seconds, "metrics": metrics, "output_dir": output_dir},
        )
    ]


PART_FUNCTIONS: Dict[str, Callable] = {
    "build": check_build,
    "op": check_op,
    "speed": check_speed,
    "train-step": check_train_step,
    "eval": check_eval,
    "make-train": check_make_train,
}


# ----------------------------------------------------------------------------- main
def run_parts(parts: Sequence[str], args) -> List[Row]:
    """Each part in turn; a part that raises becomes one FAIL row and the others still run."""
    rows = []
    for part in parts:
        log(f"part {part}")
        start = time.perf_counter()
        try:
            rows.extend(PART_FUNCTIONS[part](args))
        except Exception as error:  # noqa: BLE001 - reported, never swallowed silently
            traceback.print_exc(file=sys.stderr)
            first_line = (str(error).splitlines() or [""])[0]
            rows.append(Row(part, "part raised", "FAIL", f"{type(error).__name__}: {first_line}"))
        log(f"part {part} took {time.perf_counter() - start:.0f} s")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, help="default: all but make-train")
    parser.add_argument("--train", action="store_true", help="also run make-train")
    parser.add_argument("--output", metavar="PATH", help="write the table as JSON here")
    parser.add_argument("--config-file", default=PAPER_CONFIG, help="for train-step and eval")
    parser.add_argument(
        "--text-encoder", metavar="DIR", help="a local transformers folder for the text encoder"
    )
    parser.add_argument("--batch-per-gpu", type=int, help="default: IMS_PER_BATCH / GPUs")
    parser.add_argument("--train-steps", type=int, default=3, help="per precision (>= 2)")
    parser.add_argument("--speed-batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--runs", type=int, default=20, help="timed runs per speed case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=2)
    parser.add_argument("--expressions-per-image", type=int, default=14)
    parser.add_argument("--eval-repeats", type=int, default=3)
    parser.add_argument("--train-output", help="OUTPUT_DIR of make-train (default: a temp dir)")
    parser.add_argument("--train-timeout", type=int, default=3600, help="seconds")
    # The device of train-step and eval: lets the tests run those parts' logic on the CPU.
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides")
    args = parser.parse_args(argv)
    parts = list(args.parts or DEFAULT_PARTS)
    if args.train and "make-train" not in parts:
        parts.append("make-train")
    args.parts = parts
    if args.train_steps < 2:
        parser.error("--train-steps must be at least 2 (the first is not timed)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print(no_gpu_line())
        if args.output:
            write_report(args.output, make_report([], describe_machine(), []))
        return 0
    rows = run_parts(args.parts, args)
    print(format_table(rows))
    failures = failed(rows)
    print(
        f"\n{len(failures)} check(s) failed." if failures else "\nEvery check passed.",
        flush=True,
    )
    if args.output:
        write_report(args.output, make_report(rows, describe_machine(), args.parts))
        print(f"Written to {args.output}.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
