"""Builds fastattn and its extension fastattn._C.

CPU kernels are always built; CUDA kernels when torch has CUDA and nvcc is found, unless
FASTATTN_SKIP_CUDA=1. TORCH_CUDA_ARCH_LIST picks the architectures; MAX_JOBS defaults to what the
cores and memory allow. Without a C++ compiler the package installs without the extension (it
still runs on its Triton and reference backends) and says so.

    pip install --no-build-isolation -e .
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _default_max_jobs() -> int:
    """One compile job per core, at most one per 3 GiB of memory (nvcc and torch headers are big)."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    return max(1, min(os.cpu_count() or 1, int(mem_gib // 3)))


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        sys.exit("fastattn: install torch first, then `pip install --no-build-isolation -e .`")

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        print(
            f"fastattn: WARNING: no C++ compiler ({compiler!r} not found); building without the "
            "extension fastattn._C. The triton and reference backends still work; install a "
            "compiler and reinstall for the cpu/cuda backends.",
            file=sys.stderr,
        )
        return [], {}
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math / -fno-math-errno (as torch itself builds) let GCC vectorise the CPU kernels'
    # row loops (selects, min/max); csrc/cpu/vecmath.cpp clones them for AVX2+FMA at run time.
    cxx_flags = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    skip_cuda = os.environ.get("FASTATTN_SKIP_CUDA", "0") == "1"
    with_cuda = not skip_cuda and torch.version.cuda is not None and CUDA_HOME is not None
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc_flags = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        ext = CUDAExtension(
            "fastattn._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DFASTATTN_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        if not skip_cuda and torch.version.cuda is not None:
            print("fastattn: nvcc not found (CUDA_HOME unset); building the CPU kernels only", file=sys.stderr)
        ext = CppExtension("fastattn._C", sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
