"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), three ways.

* ``ms_deform_attn_pytorch`` -- the readable reference built on ``F.grid_sample``;
* ``instalign_d2._C`` -- our C++ (CPU) and CUDA kernels, wrapped in an autograd Function;
* ``ms_deform_attn`` -- the entry point the model calls: checks the inputs once and picks one of
  the above (``impl``), and ``MSDeformAttn`` -- the attention layer of the pixel decoder.

Shapes (B batch, S = sum of H_l*W_l value tokens, M heads, D channels per head, Lq queries,
L levels, P points per head and level):

    value               (B, S, M, D)
    spatial_shapes      (L, 2) int64, (H_l, W_l) of each level
    level_start_index   (L,)  int64, offset of each level in S
    sampling_locations  (B, Lq, M, L, P, 2) normalised (x, y); 0 and 1 are the map's outer edges
    attention_weights   (B, Lq, M, L, P)
    output              (B, Lq, M*D)

Each sample is bilinear with zero padding and the ``align_corners=False`` convention (pixel =
loc * size - 0.5), so points outside the map contribute zero.

``spatial_shapes`` may also be python ``(H, W)`` pairs (``level_start_index`` then None), or a
:class:`LevelLayout` from :func:`level_layout`.  However given, the levels are validated once per
distinct layout (a cache keyed on the python shapes) and reach the kernels as CPU tensors that
they read on the host, so with python shapes or CPU tensors a call makes no host-device
synchronisation and can be captured in a CUDA graph.  Level tensors on the GPU still work, at
the cost of one read-back per call.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "LevelLayout",
    "MSDeformAttn",
    "level_layout",
    "ms_deform_attn",
    "ms_deform_attn_pytorch",
    "msda_extension_info",
]

IMPLS = ("auto", "cuda", "cpu", "pytorch")
IMPL_ENV_VAR = "INSTALIGN_MSDA_IMPL"
BUILD_HINT = (
    "build it with `pip install --no-build-isolation --no-deps -e .` in the repository root"
)

# The C++ kernels handle these dtypes; CUDA adds half and bfloat16.
_CPU_KERNEL_DTYPES = (torch.float32, torch.float64)
_CUDA_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- the reference
def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention with ``F.grid_sample``: slow and memory-hungry, but
    plainly correct -- the kernels are tested against it.  ``spatial_shapes``: a tensor, python
    (H, W) pairs or a LevelLayout; ``level_start_index`` is implied by it and only taken for a
    uniform signature.  Checks nothing (``ms_deform_attn`` does)."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    if isinstance(spatial_shapes, LevelLayout):
        spatial_shapes = spatial_shapes.shapes
    elif isinstance(spatial_shapes, torch.Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    values_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample's grid runs from -1 to 1 across the map, our locations from 0 to 1.
    grids = 2.0 * sampling_locations - 1.0
    sampled = []
    for level, (height, width) in enumerate(shapes):
        # (B, H*W, M, D) -> (B*M, D, H, W): one image per (batch, head).
        image = (
            values_per_level[level]
            .permute(0, 2, 3, 1)
            .reshape(batch * heads, head_dim, height, width)
        )
        # (B, Lq, M, P, 2) -> (B*M, Lq, P, 2): one grid per (batch, head).
        grid = (
            grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, num_queries, num_points, 2)
        )
        sampled.append(
            F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (B*M, D, Lq, L*P), weighted and summed over every level and point.
    samples = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(
        batch * heads, 1, num_queries, num_levels * num_points
    )
    output = (samples * weights).sum(-1)
    return output.view(batch, heads * head_dim, num_queries).transpose(1, 2).contiguous()


# --------------------------------------------------------------------------- input checks
def _shape_error(message: str) -> ValueError:
    return ValueError(f"ms_deform_attn: {message}")


@dataclass(frozen=True, eq=False)
class LevelLayout:
    """The levels of the value maps, checked: ``shapes`` ((H, W) of each level), ``starts``
    (each level's first token: the running sums of H*W) and ``num_tokens`` (S) as python ints,
    and the same as int64 CPU tensors for the kernels.  :func:`level_layout` makes one per
    distinct layout and hands out that same object every time: treat it as read-only."""

    shapes: Tuple[Tuple[int, int], ...]
    starts: Tuple[int, ...]
    num_tokens: int
    spatial_shapes: torch.Tensor
    level_start_index: torch.Tensor
    _sizes_xy: Dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_levels(self) -> int:
        return len(self.shapes)

    def sizes_xy(self, device) -> torch.Tensor:
        """(levels, 2) float32 (W, H) of each level on ``device``, which turns pixel offsets into
        normalised ones: copied to the device on first use only, so later calls cost nothing
        (and can run inside a CUDA graph capture)."""
        device = torch.device(device)
        sizes = self._sizes_xy.get(device)
        if sizes is None:
            sizes = torch.tensor([(w, h) for h, w in self.shapes], dtype=torch.float32)
            sizes = sizes.view(len(self.shapes), 2).to(device)
            self._sizes_xy[device] = sizes
        return sizes


LevelShapes = Union[LevelLayout, torch.Tensor, Sequence[Sequence[int]]]


@functools.lru_cache(maxsize=256)
def _layout_of_shapes(shapes: Tuple[Tuple[int, int], ...]) -> LevelLayout:
    """The checked layout of python shapes: runs once per distinct layout (the cache key)."""
    if any(h <= 0 or w <= 0 for h, w in shapes):
        raise _shape_error(f"spatial_shapes must hold positive (H, W) rows, got {list(shapes)}")
    sizes = [h * w for h, w in shapes]
    starts = tuple(sum(sizes[:level]) for level in range(len(sizes)))
    return LevelLayout(
        shapes=shapes,
        starts=starts,
        num_tokens=sum(sizes),
        spatial_shapes=torch.tensor(shapes, dtype=torch.int64).view(len(shapes), 2),
        level_start_index=torch.tensor(starts, dtype=torch.int64),
    )


def _read_level_table(name: str, table: torch.Tensor, device: Optional[torch.device]) -> list:
    """A level tensor's content as python numbers, after its dtype and device are checked.
    (A table on the GPU is copied back here: the one synchronisation a caller can avoid by
    passing python shapes or CPU tensors.)"""
    if table.dtype != torch.int64:
        raise TypeError(
            f"ms_deform_attn: {name} must be int64, got {table.dtype}; pass it with .long()"
        )
    if device is not None and table.device.type != "cpu" and table.device != device:
        raise ValueError(
            f"ms_deform_attn: {name} must be on the CPU or on value's device {device}, "
            f"got {table.device}"
        )
    return table.tolist()


def level_layout(
    spatial_shapes: LevelShapes,
    level_start_index=None,
    *,
    device: Optional[torch.device] = None,
) -> LevelLayout:
    """The checked :class:`LevelLayout` of the levels.

    ``spatial_shapes``: a LevelLayout (returned as is), an int64 ``(levels, 2)`` tensor, or
    python ``(H, W)`` pairs.  ``level_start_index``: None (the running sums of H*W), an int64
    ``(levels,)`` tensor or python ints, which must be those running sums.  ``device``: value's
    device, the one place besides the CPU where level tensors may be.  The shapes are checked
    once per distinct layout; python values and CPU tensors are never synchronised on.
    """
    if isinstance(spatial_shapes, LevelLayout):
        layout = spatial_shapes
    else:
        rows = spatial_shapes
        if isinstance(spatial_shapes, torch.Tensor):
            if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
                raise _shape_error(
                    "spatial_shapes must be (levels, 2) with (H, W) rows, got "
                    f"{tuple(spatial_shapes.shape)}"
                )
            rows = _read_level_table("spatial_shapes", spatial_shapes, device)
        try:
            shapes = tuple((operator.index(h), operator.index(w)) for h, w in rows)
        except (TypeError, ValueError) as error:
            raise TypeError(
                "ms_deform_attn: spatial_shapes must be an int64 (levels, 2) tensor or (H, W) "
                f"pairs of ints, got {spatial_shapes!r}"
            ) from error
        layout = _layout_of_shapes(shapes)
    if level_start_index is None:
        return layout
    if isinstance(level_start_index, torch.Tensor):
        if tuple(level_start_index.shape) != (layout.num_levels,):
            raise _shape_error(
                f"level_start_index must be (levels,) = ({layout.num_levels},) to match "
                f"spatial_shapes {list(layout.shapes)}, got {tuple(level_start_index.shape)}"
            )
        starts = _read_level_table("level_start_index", level_start_index, device)
    else:
        starts = [operator.index(start) for start in level_start_index]
    if tuple(starts) != layout.starts:
        raise _shape_error(
            f"level_start_index {list(starts)} does not match spatial_shapes "
            f"{[list(shape) for shape in layout.shapes]}; expected the running sums "
            f"{list(layout.starts)}"
        )
    return layout


def _check_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
) -> LevelLayout:
    """Every check of the op's inputs, in one place, with one clear error for each way they can
    disagree; returns the levels' layout.  Beyond :func:`level_layout` (cached per layout) only
    python numbers are compared: no synchronisation, microseconds per call."""
    named = {
        "value": value,
        "sampling_locations": sampling_locations,
        "attention_weights": attention_weights,
    }
    for name, tensor in named.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"ms_deform_attn: {name} must be a torch.Tensor, got {type(tensor).__name__}"
            )
    expected_ranks = {
        "value": (4, "(B, S, heads, C_h)"),
        "sampling_locations": (6, "(B, Lq, heads, levels, points, 2)"),
        "attention_weights": (5, "(B, Lq, heads, levels, points)"),
    }
    for name, (rank, layout_text) in expected_ranks.items():
        if named[name].dim() != rank:
            raise _shape_error(
                f"{name} must be {layout_text}, got shape {tuple(named[name].shape)}"
            )
    layout = level_layout(spatial_shapes, level_start_index, device=value.device)

    batch, total_tokens, heads, _ = value.shape
    num_levels = layout.num_levels
    loc_shape = tuple(sampling_locations.shape)
    if (
        loc_shape[0] != batch
        or loc_shape[2] != heads
        or loc_shape[3] != num_levels
        or loc_shape[5] != 2
    ):
        raise _shape_error(
            f"sampling_locations {loc_shape} must be (B={batch}, Lq, heads={heads}, "
            f"levels={num_levels}, points, 2) to match value {tuple(value.shape)} and "
            f"spatial_shapes {list(layout.shapes)}"
        )
    if tuple(attention_weights.shape) != loc_shape[:5]:
        raise _shape_error(
            f"attention_weights {tuple(attention_weights.shape)} must be sampling_locations' "
            f"shape without its last dimension, {loc_shape[:5]}"
        )
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name in ("sampling_locations", "attention_weights"):
        if named[name].dtype != value.dtype:
            raise TypeError(
                f"ms_deform_attn: {name} is {named[name].dtype} but value is {value.dtype}; "
                "cast all three floating-point inputs to one dtype"
            )
    if len({tensor.device for tensor in named.values()}) > 1:
        listing = ", ".join(f"{name} on {tensor.device}" for name, tensor in named.items())
        raise ValueError(f"ms_deform_attn: all inputs must be on one device, got {listing}")
    if total_tokens != layout.num_tokens:
        raise _shape_error(
            f"value has S={total_tokens} tokens but spatial_shapes {list(layout.shapes)} add up "
            f"to sum(H*W)={layout.num_tokens}; S must be the flattened size of all levels"
        )
    return layout


# --------------------------------------------------------------------------- the extension
def _load_extension():
    """The compiled op library, or None when it is missing or predates this op."""
    try:
        from instalign_d2 import _C  # noqa: PLC0415  (optional: the package runs without it)
    except ImportError:
        return None
    return _C if hasattr(_C, "ms_deform_attn_forward") else None


_EXTENSION = _load_extension()
_warned_fallback = False


def msda_extension_info() -> str:
    """Which kernels the installed extension has: "cpu", "cpu+cuda", or "missing"."""
    return _EXTENSION.build_info() if _EXTENSION is not None else "missing"


def _extension_has_cuda() -> bool:
    return _EXTENSION is not None and "cuda" in _EXTENSION.build_info()


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"ms_deform_attn: {reason}; using the slow PyTorch reference instead. To get the kernels, "
            f"{BUILD_HINT} (FORCE_CUDA=1 for the CUDA kernels on a machine without a visible GPU).",
            RuntimeWarning,
            stacklevel=3,
        )


def _resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation that will run for value's ``device`` and ``dtype``: "cuda", "cpu" or
    "pytorch".  Whichever way it was picked ("auto" included), the choice is then checked
    against what that implementation supports, so an unsupported dtype gets our message rather
    than a dispatch error from inside the extension."""
    if impl not in IMPLS:
        raise ValueError(f"ms_deform_attn: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        override = os.environ.get(IMPL_ENV_VAR, "").strip()
        if override:
            if override not in IMPLS:
                raise ValueError(
                    f"ms_deform_attn: environment variable {IMPL_ENV_VAR}={override!r} must be one of {IMPLS}"
                )
            impl = override
    if impl == "auto":
        if device.type == "cuda":
            if _extension_has_cuda():
                impl = "cuda"
            else:
                _warn_fallback_once(
                    f"instalign_d2._C has no CUDA kernels (build: {msda_extension_info()})"
                )
                impl = "pytorch"
        elif device.type == "cpu" and dtype in _CPU_KERNEL_DTYPES:
            if _EXTENSION is not None:
                impl = "cpu"
            else:
                _warn_fallback_once(
                    "the compiled extension instalign_d2._C is missing or has no ms_deform_attn op"
                )
                impl = "pytorch"
        else:
            # Other devices and CPU half precision: only the reference handles them.
            impl = "pytorch"

    if impl == "cuda":
        if device.type != "cuda":
            raise ValueError(
                f"ms_deform_attn: impl='cuda' needs CUDA tensors, got value on {device}"
            )
        if not _extension_has_cuda():
            raise RuntimeError(
                f"ms_deform_attn: impl='cuda' but instalign_d2._C was built without CUDA kernels "
                f"(build: {msda_extension_info()}); rebuild with FORCE_CUDA=1 where nvcc is installed: {BUILD_HINT}"
            )
        if dtype not in _CUDA_KERNEL_DTYPES:
            raise TypeError(
                f"ms_deform_attn: the CUDA kernel supports {', '.join(map(str, _CUDA_KERNEL_DTYPES))}, "
                f"got {dtype}; cast the inputs"
            )
    elif impl == "cpu":
        if device.type != "cpu":
            raise ValueError(f"ms_deform_attn: impl='cpu' needs CPU tensors, got value on {device}")
        if _EXTENSION is None:
            raise RuntimeError(
                f"ms_deform_attn: impl='cpu' but the compiled extension instalign_d2._C is missing; {BUILD_HINT}"
            )
        if dtype not in _CPU_KERNEL_DTYPES:
            raise TypeError(
                f"ms_deform_attn: the C++ kernel supports float32 and float64, got {dtype}; "
                "cast the inputs or use impl='pytorch'"
            )
    return impl


class _MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled forward and backward (CPU or CUDA, by device)."""

    @staticmethod
    def forward(
        ctx,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        im2col_step,
    ):
        ctx.im2col_step = im2col_step
        # The backward takes the forward's inputs, in the same order, then the output's gradient.
        inputs = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.save_for_backward(*inputs)
        return _EXTENSION.ms_deform_attn_forward(*inputs, im2col_step)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        grad_value, grad_locations, grad_weights = _EXTENSION.ms_deform_attn_backward(
            *ctx.saved_tensors, grad_output.contiguous(), ctx.im2col_step
        )
        return grad_value, None, None, grad_locations, grad_weights, None


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: LevelShapes,
    level_start_index,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    im2col_step: int = 64,
    impl: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention, (B, Lq, heads*C_h); shapes in the module docstring.

    ``spatial_shapes``: an int64 (levels, 2) tensor, python (H, W) pairs or a LevelLayout;
    ``level_start_index``: the matching tensor, python ints, or None (see :func:`level_layout`).
    ``impl``: "auto" (CUDA kernel for CUDA tensors, C++ kernel for CPU tensors, the reference
    when the extension lacks them -- with one warning), "cuda", "cpu" or "pytorch".  The
    environment variable ``INSTALIGN_MSDA_IMPL`` overrides "auto".  ``im2col_step`` caps how
    many images one CUDA launch covers (any batch size works); the CPU kernel ignores it.
    """
    layout = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if int(im2col_step) < 1:
        raise ValueError(f"ms_deform_attn: im2col_step must be >= 1, got {im2col_step}")
    chosen = _resolve_impl(impl, value.device, value.dtype)
    if chosen == "pytorch":
        return ms_deform_attn_pytorch(
            value, layout, layout.level_start_index, sampling_locations, attention_weights
        )
    # The level tables go to the extension as the layout's CPU tensors: it reads them on the
    # host and hands the numbers to the kernels as arguments, so nothing waits for the GPU.
    return _MSDeformAttnFunction.apply(
        value.contiguous(),
        layout.spatial_shapes,
        layout.level_start_index,
        sampling_locations.contiguous(),
        attention_weights.contiguous(),
        int(im2col_step),
    )


# --------------------------------------------------------------------------- the layer
class MSDeformAttn(nn.Module):
    """Deformable DETR's multi-scale deformable attention layer.

    Each query predicts, per head, level and point, an offset from its reference point and an
    attention weight (softmax over levels x points), and reads the value maps there.
    """

    @configurable
    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        impl: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(
                f"MSDeformAttn: d_model={d_model} must be divisible by n_heads={n_heads}"
            )
        if impl not in IMPLS:
            raise ValueError(f"MSDeformAttn: impl must be one of {IMPLS}, got {impl!r}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.impl = impl
        # Deformable DETR's batching step for its CUDA kernel; ours accepts any batch.
        self.im2col_step = 64
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "d_model": head.CONVS_DIM,
            "n_levels": len(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "n_heads": head.NHEADS,
            "n_points": head.NPOINTS,
            "impl": head.MSDA_IMPL,
        }

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: every head starts looking in its own direction
        (angles 2*pi*m/heads, scaled so the larger of |x|, |y| is 1), point k of a head k+1
        pixels out, the same on every level; uniform attention; Xavier projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float64) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distance = torch.arange(1, self.n_points + 1, dtype=torch.float64).view(1, 1, -1, 1)
        offsets = directions.view(self.n_heads, 1, 1, 2) * distance
        offsets = offsets.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(
                offsets.reshape(-1).to(self.sampling_offsets.bias.dtype)
            )
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: LevelShapes,
        input_level_start_index=None,
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """query (B, Lq, C); reference_points (B, Lq, n_levels, 2) normalised (x, y) in [0, 1];
        input_flatten (B, S, C); input_spatial_shapes the n_levels (H, W) -- a LevelLayout,
        python pairs or an int64 (n_levels, 2) tensor; input_level_start_index None or the
        matching starts; input_padding_mask (B, S) bool, True = padding, or None.
        Returns (B, Lq, C).

        The op checks value, locations, weights and levels against each other; this checks only
        what the op never sees (query, reference_points, the mask, the layer's sizes)."""
        layout = level_layout(
            input_spatial_shapes, input_level_start_index, device=input_flatten.device
        )
        if (
            query.dim() != 3
            or input_flatten.dim() != 3
            or query.shape[-1] != self.d_model
            or input_flatten.shape[-1] != self.d_model
        ):
            raise ValueError(
                f"MSDeformAttn: query and input_flatten must be (B, Lq, {self.d_model}) and "
                f"(B, S, {self.d_model}), got {tuple(query.shape)} and {tuple(input_flatten.shape)}"
            )
        batch, num_queries, _ = query.shape
        if layout.num_levels != self.n_levels:
            raise ValueError(
                f"MSDeformAttn: built for n_levels={self.n_levels}, got {layout.num_levels} "
                f"spatial shapes {list(layout.shapes)}"
            )
        if tuple(reference_points.shape) != (batch, num_queries, self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: reference_points must be (B, Lq, n_levels, 2) = "
                f"{(batch, num_queries, self.n_levels, 2)}, got {tuple(reference_points.shape)}"
            )
        head_dim = self.d_model // self.n_heads

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if (
                input_padding_mask.shape != input_flatten.shape[:2]
                or input_padding_mask.dtype != torch.bool
            ):
                raise ValueError(
                    f"MSDeformAttn: input_padding_mask must be bool (B, S) = "
                    f"{tuple(input_flatten.shape[:2])}, got {input_padding_mask.dtype} "
                    f"{tuple(input_padding_mask.shape)}"
                )
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(*input_flatten.shape[:2], self.n_heads, head_dim)

        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(
            batch, num_queries, self.n_heads, self.n_levels * self.n_points
        )
        weights = weights.softmax(-1).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points
        )
        # Offsets are in pixels of each level; (W, H) turns them into normalised (x, y).
        level_sizes_xy = layout.sizes_xy(offsets.device).to(offsets.dtype)
        locations = (
            reference_points[:, :, None, :, None, :]
            + offsets / level_sizes_xy[None, None, None, :, None, :]
        )
        # Under autocast (or with float64 reference points) the three can differ in dtype; the
        # op wants one, and the widest keeps the locations' precision.
        common = torch.promote_types(
            torch.promote_types(value.dtype, locations.dtype), weights.dtype
        )
        output = ms_deform_attn(
            value.to(common),
            layout,
            None,
            locations.to(common),
            weights.to(common),
            self.im2col_step,
            self.impl,
        )
        return self.output_proj(output.to(value.dtype))
