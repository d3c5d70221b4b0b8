"""Build instalign_d2's compiled op library ``instalign_d2._C`` (metadata: pyproject.toml).

The C++ (CPU) kernels are always built.  The CUDA kernels are added when torch sees a GPU or
``FORCE_CUDA=1`` is set, and nvcc is found (``CUDA_HOME``).  ``TORCH_CUDA_ARCH_LIST`` picks the
GPU architectures, as for every torch extension.

Install with ``pip install --no-build-isolation -e .``: an isolated build would fetch its own torch.
"""

import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - only hit by a wrong install command
    raise SystemExit(
        "instalign_d2: torch must be installed before building this package. "
        "Install torch first, then run `pip install --no-build-isolation -e .`."
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("instalign_d2", "csrc")


def want_cuda() -> bool:
    """CUDA kernels are built when a GPU is visible or FORCE_CUDA=1, and nvcc is there."""
    requested = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    if requested and CUDA_HOME is None:
        print("instalign_d2: CUDA build requested but CUDA_HOME/nvcc not found; building CPU only.")
    return requested and CUDA_HOME is not None


def get_extensions():
    sources = sorted(
        glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp"))
    )
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    # torch adds the C++ standard it needs (C++20 for torch 2.14); do not pin one here.
    extra_compile_args = {"cxx": ["-O3"]}
    define_macros = []
    extension = CppExtension
    if want_cuda() and cuda_sources:
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            "-O3",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
    # at::parallel_for needs OpenMP to use more than one thread in the CPU kernels.
    if os.name != "nt":
        extra_compile_args["cxx"].append("-fopenmp")
    return [
        extension(
            "instalign_d2._C",
            sources,
            include_dirs=[os.path.join(HERE, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"] if os.name != "nt" else [],
        )
    ]


setup(
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
