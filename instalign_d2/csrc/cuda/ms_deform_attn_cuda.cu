// CUDA kernels of multi-scale deformable attention (float, double, half, bfloat16).
//
// One warp per (batch, query, head): its lanes walk the head's channels, so every read of a
// value row and every write of an output row is one coalesced access.  The warp computes a
// sample's bilinear corners once per lane (cheap arithmetic, no divergence) and loops over
// levels and points.
//
// Backward: the location and attention-weight gradients are sums over channels, reduced across
// the warp with shuffles; only lane 0 writes them, so they need no atomics.  The value
// gradient is a scatter (queries share pixels), done with atomic adds into a buffer in the
// math type (float for half/bfloat16, so many small contributions do not round away), cast to
// the input dtype at the end.  Those float atomics add in whatever order the warps reach them,
// so the value gradient is not bitwise reproducible: the backward says so to
// torch.use_deterministic_algorithms, as PyTorch's own scatter-add kernels do.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "ms_deform_attn.h"

namespace instalign_d2 {
namespace {

constexpr int kWarpSize = kCudaWarpSize;
constexpr int kThreadsPerBlock = kCudaThreadsPerBlock;
constexpr int kWarpsPerBlock = kCudaWarpsPerBlock;
constexpr int64_t kMaxBlocks = kCudaMaxBlocks;

template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_down_sync(0xffffffffu, value, offset);
  }
  return value;  // complete in lane 0
}

// `batch` images starting at `batch_offset` (the launch covers at most im2col_step of them).
// The levels come by value, as kernel arguments (see MSDALevels).
template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ locations,
                               const scalar_t* __restrict__ weights, scalar_t* __restrict__ output, MSDASizes sz,
                               MSDALevels levels, int64_t batch_offset, int64_t batch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_items = batch * sz.queries * sz.heads;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t row_stride = sz.heads * sz.channels;
  const int64_t samples_per_head = sz.levels * sz.points;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; item < num_items;
       item += warp_stride) {
    // item enumerates (b, q, h) of this launch; shift b to the whole tensor.
    const int64_t global_item = item + batch_offset * sz.queries * sz.heads;
    const int64_t h = global_item % sz.heads;
    const int64_t b = global_item / (sz.heads * sz.queries);
    const int64_t sample_base = global_item * samples_per_head;
    for (int64_t c = lane; c < sz.channels; c += kWarpSize) {
      acc_t acc = 0;
      for (int64_t level = 0; level < sz.levels; ++level) {
        const int64_t height = levels.height[level];
        const int64_t width = levels.width[level];
        const scalar_t* level_value = value + ((b * sz.tokens + levels.start[level]) * sz.heads + h) * sz.channels + c;
        for (int64_t p = 0; p < sz.points; ++p) {
          const int64_t sample = sample_base + level * sz.points + p;
          BilinearCorners<acc_t> corners;
          if (!bilinear_corners<acc_t>(static_cast<acc_t>(locations[2 * sample]),
                                       static_cast<acc_t>(locations[2 * sample + 1]), height, width, corners)) {
            continue;
          }
          acc_t sampled = 0;
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (corners.token[k] >= 0) {
              sampled += corners.weight[k] * static_cast<acc_t>(level_value[corners.token[k] * row_stride]);
            }
          }
          acc += static_cast<acc_t>(weights[sample]) * sampled;
        }
      }
      output[global_item * sz.channels + c] = static_cast<scalar_t>(acc);
    }
  }
}

template <typename scalar_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const scalar_t* __restrict__ locations,
                                const scalar_t* __restrict__ weights, const scalar_t* __restrict__ grad_output,
                                at::opmath_type<scalar_t>* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights,
                                MSDASizes sz, MSDALevels levels, int64_t batch_offset, int64_t batch) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t num_items = batch * sz.queries * sz.heads;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t row_stride = sz.heads * sz.channels;
  const int64_t samples_per_head = sz.levels * sz.points;
  // The item loop is the same for all lanes of a warp, so every lane reaches each warp_sum.
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize; item < num_items;
       item += warp_stride) {
    const int64_t global_item = item + batch_offset * sz.queries * sz.heads;
    const int64_t h = global_item % sz.heads;
    const int64_t b = global_item / (sz.heads * sz.queries);
    const int64_t sample_base = global_item * samples_per_head;
    const scalar_t* grad_row = grad_output + global_item * sz.channels;
    for (int64_t level = 0; level < sz.levels; ++level) {
      const int64_t height = levels.height[level];
      const int64_t width = levels.width[level];
      const int64_t level_offset = ((b * sz.tokens + levels.start[level]) * sz.heads + h) * sz.channels;
      for (int64_t p = 0; p < sz.points; ++p) {
        const int64_t sample = sample_base + level * sz.points + p;
        BilinearCorners<acc_t> corners;
        const bool inside = bilinear_corners<acc_t>(static_cast<acc_t>(locations[2 * sample]),
                                                    static_cast<acc_t>(locations[2 * sample + 1]), height, width,
                                                    corners);
        const acc_t weight = static_cast<acc_t>(weights[sample]);
        // Per-lane partial sums over this lane's channels.
        acc_t grad_w = 0, sum_dx = 0, sum_dy = 0;
        if (inside) {
          for (int64_t c = lane; c < sz.channels; c += kWarpSize) {
            const acc_t grad = static_cast<acc_t>(grad_row[c]);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              if (corners.token[k] < 0) {
                continue;
              }
              const int64_t index = level_offset + corners.token[k] * row_stride + c;
              const acc_t dot = grad * static_cast<acc_t>(value[index]);
              grad_w += corners.weight[k] * dot;
              sum_dx += corners.dweight_dx[k] * dot;
              sum_dy += corners.dweight_dy[k] * dot;
              gpuAtomicAdd(grad_value + index, weight * corners.weight[k] * grad);
            }
          }
        }
        // `inside` is the same for the whole warp, but reduce unconditionally anyway: it keeps
        // every lane at the shuffles and writes the zero gradients of outside samples.
        grad_w = warp_sum(grad_w);
        sum_dx = warp_sum(sum_dx);
        sum_dy = warp_sum(sum_dy);
        if (lane == 0) {
          acc_t grad_x, grad_y;
          location_gradient<acc_t>(inside, weight, sum_dx, sum_dy, height, width, grad_x, grad_y);
          grad_weights[sample] = static_cast<scalar_t>(grad_w);
          grad_locations[2 * sample] = static_cast<scalar_t>(grad_x);
          grad_locations[2 * sample + 1] = static_cast<scalar_t>(grad_y);
        }
      }
    }
  }
}

int blocks_for(int64_t num_items) {
  const int64_t blocks = (num_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, kMaxBlocks)));
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights, const MSDASizes& sizes,
                                       const MSDALevels& levels, int64_t im2col_step) {
  const c10::cuda::CUDAGuard device_guard(value.device());
  at::Tensor output = at::empty({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  if (sizes.levels == 0 || sizes.points == 0) {
    return output.zero_();
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cuda", [&] {
    for (int64_t first = 0; first < sizes.batch; first += im2col_step) {
      const int64_t batch = std::min(im2col_step, sizes.batch - first);
      forward_kernel<scalar_t><<<blocks_for(batch * sizes.queries * sizes.heads), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
          output.data_ptr<scalar_t>(), sizes, levels, first, batch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, const MSDASizes& sizes, const MSDALevels& levels, int64_t im2col_step) {
  // Raises under torch.use_deterministic_algorithms(True), warns under warn_only=True.
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward_cuda");
  const c10::cuda::CUDAGuard device_guard(value.device());
  const at::ScalarType math_type = at::toOpMathType(value.scalar_type());
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(math_type));
  // Every sample's gradient is written by the kernel, including the zero of outside samples.
  at::Tensor grad_locations = at::empty_like(sampling_locations);
  at::Tensor grad_weights = at::empty_like(attention_weights);
  if (sampling_locations.numel() == 0 || sizes.channels == 0) {
    grad_locations.zero_();
    grad_weights.zero_();
    return {grad_value_acc.to(value.scalar_type()), grad_locations, grad_weights};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t first = 0; first < sizes.batch; first += im2col_step) {
      const int64_t batch = std::min(im2col_step, sizes.batch - first);
      backward_kernel<scalar_t><<<blocks_for(batch * sizes.queries * sizes.heads), kThreadsPerBlock, 0, stream>>>(
          value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(),
          grad_output.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(), grad_locations.data_ptr<scalar_t>(),
          grad_weights.data_ptr<scalar_t>(), sizes, levels, first, batch);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // A no-op for float and double; half and bfloat16 accumulated in float.
  return {grad_value_acc.to(value.scalar_type()), grad_locations, grad_weights};
}

std::tuple<int64_t, int64_t> ms_deform_attn_cuda_kernel_version(int64_t device) {
  TORCH_CHECK(device >= 0 && device < c10::cuda::device_count(), "ms_deform_attn: no CUDA device ", device);
  const c10::cuda::CUDAGuard device_guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, forward_kernel<float>);
  if (status == cudaErrorInvalidDeviceFunction || status == cudaErrorNoKernelImageForDevice) {
    (void)cudaGetLastError();  // clear it, so the next CUDA call does not report it
    return {-1, -1};
  }
  C10_CUDA_CHECK(status);
  return {attributes.binaryVersion, attributes.ptxVersion};
}

}  // namespace instalign_d2
