"""tools/gpu_check.py: everything but the GPU itself -- the table and its JSON, the comparison
helpers, the architecture verdict on made-up values, the no-GPU path, a failing part, and the op
comparison machinery run with the CPU kernel as the candidate."""

import json
import math
import os

import pytest
import torch

from instalign_d2.layers import msda_extension_info

needs_cpp = pytest.mark.skipif(
    msda_extension_info() == "missing", reason="instalign_d2._C is not built"
)


@pytest.fixture(scope="module")
def gpu_check(load_tool):
    return load_tool("gpu_check")


# ----------------------------------------------------------------------------- table and JSON
def test_table_has_one_aligned_line_per_row_and_escapes_cells(gpu_check):
    rows = [
        gpu_check.Row("op", "a | b", "ok", "fine"),
        gpu_check.Row("build", "arch", "FAIL", "two\nlines"),
    ]
    lines = gpu_check.format_table(rows).splitlines()
    assert len(lines) == 4  # header, separator, two rows
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert lines[0].split("|")[1:5] == [" part  ", " check  ", " status ", " detail    "]
    assert "a \\| b" in lines[2] and "two lines" in lines[3]
    with pytest.raises(ValueError, match="status must be one of"):
        gpu_check.Row("op", "x", "passed")


def test_report_is_json_with_the_failures_and_written_atomically(gpu_check, tmp_path):
    rows = [
        gpu_check.Row("op", "case", "ok", "", {"error": float("nan"), "dtype": torch.bfloat16}),
        gpu_check.Row("speed", "batch 1", "FAIL", "slow", {"ms": (1.5, float("inf"))}),
    ]
    report = gpu_check.make_report(rows, {"gpus": []}, ["op", "speed"])
    path = tmp_path / "out" / "gpu_check.json"
    gpu_check.write_report(str(path), report)
    assert os.listdir(path.parent) == ["gpu_check.json"]  # no temporary file left behind
    loaded = json.loads(path.read_text())
    assert loaded["passed"] is False and loaded["failures"] == ["speed: batch 1: slow"]
    assert loaded["rows"][0]["values"] == {"error": "nan", "dtype": "bfloat16"}
    assert loaded["rows"][1]["values"] == {"ms": [1.5, "inf"]}
    assert loaded["parts"] == ["op", "speed"]


# ----------------------------------------------------------------------------- comparisons
def test_relative_error_is_relative_to_the_tensors_scale(gpu_check):
    expected = torch.tensor([100.0, 0.001, -50.0], dtype=torch.float64)
    error = gpu_check.relative_error(
        expected + torch.tensor([0.0, 0.5, 0.0], dtype=torch.float64), expected
    )
    assert error == pytest.approx(0.005, rel=1e-12)
    assert gpu_check.relative_error(expected.float(), expected.float().double()) == 0.0
    assert gpu_check.relative_error(torch.zeros(0, 3), torch.zeros(0, 3)) == 0.0
    assert gpu_check.relative_error(torch.zeros(2), torch.zeros(3)) == math.inf
    assert gpu_check.relative_error(torch.tensor([1.0, math.nan]), torch.ones(2)) == math.inf
    assert gpu_check.relative_error(torch.ones(2), torch.zeros(2)) == math.inf


def test_losses_agree_within_a_share_of_the_total(gpu_check):
    fp32 = {"loss_mask": 10.0, "loss_dice": 5.0, "loss_nt": 0.01}
    ok, name, difference = gpu_check.compare_losses(
        fp32, {"loss_mask": 10.2, "loss_dice": 5.0, "loss_nt": 0.02}, 0.02
    )
    assert ok and name == "loss_mask" and difference == pytest.approx(0.2 / 15.01)
    ok, name, _ = gpu_check.compare_losses(fp32, {**fp32, "loss_dice": 6.0}, 0.05)
    assert not ok and name == "loss_dice"
    assert not gpu_check.compare_losses(fp32, {**fp32, "loss_nt": math.nan}, 1.0)[0]
    ok, name, _ = gpu_check.compare_losses(fp32, {"loss_mask": 10.0}, 1.0)
    assert not ok and "loss_dice" in name


# ----------------------------------------------------------------------------- build
@pytest.mark.parametrize(
    "capability,build,version,launch_error,status,pattern",
    [
        (
            (9, 0),
            "missing",
            None,
            None,
            "FAIL",
            r"not built; rebuild .*TORCH_CUDA_ARCH_LIST=\"9.0\"",
        ),
        ((9, 0), "cpu", None, None, "FAIL", r"no CUDA kernels \(build: cpu\)"),
        ((9, 0), "cpu+cuda", (-1, -1), None, "FAIL", r"not built for sm_90 .*ARCH_LIST=\"9.0\""),
        ((8, 0), "cpu+cuda", (-1, -1), None, "FAIL", r"not built for sm_80 .*ARCH_LIST=\"8.0\""),
        ((9, 0), "cpu+cuda", (90, 90), None, "ok", r"^kernels compiled for sm_90$"),
        ((8, 6), "cpu+cuda", (80, 80), None, "ok", r"sm_86 runs the kernels compiled for sm_80"),
        ((9, 0), "cpu+cuda", (90, 80), None, "ok", r"from compute_80 code"),
        ((9, 0), "cpu+cuda", None, None, "ok", r"test launch on sm_90 ran"),
        (
            (12, 0),
            "cpu+cuda",
            None,
            "CUDA error: no kernel image is available for execution on the device",
            "FAIL",
            r"not built for sm_120 .*ARCH_LIST=\"12.0\"",
        ),
        ((9, 0), "cpu+cuda", None, "CUDA error: out of memory", "FAIL", r"launch .*failed"),
    ],
    ids=[
        "missing",
        "cpu-only",
        "no-image-90",
        "no-image-80",
        "native",
        "compatible",
        "from-ptx",
        "launch-ran",
        "launch-no-image",
        "launch-other-error",
    ],
)
def test_arch_verdict(gpu_check, capability, build, version, launch_error, status, pattern):
    got_status, detail = gpu_check.arch_verdict(capability, build, version, launch_error)
    assert got_status == status
    assert __import__("re").search(pattern, detail), detail


def test_paper_batch_is_shared_by_the_gpus(gpu_check):
    assert gpu_check.batch_per_gpu(32, 1) == 32
    assert gpu_check.batch_per_gpu(32, 8) == 4
    assert gpu_check.batch_per_gpu(32, 64) == 1
    assert gpu_check.batch_per_gpu(32, 8, override=6) == 6


# ----------------------------------------------------------------------------- main
def test_without_a_gpu_one_line_and_success(gpu_check, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    monkeypatch.setattr(gpu_check, "run_parts", lambda *a: called.append(a) or [])
    assert gpu_check.main(["--output", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no CUDA GPU visible" in out
    assert not called
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True


def test_a_failing_part_fails_the_run_and_the_others_still_run(
    gpu_check, monkeypatch, capsys, tmp_path
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "describe_machine", lambda: {"gpus": ["fake"]})

    def broken(args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    def fine(args):
        return [gpu_check.Row("op", "case", "ok", "within tolerance")]

    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "build", broken)
    monkeypatch.setitem(gpu_check.PART_FUNCTIONS, "op", fine)
    output = tmp_path / "report.json"
    assert gpu_check.main(["--parts", "build", "op", "--output", str(output)]) == 1
    out = capsys.readouterr().out
    assert "RuntimeError: CUDA error: an illegal memory access was encountered" in out
    assert "| op " in out and "1 check(s) failed." in out
    report = json.loads(output.read_text())
    assert [row["status"] for row in report["rows"]] == ["FAIL", "ok"]
    assert report["machine"] == {"gpus": ["fake"]} and report["passed"] is False


def test_parts_selection(gpu_check):
    assert gpu_check.parse_args([]).parts == list(gpu_check.DEFAULT_PARTS)
    assert "make-train" not in gpu_check.DEFAULT_PARTS
    assert gpu_check.parse_args(["--train"]).parts[-1] == "make-train"
    assert gpu_check.parse_args(["--parts", "op", "--train"]).parts == ["op", "make-train"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "gpu"])


def test_make_train_metrics_are_read_from_the_results_files(gpu_check, tmp_path):
    folder = tmp_path / "inference"
    folder.mkdir()
    (folder / "synthetic_gres_val_results.json").write_text(
        json.dumps(
            {
                "dataset": "synthetic_gres_val",
                "results": {"grefcoco": {"gIoU": 80.3, "cIoU": 73.8, "num_expressions": 900}},
            }
        )
    )
    assert gpu_check.read_results(str(tmp_path)) == {
        "synthetic_gres_val/grefcoco": {"gIoU": 80.3, "cIoU": 73.8, "num_expressions": 900}
    }


# ----------------------------------------------------------------------------- op machinery
def test_op_cases_cover_the_paper_shapes_and_the_edges(gpu_check):
    one_gpu = gpu_check.op_cases(items_per_pass=1000, device_count=1)
    paper = one_gpu[0]
    assert paper.levels == ((60, 60), (30, 30), (15, 15))  # a 480x480 image at strides 8..32
    assert (paper.heads, paper.channels, paper.points, paper.queries) == (8, 32, 4, 4725)
    grid = [c for c in one_gpu if c.batch * c.queries * c.heads > 1000]
    assert any(c.queries > 1000 and c.heads == 1 for c in grid)
    assert any(c.channels % 32 for c in one_gpu) and any(c.non_contiguous for c in one_gpu)
    assert any(c.batch % c.im2col_step for c in one_gpu if c.im2col_step < c.batch)
    assert any(c.queries == 0 for c in one_gpu) and any(c.batch == 0 for c in one_gpu)
    assert any((1, 1) in c.levels for c in one_gpu)
    assert all(c.device_index == 0 for c in one_gpu)
    two_gpus = gpu_check.op_cases(items_per_pass=1000, device_count=2)
    assert [c.device_index for c in two_gpus][-1] == 1


def test_near_pixel_lines_marks_only_float32_samples_on_a_line(gpu_check):
    # Level 4 wide, 2 high: x = 0.375 gives pixel 0.375 * 4 - 0.5 = 1.0 exactly, on a line.
    locations = torch.tensor([[0.375, 0.3], [0.3, 0.3], [0.4, 0.75]], dtype=torch.float64)
    locations = locations.view(1, 3, 1, 1, 1, 2)
    marked = gpu_check.near_pixel_lines(locations, [(2, 4)], torch.float32)
    assert marked.shape == (1, 3, 1, 1, 1)
    assert marked.flatten().tolist() == [True, False, True]  # y = 0.75: 0.75 * 2 - 0.5 = 1.0
    assert not gpu_check.near_pixel_lines(locations, [(2, 4)], torch.float64).any()
    assert not gpu_check.near_pixel_lines(locations, [(2, 4)], torch.bfloat16).any()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_edge_cases_pass_with_the_cpu_kernel_as_candidate(gpu_check, dtype):
    """The comparison machinery (rounding, layouts, empty tensors) on the CPU kernel, which must
    agree with the reference like the CUDA kernel."""
    for case in gpu_check.op_cases(items_per_pass=1000, device_count=1)[1:]:
        if case.queries > 100:
            continue  # the grid-stride case only means something on the GPU
        result = gpu_check.compare_case(case, dtype, "cpu", impl="cpu", cpu_kernel=False)
        assert result["ok"], (case.name, result)
        assert set(result["errors"]["reference"]) == {
            "output",
            "grad_value",
            "grad_locations",
            "grad_weights",
        }
        row = gpu_check.summarize_case(case, [result])
        assert row.status == "ok" and "vs reference" in row.detail


@needs_cpp
def test_a_wrong_gradient_is_caught(gpu_check, monkeypatch):
    case = gpu_check.op_cases(items_per_pass=1000, device_count=1)[1]
    real = gpu_check.output_and_grads
    calls = []

    def candidate_with_a_slightly_wrong_location_gradient(impl, *args):
        result = real(impl, *args)
        if not calls:  # the first call is the candidate's
            result[2] = result[2] * 1.001
        calls.append(impl)
        return result

    monkeypatch.setattr(
        gpu_check, "output_and_grads", candidate_with_a_slightly_wrong_location_gradient
    )
    result = gpu_check.compare_case(case, torch.float32, "cpu", impl="cpu", cpu_kernel=True)
    assert calls == ["cpu", "pytorch", "cpu"]
    assert not result["ok"]
    assert result["errors"]["reference"]["grad_locations"] == pytest.approx(1e-3, rel=0.1)
    assert result["errors"]["reference"]["output"] < 1e-5
    row = gpu_check.summarize_case(case, [result])
    assert row.status == "FAIL" and "f32 1.0e-03 > 1e-04!" in row.detail


@needs_cpp
def test_error_probe_raises_here(gpu_check):
    row = gpu_check.check_errors_reach_python()
    assert row.status == "ok", row.detail


def test_error_probe_verdict(gpu_check, monkeypatch):
    said = "raised: ms_deform_attn: level 0 of spatial_shapes (4, 4) ... does not fit in value's S=10\n"
    assert gpu_check.error_probe_verdict(0, said, "")[0] == "ok"
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    status, detail = gpu_check.error_probe_verdict(
        -11, "", "Fatal Python error: Segmentation fault"
    )
    assert status == "FAIL"
    assert "signal 11" in detail and "(CXX is /opt/gcc/bin/g++ here)" in detail
    assert detail.endswith("CC=gcc CXX=g++ pip install --no-build-isolation --no-deps -e .")
    monkeypatch.delenv("CXX")
    assert "CXX is" not in gpu_check.error_probe_verdict(-6, "", "")[1]
    status, detail = gpu_check.error_probe_verdict(0, "nothing raised\n", "")
    assert (status, detail) == ("FAIL", "exit status 0: nothing raised")
    status, detail = gpu_check.error_probe_verdict(1, "", "Traceback\nImportError: no _C")
    assert (status, detail) == ("FAIL", "exit status 1: ImportError: no _C")


@needs_cpp
def test_outside_sample_verdict_allows_rounding_and_catches_the_rest(gpu_check):
    """The CUDA kernels add in another order than the CPU kernel: a last-bit difference of the
    inside sample passes; a real difference, a NaN or a non-zero outside gradient fails."""
    value, shapes, locations, weights, grad_output = gpu_check.outside_non_finite_inputs()
    cpu = gpu_check.output_and_grads("cpu", value, shapes, locations, weights, grad_output)
    assert gpu_check.outside_non_finite_verdict(cpu, cpu)[0] == "ok"

    def changed(index, change):
        candidate = [t.clone() for t in cpu]
        change(candidate[index])
        return gpu_check.outside_non_finite_verdict(candidate, cpu)

    rounded = changed(0, lambda t: t.mul_(1 + 1e-15))
    assert rounded[0] == "ok", rounded
    status, detail = changed(0, lambda t: t.add_(1e-9))
    assert status == "FAIL" and "output differs by 1.0e-09" in detail
    status, detail = changed(1, lambda t: t.view(-1)[0].fill_(math.nan))
    assert status == "FAIL" and "value gradient has non-finite values" in detail
    status, detail = changed(2, lambda t: t[:, 0].fill_(1e-20))
    assert status == "FAIL" and "outside samples' gradients not 0" in detail
    assert "location gradient" not in detail  # within 1e-12 of the CPU's


# ----------------------------------------------------------------------------- on a GPU
@pytest.mark.cuda
def test_build_part_passes_on_this_gpu(gpu_check):
    assert gpu_check.main(["--parts", "build"]) == 0


# ----------------------------------------------------------------------------- model parts
def test_training_step_rows_on_the_cpu(gpu_check, tiny_cfg):
    """The train-step part's logic on the tiny model: three precisions from the same weights and
    inputs, seeded alike, so their step-0 losses agree and the comparisons pass."""
    rows = gpu_check.train_step_rows(tiny_cfg(), batch=2, steps=2)
    assert [row.check for row in rows] == [
        "fp32, batch 2 at 64x64",
        "bf16, batch 2 at 64x64",
        "fp16, batch 2 at 64x64",
        "bf16 step-0 losses vs fp32",
        "fp16 step-0 losses vs fp32",
    ]
    assert all(row.status == "ok" for row in rows), [(r.check, r.detail) for r in rows]
    fp32, bf16 = rows[0].values, rows[1].values
    assert fp32["finite"] and fp32["expressions_per_second"] > 0
    assert set(fp32["losses"]) == set(bf16["losses"]) and len(fp32["losses"]) > 3
    assert fp32["total"] == pytest.approx(sum(fp32["losses"].values()))
    assert rows[3].values["difference"] <= gpu_check.LOSS_TOLERANCE["bf16"]

    # The same weights and seed give the same step-0 losses: what makes the comparison fair.
    again = gpu_check.train_step_rows(tiny_cfg(), batch=2, steps=2)
    assert again[0].values["losses"] == fp32["losses"]


def test_eval_row_on_the_cpu(gpu_check, tiny_text_encoder, tiny_max_tokens):
    args = gpu_check.parse_args(
        [
            "--device",
            "cpu",
            "--config-file",
            gpu_check.TINY_CONFIG,
            "--text-encoder",
            tiny_text_encoder,
            "--eval-images",
            "1",
            "--expressions-per-image",
            "3",
            "--eval-repeats",
            "1",
            "--opts",
            "MODEL.TEXT_ENCODER.MAX_TOKENS",
            str(tiny_max_tokens),
        ]
    )
    (row,) = gpu_check.check_eval(args)
    assert row.status == "ok", row.detail
    assert row.values["grouped_expressions_per_second"] > 0
    assert row.values["max_ref_seg_difference"] <= gpu_check.EVAL_TOLERANCE
