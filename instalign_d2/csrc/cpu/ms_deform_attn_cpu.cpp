// C++ kernels of multi-scale deformable attention for the CPU (float and double).
//
// Forward: each output row (b, q) is independent, so threads split the rows.  Every sample is
// a few axpy's over the contiguous C_h channels of one (token, head) of value.
//
// Backward: grad_value receives a scatter from every query, and two queries can hit the same
// pixel.  Instead of atomics or per-thread copies of grad_value, threads split the work by
// (batch, head, channel block): each task owns the slice grad_value[b, :, h, c0:c1] outright,
// so no two threads ever write the same element and no extra buffer the size of value is
// needed.  Channel blocks only exist to give every thread work when batch*heads is small; their
// partial sums over channels (for the location and weight gradients) are added at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

#include "ms_deform_attn.h"

namespace instalign_d2 {
namespace {

// y += a * x over n contiguous elements.
template <typename T>
inline void axpy(T* __restrict__ y, const T* __restrict__ x, T a, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

// grad_value_row += a * grad_row, and returns dot(grad_row, value_row): the two things the
// backward needs of one corner, in one pass over the channels.
template <typename T>
inline T scatter_and_dot(T* __restrict__ grad_value_row, const T* __restrict__ value_row,
                         const T* __restrict__ grad_row, T a, int64_t n) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t i = 0; i < n; ++i) {
    grad_value_row[i] += a * grad_row[i];
    dot += grad_row[i] * value_row[i];
  }
  return dot;
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const scalar_t* locations, const scalar_t* weights, scalar_t* output,
                    const MSDASizes& sz, const MSDALevels& levels) {
  const int64_t row_stride = sz.heads * sz.channels;  // between consecutive tokens of value
  const int64_t samples_per_head = sz.levels * sz.points;
  // About 50k multiply-adds per row at the pixel decoder's sizes: a few rows per task suffice.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, sz.heads * samples_per_head * 4));
  at::parallel_for(0, sz.batch * sz.queries, grain, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> corners;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / sz.queries;
      for (int64_t h = 0; h < sz.heads; ++h) {
        const int64_t sample_base = (row * sz.heads + h) * samples_per_head;
        scalar_t* out = output + (row * sz.heads + h) * sz.channels;
        for (int64_t level = 0; level < sz.levels; ++level) {
          const int64_t height = levels.height[level];
          const int64_t width = levels.width[level];
          const scalar_t* level_value = value + ((b * sz.tokens + levels.start[level]) * sz.heads + h) * sz.channels;
          for (int64_t p = 0; p < sz.points; ++p) {
            const int64_t sample = sample_base + level * sz.points + p;
            if (!bilinear_corners<scalar_t>(locations[2 * sample], locations[2 * sample + 1], height, width,
                                            corners)) {
              continue;
            }
            const scalar_t weight = weights[sample];
            for (int k = 0; k < 4; ++k) {
              if (corners.token[k] >= 0) {
                axpy(out, level_value + corners.token[k] * row_stride, weight * corners.weight[k], sz.channels);
              }
            }
          }
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const scalar_t* locations, const scalar_t* weights,
                     const scalar_t* grad_output, scalar_t* grad_value, scalar_t* grad_location_parts,
                     scalar_t* grad_weight_parts, int64_t channel_block, int64_t num_blocks, const MSDASizes& sz,
                     const MSDALevels& levels) {
  const int64_t row_stride = sz.heads * sz.channels;
  const int64_t samples_per_head = sz.levels * sz.points;
  const int64_t num_samples = sz.batch * sz.queries * sz.heads * samples_per_head;  // per channel block
  at::parallel_for(0, sz.batch * sz.heads * num_blocks, 1, [&](int64_t begin, int64_t end) {
    BilinearCorners<scalar_t> corners;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t block = task % num_blocks;
      const int64_t h = (task / num_blocks) % sz.heads;
      const int64_t b = task / (num_blocks * sz.heads);
      const int64_t c0 = block * channel_block;
      const int64_t width_c = std::min(channel_block, sz.channels - c0);
      scalar_t* grad_location = grad_location_parts + block * num_samples * 2;
      scalar_t* grad_weight = grad_weight_parts + block * num_samples;
      for (int64_t q = 0; q < sz.queries; ++q) {
        const int64_t row = b * sz.queries + q;
        const int64_t sample_base = (row * sz.heads + h) * samples_per_head;
        const scalar_t* grad_row = grad_output + (row * sz.heads + h) * sz.channels + c0;
        for (int64_t level = 0; level < sz.levels; ++level) {
          const int64_t height = levels.height[level];
          const int64_t width = levels.width[level];
          const int64_t level_offset = ((b * sz.tokens + levels.start[level]) * sz.heads + h) * sz.channels + c0;
          const scalar_t* level_value = value + level_offset;
          scalar_t* level_grad_value = grad_value + level_offset;
          for (int64_t p = 0; p < sz.points; ++p) {
            const int64_t sample = sample_base + level * sz.points + p;
            scalar_t grad_w = 0, sum_dx = 0, sum_dy = 0;
            const scalar_t weight = weights[sample];
            const bool inside =
                bilinear_corners<scalar_t>(locations[2 * sample], locations[2 * sample + 1], height, width, corners);
            if (inside) {
              for (int k = 0; k < 4; ++k) {
                if (corners.token[k] < 0) {
                  continue;
                }
                const int64_t offset = corners.token[k] * row_stride;
                // dot = <grad_output, value at this corner>: the sample's value is
                // sum_k w_k * v_k, so d/dw_k of <grad, out> is weight * dot.
                const scalar_t dot = scatter_and_dot(level_grad_value + offset, level_value + offset, grad_row,
                                                     weight * corners.weight[k], width_c);
                grad_w += corners.weight[k] * dot;
                sum_dx += corners.dweight_dx[k] * dot;
                sum_dy += corners.dweight_dy[k] * dot;
              }
            }
            scalar_t grad_px, grad_py;
            location_gradient<scalar_t>(inside, weight, sum_dx, sum_dy, height, width, grad_px, grad_py);
            grad_weight[sample] = grad_w;
            grad_location[2 * sample] = grad_px;
            grad_location[2 * sample + 1] = grad_py;
          }
        }
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& value) {
  TORCH_CHECK(value.scalar_type() == at::kFloat || value.scalar_type() == at::kDouble,
              "ms_deform_attn: the C++ CPU kernel supports float32 and float64, got ", value.scalar_type(),
              "; cast the inputs or use impl='pytorch'");
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights, const MSDASizes& sizes,
                                      const MSDALevels& levels) {
  check_cpu_dtype(value);
  at::Tensor output = at::zeros({sizes.batch, sizes.queries, sizes.heads * sizes.channels}, value.options());
  if (output.numel() == 0) {
    return output;
  }
  AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                             attention_weights.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), sizes, levels);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
    const at::Tensor& grad_output, const MSDASizes& sizes, const MSDALevels& levels) {
  check_cpu_dtype(value);
  // Enough tasks for every thread (twice over, for balance), in channel blocks of >= 8 so the
  // inner loops stay vectorised.
  const int64_t threads = at::get_num_threads();
  int64_t num_blocks = 1;
  while (sizes.batch * sizes.heads * num_blocks < 2 * threads && sizes.channels / (2 * num_blocks) >= 8) {
    num_blocks *= 2;
  }
  const int64_t channel_block = sizes.channels > 0 ? (sizes.channels + num_blocks - 1) / num_blocks : 1;
  num_blocks = sizes.channels > 0 ? (sizes.channels + channel_block - 1) / channel_block : 1;

  at::Tensor grad_value = at::zeros_like(value);
  std::vector<int64_t> location_parts_shape{num_blocks};
  for (int64_t d : sampling_locations.sizes()) location_parts_shape.push_back(d);
  std::vector<int64_t> weight_parts_shape{num_blocks};
  for (int64_t d : attention_weights.sizes()) weight_parts_shape.push_back(d);
  at::Tensor grad_location_parts = at::empty(location_parts_shape, value.options());
  at::Tensor grad_weight_parts = at::empty(weight_parts_shape, value.options());
  if (sampling_locations.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
      backward_kernel<scalar_t>(value.data_ptr<scalar_t>(), sampling_locations.data_ptr<scalar_t>(),
                                attention_weights.data_ptr<scalar_t>(), grad_output.data_ptr<scalar_t>(),
                                grad_value.data_ptr<scalar_t>(), grad_location_parts.data_ptr<scalar_t>(),
                                grad_weight_parts.data_ptr<scalar_t>(), channel_block, num_blocks, sizes, levels);
    });
  } else {
    grad_location_parts.zero_();
    grad_weight_parts.zero_();
  }
  if (num_blocks == 1) {
    return {grad_value, grad_location_parts[0], grad_weight_parts[0]};
  }
  return {grad_value, grad_location_parts.sum(0), grad_weight_parts.sum(0)};
}

}  // namespace instalign_d2
