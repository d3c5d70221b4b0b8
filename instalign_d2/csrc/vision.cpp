// Python bindings of instalign_d2._C.  The op sources register their functions here.
#include <torch/extension.h>

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
}
