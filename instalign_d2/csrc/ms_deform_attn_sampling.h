// Bilinear sampling arithmetic shared by the C++ and CUDA kernels of multi-scale deformable
// attention, so both read a value map in exactly the same way.
//
// Convention (grid_sample's align_corners=False with zero padding): a normalised location
// (x, y) in [0, 1] falls on pixel (x * W - 0.5, y * H - 0.5); the four surrounding pixels are
// weighted bilinearly, and pixels outside the map count as zeros.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace instalign_d2 {

// Sizes of one call: value (batch, tokens, heads, channels); locations
// (batch, queries, heads, levels, points, 2).
struct MSDASizes {
  int64_t batch;
  int64_t tokens;
  int64_t heads;
  int64_t channels;
  int64_t queries;
  int64_t levels;
  int64_t points;
};

// Most levels one call may have.  The levels travel to the kernels by value (kernel arguments
// on the GPU), so a kernel never reads spatial_shapes or level_start_index from memory: the
// entry checks them once on the host, and what it checked is exactly what the kernels use.
constexpr int64_t kMaxLevels = 16;

// (height, width) and first token of each level, for `MSDASizes::levels` levels.
struct MSDALevels {
  int64_t height[kMaxLevels];
  int64_t width[kMaxLevels];
  int64_t start[kMaxLevels];
};

// The four pixels around one sampling location, in the order (y0, x0), (y0, x1), (y1, x0),
// (y1, x1).  For each: its token index inside the level (-1 when outside the map), its
// bilinear weight, and that weight's derivative with respect to the pixel coordinates x and y.
template <typename acc_t>
struct BilinearCorners {
  int64_t token[4];
  acc_t weight[4];
  acc_t dweight_dx[4];
  acc_t dweight_dy[4];
};

// Fills `corners` for the location (loc_x, loc_y) on a height x width map.  Returns false when
// no corner is inside the map (the sample is zero and so are its gradients); NaN locations
// also land here.
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_corners(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                       BilinearCorners<acc_t>& corners) {
  const acc_t px = loc_x * static_cast<acc_t>(width) - acc_t(0.5);
  const acc_t py = loc_y * static_cast<acc_t>(height) - acc_t(0.5);
  // Written so that NaN fails it.  Beyond this box all four pixels are outside.
  if (!(px > acc_t(-1) && py > acc_t(-1) && px < static_cast<acc_t>(width) && py < static_cast<acc_t>(height))) {
    return false;
  }
  // px + 1 > 0 here, so truncation is floor (and no math library is needed on either side).
  const int64_t x0 = static_cast<int64_t>(px + acc_t(1)) - 1;
  const int64_t y0 = static_cast<int64_t>(py + acc_t(1)) - 1;
  const acc_t lx = px - static_cast<acc_t>(x0);  // distance from the left column, in [0, 1)
  const acc_t ly = py - static_cast<acc_t>(y0);  // distance from the top row
  const acc_t hx = acc_t(1) - lx;
  const acc_t hy = acc_t(1) - ly;

  const bool left_in = x0 >= 0;
  const bool right_in = x0 + 1 < width;
  const bool top_in = y0 >= 0;
  const bool bottom_in = y0 + 1 < height;

  corners.token[0] = (top_in && left_in) ? y0 * width + x0 : -1;
  corners.token[1] = (top_in && right_in) ? y0 * width + x0 + 1 : -1;
  corners.token[2] = (bottom_in && left_in) ? (y0 + 1) * width + x0 : -1;
  corners.token[3] = (bottom_in && right_in) ? (y0 + 1) * width + x0 + 1 : -1;

  corners.weight[0] = hy * hx;
  corners.weight[1] = hy * lx;
  corners.weight[2] = ly * hx;
  corners.weight[3] = ly * lx;

  corners.dweight_dx[0] = -hy;
  corners.dweight_dx[1] = hy;
  corners.dweight_dx[2] = -ly;
  corners.dweight_dx[3] = ly;

  corners.dweight_dy[0] = -hx;
  corners.dweight_dy[1] = -lx;
  corners.dweight_dy[2] = hx;
  corners.dweight_dy[3] = lx;
  return true;
}

// Gradient of the output with respect to one sample's normalised location, from its attention
// weight and the sums over its corners of dweight_dx * dot and dweight_dy * dot (dot = <grad
// of the output, the corner's value>).  pixel = loc * size - 0.5, so d pixel / d loc = size.
// A sample with no corner inside the map has no gradient, whatever its weight: multiplying the
// zero sums by an infinite or NaN weight would give NaN, where grid_sample (the reference)
// gives 0.
template <typename acc_t>
MSDA_HOST_DEVICE void location_gradient(bool inside, acc_t weight, acc_t sum_dx, acc_t sum_dy, int64_t height,
                                        int64_t width, acc_t& grad_x, acc_t& grad_y) {
  if (!inside) {
    grad_x = acc_t(0);
    grad_y = acc_t(0);
    return;
  }
  grad_x = weight * sum_dx * static_cast<acc_t>(width);
  grad_y = weight * sum_dy * static_cast<acc_t>(height);
}

}  // namespace instalign_d2
