#!/usr/bin/env python
"""Compile-check the CUDA half of the fused RoPE extension without a GPU: ``nvcc -c`` of
csrc/rope_cuda.cu itself (dispatch, launch, op registration), no link.

It uses what ``setup.py`` builds with (its source, ``WITH_CUDA``, its nvcc flags) plus what
``torch.utils.cpp_extension.CUDAExtension`` adds to every nvcc call (``COMMON_NVCC_FLAGS``: no
implicit half/bf16 operators or conversions, ``--expt-relaxed-constexpr``; ``-std=c++20``; the
extension-name and C++-ABI macros; torch's include folders), so a syntax or API error in the file
a GPU build compiles shows up on a CPU machine too.

torch's CPU wheel ships the c10/cuda headers but not the one CMake generates,
c10/cuda/impl/cuda_cmake_macros.h, whose only content is ``#define C10_CUDA_BUILD_SHARED_LIBS``.
``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` (c10/cuda/CUDAMacros.h's switch for builds without that file)
plus that one definition stand in for it; nothing else is stubbed.

    python scripts/check_cuda_compile.py                 # sm_80 and sm_90, one nvcc call
    python scripts/check_cuda_compile.py --arch 90 --keep build/rope_cuda.o

Exit status: 0 compiled, 1 nvcc reported errors (its output is printed), 2 nvcc or torch missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_setup_module():
    """``setup.py`` as a module (its ``setup()`` call runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("megatron_lite_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def nvcc_command(archs: list[str], out_path: str) -> list[str]:
    """The ``nvcc -c`` command line for csrc/rope_cuda.cu (see the module docstring)."""
    import torch  # why: heavy; the --help path needs none of it
    from torch.utils import cpp_extension

    st = load_setup_module()
    defines = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in st.ROPE_DEFINE_MACROS_CUDA]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [os.path.join(ROOT, "csrc"), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return (["nvcc", "-c", os.path.join(ROOT, st.ROPE_CUDA_SOURCE), "-o", out_path]
            + [f"-I{p}" for p in includes] + defines
            + ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DC10_CUDA_BUILD_SHARED_LIBS",
               "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_rope_ops",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
            + list(cpp_extension.COMMON_NVCC_FLAGS) + ["-std=c++20", "-Xcompiler", "-fPIC"]
            + list(st.ROPE_NVCC_FLAGS) + gencode)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    p.add_argument("--keep", metavar="PATH", help="keep the object file here (default: a temp file)")
    args = p.parse_args(argv)
    if shutil.which("nvcc") is None:
        print("check_cuda_compile: nvcc not found on PATH (install the CUDA toolkit)", file=sys.stderr)
        return 2
    try:
        import torch  # noqa: F401  why: fail with one line, not a traceback
    except ImportError:
        print("check_cuda_compile: torch is not installed (source scripts/setup_env.sh)", file=sys.stderr)
        return 2
    archs = [a.strip() for a in args.arch.split(",") if a.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or os.path.join(tmp, "rope_cuda.o")
        cmd = nvcc_command(archs, out)
        print("check_cuda_compile:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        if res.returncode != 0:
            print(res.stdout + res.stderr, file=sys.stderr)
            print(f"check_cuda_compile: csrc/rope_cuda.cu FAILED to compile for sm_{',sm_'.join(archs)} "
                  f"(nvcc exit {res.returncode})", file=sys.stderr)
            return 1
        warnings = [ln for ln in (res.stdout + res.stderr).splitlines() if "warning" in ln]
        for ln in warnings:
            print(ln)
        print(f"check_cuda_compile: csrc/rope_cuda.cu compiles for sm_{', sm_'.join(archs)} "
              f"({took:.0f} s, {len(warnings)} warnings, {os.path.getsize(out)} bytes of object code)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
