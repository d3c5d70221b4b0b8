// Device routing and input checks of multi-scale deformable attention.  The Python wrapper
// checks the same things with friendlier messages; these checks hold for any direct call into
// _C, on either device, so that no call reads or writes outside its tensors.
#include "ms_deform_attn.h"

#include <c10/util/Exception.h>

namespace instalign_d2 {
namespace {

MSDASizes check_and_measure(const at::Tensor& value, const at::Tensor& spatial_shapes,
                            const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                            const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (B, S, heads, C_h), got ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6,
              "ms_deform_attn: sampling_locations must be (B, Lq, heads, levels, points, 2), got ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5,
              "ms_deform_attn: attention_weights must be (B, Lq, heads, levels, points), got ",
              attention_weights.sizes());
  MSDASizes sizes{value.size(0),
                  value.size(1),
                  value.size(2),
                  value.size(3),
                  sampling_locations.size(1),
                  sampling_locations.size(3),
                  sampling_locations.size(4)};
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(0) == sizes.levels && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (levels, 2) = (", sizes.levels, ", 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.levels,
              "ms_deform_attn: level_start_index must be (levels,) = (", sizes.levels, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch && sampling_locations.size(2) == sizes.heads &&
                  sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " (expected (B, Lq, heads, levels, points, 2))");
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), "ms_deform_attn: attention_weights ",
              attention_weights.sizes(), " must equal sampling_locations ", sampling_locations.sizes(),
              " without the last dimension");
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "ms_deform_attn: value, sampling_locations and attention_weights must share one dtype, got ",
              value.scalar_type(), ", ", sampling_locations.scalar_type(), ", ", attention_weights.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(sampling_locations.device() == device && attention_weights.device() == device,
              "ms_deform_attn: sampling_locations and attention_weights must be on value's device ", device,
              ", got ", sampling_locations.device(), " and ", attention_weights.device());
  // The level tables are only read on the host (below), so the CPU is always a fine place for them.
  for (const at::Tensor* table : {&spatial_shapes, &level_start_index}) {
    TORCH_CHECK(table->device() == device || table->device().is_cpu(),
                "ms_deform_attn: spatial_shapes and level_start_index must be on the CPU or on value's device ",
                device, ", got ", spatial_shapes.device(), " and ", level_start_index.device());
  }
  return sizes;
}

// The kernels index value with these numbers, so every level must lie inside value's S tokens.
// Read on the host: free for CPU tensors, a copy that waits for the device for GPU ones.
MSDALevels read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                       const MSDASizes& sizes) {
  TORCH_CHECK(sizes.levels <= kMaxLevels, "ms_deform_attn: at most ", kMaxLevels, " levels, got ", sizes.levels);
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  const int64_t* shape_data = shapes.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  MSDALevels levels{};
  for (int64_t level = 0; level < sizes.levels; ++level) {
    const int64_t height = shape_data[2 * level];
    const int64_t width = shape_data[2 * level + 1];
    const int64_t start = start_data[level];
    // height * width <= tokens, written so that huge sizes cannot overflow the product.
    const bool fits = height > 0 && width > 0 && height <= sizes.tokens && width <= sizes.tokens / height &&
                      start >= 0 && start <= sizes.tokens - height * width;
    TORCH_CHECK(fits, "ms_deform_attn: level ", level, " of spatial_shapes (", height, ", ", width,
                ") starting at level_start_index ", start, " does not fit in value's S=", sizes.tokens, " tokens");
    levels.height[level] = height;
    levels.width[level] = width;
    levels.start[level] = start;
  }
  return levels;
}

}  // namespace

at::Tensor ms_deform_attn_forward(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                  const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                  const at::Tensor& attention_weights, int64_t im2col_step) {
  const MSDASizes sizes =
      check_and_measure(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(im2col_step >= 1, "ms_deform_attn: im2col_step must be >= 1, got ", im2col_step);
  const MSDALevels levels = read_levels(spatial_shapes, level_start_index, sizes);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_forward_cuda(value.contiguous(), sampling_locations.contiguous(),
                                       attention_weights.contiguous(), sizes, levels, im2col_step);
#else
    TORCH_CHECK(false, "ms_deform_attn: instalign_d2._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: no kernel for device ", value.device());
  return ms_deform_attn_forward_cpu(value.contiguous(), sampling_locations.contiguous(),
                                    attention_weights.contiguous(), sizes, levels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output,
    int64_t im2col_step) {
  const MSDASizes sizes =
      check_and_measure(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(im2col_step >= 1, "ms_deform_attn: im2col_step must be >= 1, got ", im2col_step);
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == sizes.batch && grad_output.size(1) == sizes.queries &&
                  grad_output.size(2) == sizes.heads * sizes.channels,
              "ms_deform_attn: grad_output must be (B, Lq, heads*C_h) = (", sizes.batch, ", ", sizes.queries, ", ",
              sizes.heads * sizes.channels, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn: grad_output must have value's dtype and device, got ", grad_output.scalar_type(),
              " on ", grad_output.device());
  const MSDALevels levels = read_levels(spatial_shapes, level_start_index, sizes);
  if (value.is_cuda()) {
#ifdef WITH_CUDA
    return ms_deform_attn_backward_cuda(value.contiguous(), sampling_locations.contiguous(),
                                        attention_weights.contiguous(), grad_output.contiguous(), sizes, levels,
                                        im2col_step);
#else
    TORCH_CHECK(false, "ms_deform_attn: instalign_d2._C was built without CUDA; rebuild with FORCE_CUDA=1");
#endif
  }
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn: no kernel for device ", value.device());
  return ms_deform_attn_backward_cpu(value.contiguous(), sampling_locations.contiguous(),
                                     attention_weights.contiguous(), grad_output.contiguous(), sizes, levels);
}

}  // namespace instalign_d2
