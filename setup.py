"""Build pg_kernels: the C++ CPU extension always, the CUDA extension when it can be built.

The CUDA extension needs a CUDA build of torch (torch.version.cuda set) and a CUDA toolkit
(CUDA_HOME). Whether a GPU is present does not matter: build machines often have none.
Build with `pip install -e . --no-build-isolation` so the extension compiles against the torch
that is installed (an isolated build environment would fetch a different torch).

Environment:
  PG_KERNELS_CPU_CAPABILITY  avx2 | default   vector ISA for the CPU kernels (default: what
                                                this machine supports)
  PG_KERNELS_BUILD_CUDA      0 | 1            force the CUDA extension off / on
  PG_KERNELS_DEBUG_INFO      0 | 1            host code with debug info (-g, e.g. for
                                                `perf annotate` by source line); default -g0:
                                                -g made the kernel sources compile 1.4-1.8x
                                                slower into 22-35x larger objects
  TORCH_CUDA_ARCH_LIST                          default "8.0;9.0"
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def _host_supports_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags and " f16c" in flags


def _cpu_capability_flags() -> list[str]:
    capability = os.environ.get("PG_KERNELS_CPU_CAPABILITY")
    if capability is None:
        capability = "avx2" if _host_supports_avx2() else "default"
    if capability == "avx2":
        # Same flags and macros as ATen's own AVX2 kernels, so at::vec::Vectorized uses AVX2.
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if capability == "default":
        return ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]
    raise ValueError(f"PG_KERNELS_CPU_CAPABILITY must be 'avx2' or 'default', got {capability!r}")


def _cuda_decision() -> tuple[bool, str]:
    forced = os.environ.get("PG_KERNELS_BUILD_CUDA")
    import torch

    if forced == "0":
        return False, "PG_KERNELS_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return (
        True,
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA_HOME={cpp_extension.CUDA_HOME}",
    )


def _headers(*patterns: str) -> list[str]:
    """Headers an extension's sources include: setuptools compares only `sources` + `depends`
    with the built library, so without them a header-only change relinks the old objects."""
    return sorted(f for p in patterns for f in glob.glob(p, recursive=True))


def _debug_flags() -> list[str]:
    """After Python's own CFLAGS (which carry -g), so the last one wins."""
    return ["-g"] if os.environ.get("PG_KERNELS_DEBUG_INFO") == "1" else ["-g0"]


def _extensions():
    cxx = ["-O3", "-fopenmp", *_debug_flags(), *_cpu_capability_flags()]
    shared = ("csrc/include/**/*.h", "csrc/include/**/*.inc")
    ext = [
        cpp_extension.CppExtension(
            "pg_kernels._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            depends=_headers("csrc/cpu/*.h", *shared),
            include_dirs=INCLUDE,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    ]
    build_cuda, why = _cuda_decision()
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if build_cuda and not cuda_sources:
        build_cuda, why = False, "no CUDA sources"
    print(f"pg_kernels setup: CUDA extension {'ON' if build_cuda else 'OFF'}: {why}", flush=True)
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext.append(
            cpp_extension.CUDAExtension(
                "pg_kernels._C_cuda",
                cuda_sources,
                depends=_headers("csrc/cuda/*.cuh", "csrc/cuda/*.h", *shared),
                include_dirs=INCLUDE,
                extra_compile_args={
                    "cxx": ["-O3", *_debug_flags()],
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
                },
            )
        )
    return ext


setup(
    name="pg_kernels",
    version="0.1.0",
    description="Fused one-pass kernels for policy-gradient RL over vocabulary-sized logits",
    packages=find_packages(include=["pg_kernels", "pg_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.2"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
