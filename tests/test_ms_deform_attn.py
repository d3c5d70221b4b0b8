"""Multi-scale deformable attention: reference, C++ and CUDA kernels, dispatch, and the layer."""

import importlib
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instalign_d2.layers.ms_deform_attn import (
    MSDeformAttn,
    ms_deform_attn,
    ms_deform_attn_pytorch,
    msda_extension_info,
)

# The package re-exports the function ms_deform_attn under the submodule's name, so
# `import ... as` would give the function; this gives the module.
msda_module = importlib.import_module("instalign_d2.layers.ms_deform_attn")
HAS_CPP = msda_extension_info() != "missing"
needs_cpp = pytest.mark.skipif(
    not HAS_CPP, reason="instalign_d2._C lacks ms_deform_attn; run pip install -e ."
)


@pytest.fixture(scope="module", autouse=True)
def errors_of_the_extension_reach_python(load_tool):
    """Tests below call into _C with inputs its checks refuse.  An extension built against
    another C++ runtime than this Python's kills the process there instead of raising; a child
    process finds that out first, so the run stops with the reason and the fix."""
    if not HAS_CPP:
        return
    row = load_tool("gpu_check").check_errors_reach_python()
    if row.status != "ok":
        pytest.exit(f"instalign_d2._C: {row.detail}", returncode=1)


# --------------------------------------------------------------------------- helpers
def level_starts(shapes):
    sizes = [h * w for h, w in shapes]
    return torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)


def make_inputs(
    shapes,
    batch,
    heads,
    channels,
    queries,
    points,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    generator=None,
):
    """Random inputs; locations spread over [-0.3, 1.3] so that some points lie (partly) outside.
    Drawn from ``generator``, else from a fresh one seeded with ``seed``: every draw of these
    tests is reproducible."""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    num_levels = len(shapes)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads, channels, dtype=dtype, generator=generator)
    locations = (
        torch.rand(batch, queries, heads, num_levels, points, 2, dtype=dtype, generator=generator)
        * 1.6
        - 0.3
    )
    weights = torch.rand(
        batch, queries, heads, num_levels, points, dtype=dtype, generator=generator
    )
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    return [t.to(device) for t in (value, spatial_shapes, level_starts(shapes), locations, weights)]


def output_and_grads(
    impl, value, spatial_shapes, starts, locations, weights, grad_output=None, **kwargs
):
    value, locations, weights = (
        t.detach().clone().requires_grad_() for t in (value, locations, weights)
    )
    output = ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl=impl, **kwargs)
    if grad_output is None:
        grad_output = torch.linspace(
            -1, 1, output.numel(), dtype=output.dtype, device=output.device
        ).view_as(output)
    grads = torch.autograd.grad(output, (value, locations, weights), grad_output)
    return output.detach(), grads


def bilinear_by_hand(image, x, y):
    """image (H, W, C); one sample at normalised (x, y), zero outside -- the definition, in loops."""
    height, width, channels = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    result = torch.zeros(channels, dtype=image.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= xx < width and 0 <= yy < height:
                result += (1 - abs(px - xx)) * (1 - abs(py - yy)) * image[yy, xx]
    return result


# Level lists that exercise the edge cases: several levels, a 1x1 level, uneven H != W.
level_lists = st.lists(st.tuples(st.integers(1, 7), st.integers(1, 7)), min_size=1, max_size=4).map(
    lambda levels: levels + [(1, 1)] if (1, 1) not in levels else levels
)
small_sizes = st.fixed_dictionaries(
    {
        "shapes": level_lists,
        "batch": st.integers(1, 3),
        "heads": st.integers(1, 3),
        "channels": st.integers(1, 20),
        "queries": st.integers(1, 9),
        "points": st.integers(1, 4),
        "seed": st.integers(0, 2**31 - 1),
    }
)


# --------------------------------------------------------------------------- the reference
def test_reference_matches_the_definition_computed_by_loops():
    shapes = [(3, 5), (1, 1), (4, 2)]
    value, spatial_shapes, starts, locations, weights = make_inputs(
        shapes, batch=2, heads=2, channels=3, queries=4, points=2, seed=1
    )
    output = ms_deform_attn_pytorch(value, spatial_shapes, starts, locations, weights)
    expected = torch.zeros_like(output)
    for b in range(2):
        for q in range(4):
            for h in range(2):
                for level, (height, width) in enumerate(shapes):
                    start = int(starts[level])
                    image = value[b, start : start + height * width, h].reshape(height, width, 3)
                    for p in range(2):
                        x, y = locations[b, q, h, level, p].tolist()
                        expected[b, q, 3 * h : 3 * h + 3] += weights[
                            b, q, h, level, p
                        ] * bilinear_by_hand(image, x, y)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_cpp)])
def test_hand_computed_samples(impl):
    """A 2x3 map (H=2, W=3) holding 0..5: pixel centres, midpoints, edges and the outside."""
    value = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    spatial_shapes = torch.tensor([[2, 3]])
    starts = torch.tensor([0])
    # (x, y) -> expected sample; pixel (row r, col c) holds 3r + c and has its centre at
    # ((c + 0.5) / 3, (r + 0.5) / 2).
    cases = [
        ((0.5 / 3, 0.25), 0.0),  # centre of (0, 0)
        ((2.5 / 3, 0.75), 5.0),  # centre of (1, 2)
        ((1.0 / 3, 0.25), 0.5),  # halfway between (0, 0) and (0, 1)
        ((1.5 / 3, 0.5), 2.5),  # between rows 0 and 1 at column 1: (1 + 4) / 2
        ((0.0, 0.25), 0.0),  # left edge: half of pixel (0, 0) = 0, half zero padding
        ((1.0, 0.75), 2.5),  # right edge: half of pixel (1, 2) = 5
        ((1.5 / 3, 1.0), 2.0),  # bottom edge: half of pixel (1, 1) = 4
        ((-0.5, 0.5), 0.0),  # far outside
        ((0.5, 7.0), 0.0),
    ]
    locations = torch.tensor([xy for xy, _ in cases], dtype=torch.float64).view(
        1, len(cases), 1, 1, 1, 2
    )
    weights = torch.ones(1, len(cases), 1, 1, 1, dtype=torch.float64)
    output = ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl=impl)
    expected = torch.tensor([e for _, e in cases], dtype=torch.float64).view(1, len(cases), 1)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the C++ kernel
@needs_cpp
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=small_sizes)
def test_cpp_matches_reference_in_float64(sizes):
    inputs = make_inputs(**sizes)
    out_cpp, grads_cpp = output_and_grads("cpu", *inputs)
    out_ref, grads_ref = output_and_grads("pytorch", *inputs)
    torch.testing.assert_close(out_cpp, out_ref, rtol=0, atol=1e-9)
    for name, grad_cpp, grad_ref in zip(
        ("value", "sampling_locations", "attention_weights"), grads_cpp, grads_ref
    ):
        torch.testing.assert_close(
            grad_cpp, grad_ref, rtol=0, atol=1e-9, msg=lambda m: f"grad of {name}: {m}"
        )


def off_pixel_centre_lines(locations, shapes, margin=1e-3):
    """``locations (B, Q, heads, levels, points, 2)`` with every coordinate closer than ``margin``
    pixels to its level's pixel-centre lines moved ``2 * margin`` pixels off."""
    moved = locations.clone()
    for level, (height, width) in enumerate(shapes):
        for axis, size in ((0, width), (1, height)):
            coordinate = moved[..., level, :, axis]
            pixels = coordinate * size - 0.5
            near = (pixels - pixels.round()).abs() < margin
            coordinate[near] += 2 * margin / size
    return moved


def assert_close_relative(actual, expected, tolerance, name):
    """|actual - expected| <= tolerance * max|expected|: relative to the tensor's scale, so that
    entries that cancel to near zero do not demand impossible digits."""
    scale = expected.abs().max().item()
    error = (actual.double() - expected).abs().max().item()
    assert error <= tolerance * max(
        scale, 1e-30
    ), f"{name}: max error {error:.3g} vs scale {scale:.3g}"


@needs_cpp
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sizes=small_sizes)
def test_cpp_float32_matches_float64_reference(sizes):
    inputs64 = make_inputs(**sizes)
    # A location on a pixel-centre line is a kink of bilinear sampling: its gradient jumps there,
    # and float32 rounding may land on the other side. Keep the points off those lines.
    inputs64[3] = off_pixel_centre_lines(inputs64[3], sizes["shapes"])
    inputs32 = [t.float() if t.is_floating_point() else t for t in inputs64]
    out32, grads32 = output_and_grads("cpu", *inputs32)
    out64, grads64 = output_and_grads("pytorch", *inputs64)
    assert out32.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads32)
    assert_close_relative(out32, out64, 1e-4, "output")
    for name, g32, g64 in zip(
        ("value", "sampling_locations", "attention_weights"), grads32, grads64
    ):
        assert_close_relative(g32, g64, 1e-4, f"grad of {name}")


@needs_cpp
@pytest.mark.parametrize(
    "batch,heads,channels",
    [
        (1, 1, 16),  # batch*heads small: the backward splits channels into blocks
        (2, 4, 6),  # enough (batch, head) tasks: one block
    ],
)
def test_cpp_backward_both_work_splits(batch, heads, channels):
    inputs = make_inputs([(5, 3), (1, 1)], batch, heads, channels, 6, 3, seed=3)
    out_cpp, grads_cpp = output_and_grads("cpu", *inputs)
    out_ref, grads_ref = output_and_grads("pytorch", *inputs)
    torch.testing.assert_close(out_cpp, out_ref, rtol=0, atol=1e-10)
    for grad_cpp, grad_ref in zip(grads_cpp, grads_ref):
        torch.testing.assert_close(grad_cpp, grad_ref, rtol=0, atol=1e-10)


@needs_cpp
def test_cpp_gradcheck():
    value, spatial_shapes, starts, locations, weights = make_inputs(
        [(3, 2), (1, 1), (2, 3)], batch=2, heads=2, channels=2, queries=3, points=2, seed=5
    )
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, spatial_shapes, starts, loc, w, impl="cpu"),
        (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()),
    )


@needs_cpp
def test_cpp_points_far_outside_give_zero_output_and_gradients():
    value, spatial_shapes, starts, locations, weights = make_inputs([(4, 4), (2, 3)], 1, 2, 3, 4, 2)
    locations = (
        torch.tensor([-5.0, 1e30, float("nan"), 1.75], dtype=torch.float64)
        .view(1, 4, 1, 1, 1, 1)
        .expand_as(locations)
    )
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(
        "cpu", value, spatial_shapes, starts, locations, weights
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(grad_value, torch.zeros_like(grad_value))
    assert torch.equal(grad_locations, torch.zeros_like(grad_locations))
    assert torch.equal(grad_weights, torch.zeros_like(grad_weights))


@needs_cpp
def test_non_contiguous_inputs_give_the_contiguous_result():
    value, spatial_shapes, starts, locations, weights = make_inputs(
        [(4, 3), (2, 2)], 2, 3, 4, 5, 2, seed=7
    )
    # The same numbers, laid out transposed in memory.
    value_nc = value.transpose(0, 1).contiguous().transpose(0, 1)
    locations_nc = locations.permute(5, 4, 3, 2, 1, 0).contiguous().permute(5, 4, 3, 2, 1, 0)
    weights_nc = weights.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not (
        value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous()
    )
    out, grads = output_and_grads("cpu", value, spatial_shapes, starts, locations, weights)
    out_nc, grads_nc = output_and_grads(
        "cpu", value_nc, spatial_shapes, starts, locations_nc, weights_nc
    )
    torch.testing.assert_close(out_nc, out, rtol=0, atol=0)
    for g_nc, g in zip(grads_nc, grads):
        torch.testing.assert_close(g_nc, g, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_cpp)])
def test_no_queries(impl):
    value, spatial_shapes, starts, locations, weights = make_inputs([(3, 3), (1, 1)], 2, 2, 4, 0, 2)
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(
        impl, value, spatial_shapes, starts, locations, weights
    )
    assert out.shape == (2, 0, 8)
    assert torch.equal(grad_value, torch.zeros_like(value))
    assert grad_locations.shape == locations.shape and grad_weights.shape == weights.shape


@needs_cpp
def test_batch_not_divisible_by_im2col_step():
    inputs = make_inputs([(4, 3), (1, 1)], 3, 2, 4, 5, 2, seed=9)
    out_ref, grads_ref = output_and_grads("pytorch", *inputs)
    out, grads = output_and_grads("cpu", *inputs, im2col_step=2)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


@needs_cpp
def test_extension_rejects_levels_that_overrun_value():
    """A direct call into _C with spatial_shapes that do not fit value must not read past it."""
    value, _, _, locations, weights = make_inputs([(3, 3), (1, 1)], 1, 1, 2, 2, 1)
    too_big = torch.tensor([[4, 4], [1, 1]])
    with pytest.raises(RuntimeError, match=r"level 0 .*\(4, 4\).*S=10"):
        msda_module._EXTENSION.ms_deform_attn_forward(
            value, too_big, torch.tensor([0, 16]), locations, weights, 64
        )


@needs_cpp
@pytest.mark.parametrize(
    "shapes,starts,pattern",
    [
        ([[3, 3], [2, 1]], [0, 9], r"level 1 .*\(2, 1\) starting at level_start_index 9 .*S=10"),
        ([[3, 3], [1, 1]], [0, -1], r"level 1 .*starting at level_start_index -1"),
        ([[0, 3], [1, 1]], [0, 0], r"level 0 .*\(0, 3\)"),
        ([[2**40, 2**40], [1, 1]], [0, 1], r"level 0 .*does not fit in value's S=10"),
    ],
    ids=["past-the-end", "negative-start", "empty-level", "overflowing-product"],
)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_extension_checks_levels_in_both_directions(shapes, starts, pattern, direction):
    """The shared C++ entry checks the level tables for every device before any kernel runs."""
    value, _, _, locations, weights = make_inputs([(3, 3), (1, 1)], 1, 1, 2, 2, 1)
    args = [value, torch.tensor(shapes), torch.tensor(starts), locations, weights]
    with pytest.raises(RuntimeError, match=pattern):
        if direction == "forward":
            msda_module._EXTENSION.ms_deform_attn_forward(*args, 64)
        else:
            grad_output = torch.zeros(1, 2, 2, dtype=value.dtype)
            msda_module._EXTENSION.ms_deform_attn_backward(*args, grad_output, 64)


@needs_cpp
def test_extension_refuses_level_tables_on_another_device_and_too_many_levels():
    value, spatial_shapes, starts, locations, weights = make_inputs([(3, 3), (1, 1)], 1, 1, 2, 2, 1)
    with pytest.raises(RuntimeError, match=r"must be on the CPU or on value's device cpu"):
        msda_module._EXTENSION.ms_deform_attn_forward(
            value, spatial_shapes.to("meta"), starts, locations, weights, 64
        )
    levels = msda_module._EXTENSION.MSDA_MAX_LEVELS + 1
    many = [(1, 1)] * levels
    value, spatial_shapes, starts, locations, weights = make_inputs(many, 1, 1, 2, 2, 1)
    with pytest.raises(RuntimeError, match=rf"at most {levels - 1} levels, got {levels}"):
        msda_module._EXTENSION.ms_deform_attn_forward(
            value, spatial_shapes, starts, locations, weights, 64
        )
    # The reference has no such limit, and the wrapper does not impose one on it.
    out = ms_deform_attn(value, many, None, locations, weights, impl="pytorch")
    assert out.shape == (1, 2, 2)


def outside_with_non_finite_weights(device="cpu"):
    """Samples entirely outside their level (no corner on the map), with weights inf, -inf,
    NaN and 1, next to one ordinary sample inside."""
    value, spatial_shapes, starts, _, _ = make_inputs([(4, 4), (2, 3)], 1, 1, 3, 5, 1)
    outside = torch.tensor([[-5.0, 0.5], [0.5, 1.75], [-0.2, -0.2], [2.0, 2.0]])
    locations = torch.cat([outside, torch.tensor([[0.4, 0.6]])]).to(torch.float64)
    locations = locations.view(1, 5, 1, 1, 1, 2).expand(1, 5, 1, 2, 1, 2).contiguous()
    weights = torch.tensor([math.inf, -math.inf, math.nan, 1.0, 0.5], dtype=torch.float64)
    weights = weights.view(1, 5, 1, 1, 1).expand(1, 5, 1, 2, 1).contiguous()
    grad_output = torch.ones(1, 5, 3, dtype=torch.float64)
    return [t.to(device) for t in (value, spatial_shapes, starts, locations, weights, grad_output)]


@needs_cpp
def test_outside_samples_with_non_finite_weights_have_zero_location_and_weight_gradients():
    """A sample with no corner on the map contributes zero around its location, so its location
    and weight gradients are 0 whatever its weight (0 * inf would be NaN).  The kernels give
    that on both devices, as CUDA's grid_sample does; the CPU grid_sample multiplies the zero
    padding by the infinite weight and gives NaN, so the reference is compared where the
    weights are finite."""
    *inputs, grad_output = outside_with_non_finite_weights()
    out, (grad_value, grad_locations, grad_weights) = output_and_grads(
        "cpu", *inputs, grad_output=grad_output
    )
    _, (_, ref_locations, ref_weights) = output_and_grads(
        "pytorch", *inputs, grad_output=grad_output
    )
    assert torch.equal(grad_locations[:, :4], torch.zeros_like(grad_locations[:, :4]))
    assert torch.equal(grad_weights[:, :4], torch.zeros_like(grad_weights[:, :4]))
    finite = slice(3, 5)  # weights 1 (outside) and 0.5 (inside)
    torch.testing.assert_close(
        grad_locations[:, finite], ref_locations[:, finite], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(grad_weights, ref_weights, rtol=0, atol=1e-12)
    # The inside sample is untouched by its neighbours' weights.
    assert grad_locations[:, 4].abs().sum() > 0 and torch.isfinite(out[:, 4]).all()
    assert torch.equal(out[:, :4], torch.zeros_like(out[:, :4]))
    assert torch.isfinite(grad_value).all()


# --------------------------------------------------------------------------- bad input
def good_inputs():
    return make_inputs([(3, 4), (1, 1)], batch=2, heads=2, channels=3, queries=5, points=2, seed=17)


def with_replaced(index, tensor):
    inputs = good_inputs()
    inputs[index] = tensor
    return inputs


@pytest.mark.parametrize(
    "inputs,error,pattern",
    [
        (
            with_replaced(0, torch.zeros(2, 13, 6, dtype=torch.float64)),
            ValueError,
            r"value must be .*\(2, 13, 6\)",
        ),
        (
            with_replaced(0, torch.zeros(2, 14, 2, 3, dtype=torch.float64)),
            ValueError,
            r"S=14.*sum\(H\*W\)=13",
        ),
        (
            with_replaced(2, torch.tensor([0, 11])),
            ValueError,
            r"level_start_index \[0, 11\].*\[0, 12\]",
        ),
        (
            with_replaced(2, torch.tensor([0])),
            ValueError,
            r"level_start_index must be \(levels,\) = \(2,\)",
        ),
        (
            with_replaced(1, torch.tensor([[3, 4, 1], [1, 1, 1]])),
            ValueError,
            r"spatial_shapes must be \(levels, 2\)",
        ),
        (
            with_replaced(1, torch.tensor([[3, 4], [1, 1]], dtype=torch.int32)),
            TypeError,
            r"spatial_shapes must be int64",
        ),
        (
            with_replaced(3, torch.zeros(2, 5, 3, 2, 2, 2, dtype=torch.float64)),
            ValueError,
            r"sampling_locations \(2, 5, 3, 2, 2, 2\) must be \(B=2, Lq, heads=2",
        ),
        (
            with_replaced(4, torch.zeros(2, 5, 2, 2, 3, dtype=torch.float64)),
            ValueError,
            r"attention_weights \(2, 5, 2, 2, 3\).*\(2, 5, 2, 2, 2\)",
        ),
        (
            with_replaced(4, torch.zeros(2, 5, 2, 2, 2)),
            TypeError,
            r"attention_weights is torch.float32 but value is torch.float64",
        ),
        (
            with_replaced(0, torch.zeros(2, 13, 2, 3, dtype=torch.int64)),
            TypeError,
            r"value must be a floating-point",
        ),
        (
            with_replaced(0, torch.zeros(2, 13, 2, 3, dtype=torch.float64, device="meta")),
            ValueError,
            r"one device, got value on meta",
        ),
        (
            with_replaced(1, torch.tensor([[3, 4], [1, 1]], device="meta")),
            ValueError,
            r"spatial_shapes must be on the CPU or on value's device cpu, got meta",
        ),
        (
            with_replaced(1, [(3, 4.0), (1, 1)]),
            TypeError,
            r"spatial_shapes must be an int64 \(levels, 2\) tensor or \(H, W\) pairs of ints",
        ),
        (
            with_replaced(1, [(3, 4), (0, 1)]),
            ValueError,
            r"spatial_shapes must hold positive \(H, W\) rows",
        ),
    ],
    ids=[
        "value-rank",
        "S-vs-levels",
        "start-index-values",
        "start-index-shape",
        "spatial-shapes-shape",
        "spatial-shapes-dtype",
        "locations-heads",
        "weights-shape",
        "dtype-mismatch",
        "integer-value",
        "device-mismatch",
        "levels-on-other-device",
        "float-python-shape",
        "empty-level",
    ],
)
def test_bad_inputs_name_the_argument_and_shapes(inputs, error, pattern):
    with pytest.raises(error, match=pattern):
        ms_deform_attn(*inputs)


def test_cuda_impl_on_cpu_tensors_is_refused():
    with pytest.raises(ValueError, match=r"impl='cuda' needs CUDA tensors, got value on cpu"):
        ms_deform_attn(*good_inputs(), impl="cuda")


def test_unknown_impl_and_bad_im2col_step_are_refused():
    with pytest.raises(ValueError, match=r"impl must be one of .*'fast'"):
        ms_deform_attn(*good_inputs(), impl="fast")
    with pytest.raises(ValueError, match=r"im2col_step must be >= 1, got 0"):
        ms_deform_attn(*good_inputs(), im2col_step=0)


# --------------------------------------------------------------------------- dispatch
def backend_of(output):
    """Which implementation produced `output`: the kernels' autograd node names our Function."""
    return "kernel" if "MSDeformAttnFunction" in type(output.grad_fn).__name__ else "pytorch"


def run_with_grad(impl="auto"):
    value, spatial_shapes, starts, locations, weights = good_inputs()
    return ms_deform_attn(
        value.requires_grad_(), spatial_shapes, starts, locations, weights, impl=impl
    )


@needs_cpp
def test_auto_uses_the_cpp_kernel_on_cpu_and_the_env_var_overrides_it(monkeypatch):
    monkeypatch.delenv("INSTALIGN_MSDA_IMPL", raising=False)
    assert backend_of(run_with_grad("auto")) == "kernel"
    monkeypatch.setenv("INSTALIGN_MSDA_IMPL", "pytorch")
    assert backend_of(run_with_grad("auto")) == "pytorch"
    # The variable overrides "auto" only, never an explicit choice.
    assert backend_of(run_with_grad("cpu")) == "kernel"
    monkeypatch.setenv("INSTALIGN_MSDA_IMPL", "gpu")
    with pytest.raises(ValueError, match=r"INSTALIGN_MSDA_IMPL='gpu' must be one of"):
        run_with_grad("auto")


def test_auto_falls_back_to_the_reference_with_one_warning_when_the_extension_is_missing(
    monkeypatch,
):
    monkeypatch.delenv("INSTALIGN_MSDA_IMPL", raising=False)
    monkeypatch.setattr(msda_module, "_EXTENSION", None)
    monkeypatch.setattr(msda_module, "_warned_fallback", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [run_with_grad("auto") for _ in range(3)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert "pip install --no-build-isolation --no-deps -e ." in messages[0]
    assert all(backend_of(out) == "pytorch" for out in outputs)
    with pytest.raises(
        RuntimeError, match=r"impl='cpu' but the compiled extension instalign_d2._C is missing"
    ):
        run_with_grad("cpu")


@needs_cpp
def test_cpu_kernel_refuses_half_but_auto_takes_the_reference():
    value, spatial_shapes, starts, locations, weights = (
        t.bfloat16() if t.is_floating_point() else t for t in good_inputs()
    )
    with pytest.raises(
        TypeError, match=r"C\+\+ kernel supports float32 and float64, got torch.bfloat16"
    ):
        ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl="cpu")
    out = ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl="auto")
    expected = ms_deform_attn_pytorch(
        *(t.double() if t.is_floating_point() else t for t in good_inputs())
    )
    assert out.dtype == torch.bfloat16
    assert_close_relative(out, expected, 0.03, "bfloat16 output")


def test_every_impl_checks_the_dtype_auto_on_cuda_included(monkeypatch):
    """ "auto" picks the CUDA kernel for CUDA tensors; that choice is checked like an explicit
    impl="cuda", so float8 gets our message instead of a dispatch error from the extension."""
    monkeypatch.delenv("INSTALIGN_MSDA_IMPL", raising=False)
    monkeypatch.setattr(msda_module, "_extension_has_cuda", lambda: True)
    cuda = torch.device("cuda", 0)
    assert msda_module._resolve_impl("auto", cuda, torch.bfloat16) == "cuda"
    for impl in ("auto", "cuda"):
        with pytest.raises(TypeError, match=r"CUDA kernel supports .*got torch.float8_e4m3fn"):
            msda_module._resolve_impl(impl, cuda, torch.float8_e4m3fn)
    # And the same for an impl forced through the environment variable.
    monkeypatch.setenv("INSTALIGN_MSDA_IMPL", "cuda")
    with pytest.raises(TypeError, match=r"CUDA kernel supports"):
        msda_module._resolve_impl("auto", cuda, torch.float8_e5m2)
    monkeypatch.setenv("INSTALIGN_MSDA_IMPL", "cpu")
    with pytest.raises(TypeError, match=r"C\+\+ kernel supports float32 and float64"):
        msda_module._resolve_impl("auto", torch.device("cpu"), torch.float16)


def test_every_form_of_the_levels_gives_one_cached_layout():
    shapes = [(3, 4), (1, 1)]
    by_tensor = msda_module.level_layout(torch.tensor(shapes), torch.tensor([0, 12]))
    by_python = msda_module.level_layout(shapes)
    assert by_tensor is by_python is msda_module.level_layout(by_python)
    assert by_python.shapes == ((3, 4), (1, 1)) and by_python.starts == (0, 12)
    assert by_python.num_tokens == 13
    assert torch.equal(by_python.spatial_shapes, torch.tensor(shapes))
    assert by_python.spatial_shapes.device.type == "cpu"
    assert torch.equal(by_python.sizes_xy("cpu"), torch.tensor([[4.0, 3.0], [1.0, 1.0]]))
    assert by_python.sizes_xy("cpu") is by_python.sizes_xy(torch.device("cpu"))


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_cpp)])
def test_python_shapes_give_the_tensor_result_without_reading_any_tensor(impl, monkeypatch):
    """The hot path (python shapes, as the pixel decoder passes them) reads no tensor back:
    on a GPU each .tolist() would be a synchronisation."""
    value, spatial_shapes, starts, locations, weights = good_inputs()
    out_tensor, grads_tensor = output_and_grads(
        impl, value, spatial_shapes, starts, locations, weights
    )
    msda_module.level_layout([(3, 4), (1, 1)])  # what the pixel decoder's first step does

    def no_read_back(*args, **kwargs):
        raise AssertionError("a tensor was read back to python on the hot path")

    for name in ("tolist", "item", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_read_back)
    out_python, grads_python = output_and_grads(
        impl, value, [(3, 4), (1, 1)], None, locations, weights
    )
    monkeypatch.undo()
    torch.testing.assert_close(out_python, out_tensor, rtol=0, atol=0)
    for g_python, g_tensor in zip(grads_python, grads_tensor):
        torch.testing.assert_close(g_python, g_tensor, rtol=0, atol=0)


# --------------------------------------------------------------------------- CUDA
CUDA_DTYPE_TOLERANCE = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", list(CUDA_DTYPE_TOLERANCE), ids=str)
@pytest.mark.parametrize("batch,im2col_step", [(3, 64), (3, 2)])
def test_cuda_matches_reference(dtype, batch, im2col_step):
    if "cuda" not in msda_extension_info():
        pytest.fail(
            f"a GPU is present but instalign_d2._C has no CUDA kernels ({msda_extension_info()}); "
            "rebuild with FORCE_CUDA=1"
        )
    shapes = [(7, 5), (1, 1), (3, 4)]
    generator = torch.Generator().manual_seed(11)
    inputs64 = make_inputs(shapes, batch, 3, 40, 9, 3, generator=generator)
    grad64 = torch.randn(batch, 9, 120, dtype=torch.float64, generator=generator)
    # The reference sees exactly the numbers the kernel sees: rounded to `dtype`, then widened.
    # (From the unrounded inputs, a sample that the rounding moves across a pixel-centre line
    # would change its location gradient by O(1) and fail any tolerance.)
    rounded = [t.to(dtype).double() if t.is_floating_point() else t for t in inputs64]
    out_ref, grads_ref = output_and_grads(
        "pytorch", *rounded, grad_output=grad64.to(dtype).double()
    )
    cuda_inputs = [(t.to(dtype) if t.is_floating_point() else t).cuda() for t in inputs64]
    out, grads = output_and_grads(
        "cuda", *cuda_inputs, grad_output=grad64.to(dtype).cuda(), im2col_step=im2col_step
    )
    tolerance = CUDA_DTYPE_TOLERANCE[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_close_relative(out.cpu(), out_ref, tolerance, "output")
    for name, g, g_ref in zip(
        ("value", "sampling_locations", "attention_weights"), grads, grads_ref
    ):
        assert_close_relative(g.cpu(), g_ref, tolerance, f"grad of {name}")


@pytest.mark.cuda
def test_cuda_gradcheck_and_auto_dispatch():
    value, spatial_shapes, starts, locations, weights = (
        t.cuda() for t in make_inputs([(3, 2), (1, 1)], 2, 2, 3, 3, 2, seed=13)
    )
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn(v, spatial_shapes, starts, loc, w, impl="cuda"),
        (value.requires_grad_(), locations.requires_grad_(), weights.requires_grad_()),
    )
    out = ms_deform_attn(value, spatial_shapes, starts, locations, weights, impl="auto")
    assert out.is_cuda and backend_of(out) == "kernel"


@pytest.mark.cuda
@needs_cpp
def test_cuda_outside_samples_with_non_finite_weights_match_the_cpu_kernel():
    *inputs, grad_output = outside_with_non_finite_weights()
    out_cpu, grads_cpu = output_and_grads("cpu", *inputs, grad_output=grad_output)
    *cuda_inputs, cuda_grad = outside_with_non_finite_weights("cuda")
    out_cuda, grads_cuda = output_and_grads("cuda", *cuda_inputs, grad_output=cuda_grad)
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=0, atol=1e-12)
    for g_cuda, g_cpu in zip(grads_cuda, grads_cpu):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=0, atol=1e-12, equal_nan=False)


@pytest.mark.cuda
def test_cuda_backward_declares_itself_non_deterministic():
    value, spatial_shapes, starts, locations, weights = (
        t.cuda() for t in make_inputs([(3, 2), (1, 1)], 1, 1, 2, 2, 1)
    )
    out = ms_deform_attn(value.requires_grad_(), spatial_shapes, starts, locations, weights)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="ms_deform_attn_backward_cuda"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.cuda
def test_cuda_direct_call_checks_levels_and_python_shapes_never_synchronise():
    value, spatial_shapes, starts, locations, weights = (
        t.cuda() for t in make_inputs([(3, 3), (1, 1)], 1, 1, 2, 2, 1)
    )
    # Level tables on the GPU are read back and checked like CPU ones.
    with pytest.raises(RuntimeError, match=r"level 0 .*\(4, 4\).*S=10"):
        msda_module._EXTENSION.ms_deform_attn_forward(
            value, torch.tensor([[4, 4], [1, 1]]).cuda(), starts, locations, weights, 64
        )
    layer = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).cuda()
    query = torch.randn(2, 10, 8, device="cuda")
    reference_points = torch.rand(2, 10, 2, 2, device="cuda")
    layer(query, reference_points, query, [(3, 3), (1, 1)])  # warm-up: the layout's first use
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(query, reference_points, query, [(3, 3), (1, 1)]).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# --------------------------------------------------------------------------- the layer
def test_layer_initial_offsets_follow_deformable_detr():
    layer = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    offsets = layer.sampling_offsets.bias.detach().view(8, 3, 4, 2)
    assert torch.equal(
        layer.sampling_offsets.weight, torch.zeros_like(layer.sampling_offsets.weight)
    )
    # Head m looks along angle 2*pi*m/8, scaled so that max(|dx|, |dy|) = 1; point k is k+1 out.
    unit_directions = torch.tensor(
        [[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]], dtype=torch.float32
    )
    for k in range(4):
        for level in range(3):
            torch.testing.assert_close(
                offsets[:, level, k], (k + 1) * unit_directions, atol=1e-6, rtol=0
            )
    # Attention starts uniform over levels x points.
    assert torch.equal(
        layer.attention_weights.weight, torch.zeros_like(layer.attention_weights.weight)
    )
    assert torch.equal(layer.attention_weights.bias, torch.zeros_like(layer.attention_weights.bias))
    assert torch.equal(layer.value_proj.bias, torch.zeros(32)) and torch.equal(
        layer.output_proj.bias, torch.zeros(32)
    )


def identity_layer(offset_xy, d_model=2, impl="auto"):
    """One level, one head, one point, identity projections, every query offset by offset_xy
    pixels: the layer then just reads input_flatten at (reference point + offset)."""
    layer = MSDeformAttn(d_model=d_model, n_levels=1, n_heads=1, n_points=1, impl=impl).double()
    with torch.no_grad():
        for projection in (layer.value_proj, layer.output_proj):
            projection.weight.copy_(torch.eye(d_model))
        layer.sampling_offsets.bias.copy_(torch.tensor(offset_xy, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_cpp)])
def test_layer_reads_the_pixel_its_offset_points_at(impl):
    height, width = 3, 5  # H != W: a swapped (x, y) normalisation would read the wrong pixels
    image = torch.randn(height, width, 2, dtype=torch.float64)
    input_flatten = image.reshape(1, height * width, 2)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    centres = torch.stack(
        [(cols.flatten() + 0.5) / width, (rows.flatten() + 0.5) / height], dim=-1
    ).double()
    reference_points = centres.to(torch.float64).view(1, -1, 1, 2)
    query = torch.zeros(1, height * width, 2, dtype=torch.float64)
    shapes, starts = torch.tensor([[height, width]]), torch.tensor([0])

    at_reference = identity_layer([0.0, 0.0], impl=impl)(
        query, reference_points, input_flatten, shapes, starts
    )
    torch.testing.assert_close(at_reference, input_flatten, rtol=0, atol=1e-12)

    # One pixel right and one down: query (r, c) reads pixel (r+1, c+1), or zero past the edge.
    shifted = identity_layer([1.0, 1.0], impl=impl)(
        query, reference_points, input_flatten, shapes, starts
    )
    expected = torch.zeros_like(image)
    expected[:-1, :-1] = image[1:, 1:]
    torch.testing.assert_close(shifted, expected.view(1, -1, 2), rtol=0, atol=1e-12)


def test_layer_padding_mask_hides_padded_tokens():
    torch.manual_seed(0)
    layer = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=3).double()
    shapes, starts = torch.tensor([[4, 3], [2, 2]]), torch.tensor([0, 12])
    query = torch.randn(2, 5, 8, dtype=torch.float64)
    reference_points = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    input_flatten = torch.randn(2, 16, 8, dtype=torch.float64)
    mask = torch.rand(2, 16) < 0.4
    masked = layer(query, reference_points, input_flatten, shapes, starts, mask)
    # What a padded token holds must not matter, and it must differ from not masking at all.
    scrambled = input_flatten.masked_fill(mask[..., None], 123.0)
    torch.testing.assert_close(
        layer(query, reference_points, scrambled, shapes, starts, mask), masked
    )
    assert not torch.allclose(
        layer(query, reference_points, scrambled, shapes, starts, None), masked
    )


@needs_cpp
def test_layer_cpu_and_reference_agree_with_parameter_gradients():
    torch.manual_seed(1)
    layers = {
        impl: MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=2, impl=impl).double()
        for impl in ("cpu", "pytorch")
    }
    layers["pytorch"].load_state_dict(layers["cpu"].state_dict())
    with torch.no_grad():  # leave the flat initialisation so the offsets depend on the query
        layers["cpu"].sampling_offsets.weight.normal_(0, 0.5)
        layers["pytorch"].sampling_offsets.weight.copy_(layers["cpu"].sampling_offsets.weight)
    shapes, starts = torch.tensor([[5, 3], [1, 1]]), torch.tensor([0, 15])
    query = torch.randn(2, 6, 16, dtype=torch.float64)
    reference_points = torch.rand(2, 6, 2, 2, dtype=torch.float64)
    input_flatten = torch.randn(2, 16, 16, dtype=torch.float64)
    results = {}
    for impl, layer in layers.items():
        out = layer(query, reference_points, input_flatten, shapes, starts)
        out.pow(2).sum().backward()
        results[impl] = (out, {n: p.grad for n, p in layer.named_parameters()})
    torch.testing.assert_close(results["cpu"][0], results["pytorch"][0], rtol=0, atol=1e-10)
    for name, grad in results["cpu"][1].items():
        torch.testing.assert_close(
            grad, results["pytorch"][1][name], rtol=0, atol=1e-9, msg=lambda m: f"{name}: {m}"
        )


@pytest.mark.parametrize("impl", ["pytorch", pytest.param("cpu", marks=needs_cpp)])
def test_layer_reconciles_mixed_dtypes(impl):
    """float32 layer, float64 reference points (as autocast mixes half and float32): the op gets
    one dtype, the widest, and the result comes back in the layer's dtype."""
    torch.manual_seed(2)
    layer = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2, impl=impl)
    shapes, starts = torch.tensor([[3, 4]]), torch.tensor([0])
    query, input_flatten = torch.randn(1, 5, 8), torch.randn(1, 12, 8)
    reference_points = torch.rand(1, 5, 1, 2, dtype=torch.float64)
    out = layer(query, reference_points, input_flatten, shapes, starts)
    assert out.dtype == torch.float32
    out64 = layer.double()(query.double(), reference_points, input_flatten.double(), shapes, starts)
    torch.testing.assert_close(out, out64.float(), rtol=1e-5, atol=1e-5)


def test_layer_from_config_and_bad_arguments():
    from detectron2.config import get_cfg

    from instalign_d2.config import add_instalign_config

    cfg = get_cfg()
    add_instalign_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.NHEADS = 4
    cfg.MODEL.SEM_SEG_HEAD.NPOINTS = 2
    cfg.MODEL.SEM_SEG_HEAD.MSDA_IMPL = "pytorch"
    layer = MSDeformAttn(cfg)
    assert (layer.d_model, layer.n_heads, layer.n_points, layer.impl) == (64, 4, 2, "pytorch")
    assert layer.n_levels == len(cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES)
    assert layer.sampling_offsets.out_features == 4 * layer.n_levels * 2 * 2

    with pytest.raises(ValueError, match=r"d_model=30 must be divisible by n_heads=8"):
        MSDeformAttn(d_model=30, n_heads=8)
    layer = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    with pytest.raises(ValueError, match=r"built for n_levels=1, got 2 spatial shapes"):
        layer(torch.zeros(1, 3, 8), torch.zeros(1, 3, 1, 2), torch.zeros(1, 5, 8), [(2, 2), (1, 1)])
    with pytest.raises(ValueError, match=r"query and input_flatten must be \(B, Lq, 8\)"):
        layer(torch.zeros(1, 3, 6), torch.zeros(1, 3, 1, 2), torch.zeros(1, 4, 8), [(2, 2)])
    # What only the op checks (here S against the levels) is reported by the op, once.
    with pytest.raises(ValueError, match=r"value has S=5 tokens but spatial_shapes"):
        layer(torch.zeros(1, 3, 8), torch.zeros(1, 3, 1, 2), torch.zeros(1, 5, 8), [(2, 2)])
    with pytest.raises(
        ValueError,
        match=r"reference_points must be \(B, Lq, n_levels, 2\) = \(1, 3, 1, 2\), got \(1, 3, 1, 4\)",
    ):
        layer(
            torch.zeros(1, 3, 8),
            torch.zeros(1, 3, 1, 4),
            torch.zeros(1, 4, 8),
            torch.tensor([[2, 2]]),
            torch.tensor([0]),
        )
