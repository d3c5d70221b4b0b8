// Multi-scale deformable attention: the entry points bound into instalign_d2._C, and the
// per-device kernels they route to.  Shapes as in instalign_d2/layers/ms_deform_attn.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ms_deform_attn_sampling.h"

namespace instalign_d2 {

// (B, Lq, heads * channels).  Checks the inputs, then runs the CPU or CUDA kernel by device.
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights, int64_t im2col_step);

// Gradients with respect to (value, sampling_locations, attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    int64_t im2col_step);

// The kernels take contiguous, checked tensors.
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const MSDASizes& sizes);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    const MSDASizes& sizes);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, const MSDASizes& sizes,
                                       int64_t im2col_step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    const MSDASizes& sizes, int64_t im2col_step);
#endif

}  // namespace instalign_d2
