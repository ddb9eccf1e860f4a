"""Build pg_kernels: the C++ CPU extension always, the CUDA extension when it can be built.

The CPU kernels are built once per vector ISA, as ATen builds its own: pg_kernels._C for AVX2
(or generic code on a build machine without AVX2), and on x86-64 pg_kernels._C_avx512 for
AVX-512. At import pg_kernels takes the AVX-512 one where ATen itself runs AVX-512 kernels
(`torch.backends.cpu.get_cpu_capability()`, which ATEN_CPU_CAPABILITY=avx2 overrides), so one
build serves every x86-64 CPU.

The CUDA extension needs a CUDA build of torch (torch.version.cuda set) and a CUDA toolkit
(CUDA_HOME). Whether a GPU is present does not matter: build machines often have none.
Build with `pip install -e . --no-build-isolation` so the extension compiles against the torch
that is installed (an isolated build environment would fetch a different torch).

Environment:
  PG_KERNELS_CPU_CAPABILITY  avx2 | default   vector ISA of pg_kernels._C (default: avx2 where
                                                this machine supports it)
  PG_KERNELS_BUILD_AVX512    0 | 1            build pg_kernels._C_avx512 (default: 1 on x86-64)
  PG_KERNELS_BUILD_CUDA      0 | 1            force the CUDA extension off / on
  PG_KERNELS_DEBUG_INFO      0 | 1            host code with debug info (-g, e.g. for
                                                `perf annotate` by source line); default -g0:
                                                -g made the kernel sources compile 1.4-1.8x
                                                slower into 22-35x larger objects
  TORCH_CUDA_ARCH_LIST                          default "8.0;9.0"
"""

import glob
import os
import platform

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


# The same flags and macros as ATen's own kernels of each ISA, so that at::vec::Vectorized is
# that ISA's.
_CPU_CAPABILITY_FLAGS = {
    "default": ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"],
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
}  # fmt: skip


def _cpu_capabilities() -> list[tuple[str, str]]:
    """(module, ISA) of each CPU extension to build."""
    base = os.environ.get("PG_KERNELS_CPU_CAPABILITY")
    if base is None:
        base = "avx2" if _host_supports_avx2() else "default"
    if base not in ("avx2", "default"):
        raise ValueError(f"PG_KERNELS_CPU_CAPABILITY must be 'avx2' or 'default', got {base!r}")
    built = [("pg_kernels._C", base)]
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    if os.environ.get("PG_KERNELS_BUILD_AVX512", "1" if x86_64 else "0") == "1":
        built.append(("pg_kernels._C_avx512", "avx512"))
    return built


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
    shared = ("csrc/include/**/*.h", "csrc/include/**/*.inc")
    # -fvisibility=hidden: the CPU modules define the same C++ names; each keeps its own.
    cxx = ["-O3", "-fopenmp", "-fvisibility=hidden", *_debug_flags()]
    ext = [
        cpp_extension.CppExtension(
            name,
            sorted(glob.glob("csrc/cpu/*.cpp")),
            depends=_headers("csrc/cpu/*.h", *shared),
            include_dirs=INCLUDE,
            extra_compile_args={"cxx": [*cxx, *_CPU_CAPABILITY_FLAGS[isa]]},
            extra_link_args=["-fopenmp"],
        )
        for name, isa in _cpu_capabilities()
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


class _BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """Each extension's objects in a folder of its own: the CPU modules compile the same sources
    with different flags, and in one folder every build would recompile both."""

    def build_extension(self, ext):
        build_temp = self.build_temp
        self.build_temp = os.path.join(build_temp, ext.name)
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = build_temp


setup(
    name="pg_kernels",
    version="0.1.0",
    description="Fused one-pass kernels for policy-gradient RL over vocabulary-sized logits",
    packages=find_packages(include=["pg_kernels", "pg_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.2"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _BuildExtension},
    zip_safe=False,
)
