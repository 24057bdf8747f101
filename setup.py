"""Builds decaf_ext and its compiled operator library decaf_ext._C.

CUDA kernels are compiled when nvcc and a CUDA-enabled torch are present. Environment switches:
  DECAF_FORCE_CUDA=1   compile the CUDA kernels, fail if that is impossible
  DECAF_NO_CUDA=1      CPU-only build
  TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" when no GPU is visible
  CUDA_HOME            defaults to /usr/local/cuda when that folder exists
"""
import glob
import os
import sys

from setuptools import find_packages, setup

if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    force = os.environ.get("DECAF_FORCE_CUDA", "0") == "1"
    if os.environ.get("DECAF_NO_CUDA", "0") == "1":
        if force:
            raise RuntimeError("DECAF_FORCE_CUDA and DECAF_NO_CUDA are both set")
        return False
    available = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if force and not available:
        raise RuntimeError(
            "DECAF_FORCE_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}")
    return available


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # ATen's at::parallel_for is a header template that splits work with `#pragma omp parallel`: without
    # -fopenmp in this extension's own compile it silently runs every loop on one thread. The OpenMP
    # runtime is torch's (libgomp.so.1, already loaded with torch).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    extra = {"cxx": cxx}
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        # The CUDA backend: its kernels (.cu, nvcc) and its plain C++ on ATen (.cpp).
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))
                          + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        extra["cxx"] = cxx + ["-DDECAF_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-DDECAF_WITH_CUDA", "--expt-relaxed-constexpr"]
        builder = cpp_extension.CUDAExtension
    else:
        builder = cpp_extension.CppExtension
    return builder("decaf_ext._C", sources, extra_compile_args=extra, extra_link_args=openmp, py_limited_api=False)


setup(
    name="decaf_ext",
    version="0.1.0",
    description="Decentralized LoRA fine-tuning with DeCAF: fused consensus + truncated SVD kernels",
    packages=find_packages(include=["decaf_ext", "decaf_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "transformers", "peft", "datasets", "pyyaml", "tqdm", "matplotlib",
                      "safetensors", "networkx", "cryptography"],
    extras_require={"test": ["pytest", "tensorboard", "scipy", "opacus>=1.6", "opt-einsum"],
                    "tensorboard": ["tensorboard"], "privacy": ["opacus>=1.6", "opt-einsum"]},
    entry_points={"console_scripts": ["decaf-train = decaf_ext.cli:main"]},
)
