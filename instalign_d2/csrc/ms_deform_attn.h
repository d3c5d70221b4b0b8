// Multi-scale deformable attention: the entry points bound into instalign_d2._C, and the
// per-device kernels they route to.  Shapes as in instalign_d2/layers/ms_deform_attn.py.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "ms_deform_attn_sampling.h"

namespace instalign_d2 {

// Launch geometry of the CUDA kernels: one warp per (batch, query, head) item, at most
// kCudaMaxBlocks blocks per launch; beyond kCudaItemsPerPass items a warp loops (grid stride).
// Here rather than in the .cu file so that a CPU build can still tell a GPU check which sizes
// exercise the loop.
constexpr int kCudaWarpSize = 32;
constexpr int kCudaThreadsPerBlock = 256;
constexpr int kCudaWarpsPerBlock = kCudaThreadsPerBlock / kCudaWarpSize;
constexpr int64_t kCudaMaxBlocks = 65535;
constexpr int64_t kCudaItemsPerPass = kCudaMaxBlocks * kCudaWarpsPerBlock;

// (B, Lq, heads * channels).  Checks the inputs (spatial_shapes and level_start_index against
// value, for every device), then runs the CPU or CUDA kernel by value's device.
// spatial_shapes and level_start_index may be on the CPU or on value's device; on the GPU they
// are copied back to be checked, which waits for the device, so callers on the hot path pass
// CPU tensors.
at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights, int64_t im2col_step);

// Gradients with respect to (value, sampling_locations, attention_weights).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    int64_t im2col_step);

// The kernels take contiguous tensors and levels the entry has checked against value.
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const MSDASizes& sizes,
                                      const MSDALevels& levels);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, const MSDASizes& sizes, const MSDALevels& levels);

#ifdef WITH_CUDA
at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, const MSDASizes& sizes,
                                       const MSDALevels& levels, int64_t im2col_step);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, const MSDASizes& sizes, const MSDALevels& levels, int64_t im2col_step);

// (binaryVersion, ptxVersion) of the forward kernel's image for CUDA device `device`, as
// cudaFuncGetAttributes reports them (e.g. 90 for sm_90), or (-1, -1) when this build carries
// no image that device can run (built for other architectures).
std::tuple<int64_t, int64_t> ms_deform_attn_cuda_kernel_version(int64_t device);
#endif

}  // namespace instalign_d2
