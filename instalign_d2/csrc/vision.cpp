// Python bindings of instalign_d2._C.  The op sources register their functions here.
#include <torch/extension.h>

#include "ms_deform_attn.h"

namespace instalign_d2 {

// Which kernels this build carries: "cpu" or "cpu+cuda".
std::string build_info() {
#ifdef WITH_CUDA
  return "cpu+cuda";
#else
  return "cpu";
#endif
}

}  // namespace instalign_d2

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &instalign_d2::build_info, "which kernels this build of instalign_d2._C carries");
  m.def("ms_deform_attn_forward", &instalign_d2::ms_deform_attn_forward,
        "multi-scale deformable attention forward (CPU or CUDA by device)", py::arg("value"),
        py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("im2col_step"));
  m.def("ms_deform_attn_backward", &instalign_d2::ms_deform_attn_backward,
        "multi-scale deformable attention backward: (grad_value, grad_sampling_locations, grad_attention_weights)",
        py::arg("value"), py::arg("spatial_shapes"), py::arg("level_start_index"), py::arg("sampling_locations"),
        py::arg("attention_weights"), py::arg("grad_output"), py::arg("im2col_step"));
  m.attr("MSDA_MAX_LEVELS") = instalign_d2::kMaxLevels;
  m.attr("MSDA_CUDA_ITEMS_PER_PASS") = instalign_d2::kCudaItemsPerPass;
#ifdef WITH_CUDA
  m.def("ms_deform_attn_cuda_kernel_version", &instalign_d2::ms_deform_attn_cuda_kernel_version,
        "(binaryVersion, ptxVersion) of the CUDA kernels' image for a device, e.g. (90, 90) for sm_90; "
        "(-1, -1) when this build has no image that device can run",
        py::arg("device"));
#endif
}
