"""Build megatron_lite and its optional native extensions.

Extensions (each optional; the pure-Python reference runs when one is missing):
  megatron_lite._data_helpers  csrc/data_helpers.cpp  pybind11: sample-index and blend-index builders
  megatron_lite._rope_ops      csrc/rope.cpp (+ csrc/rope_cuda.cu when CUDA is available)
                               torch custom op: fused RoPE forward/backward (CPU OpenMP kernel)

Install with ``pip install --no-build-isolation -e .`` (or ``.``) after ``pip install -r
requirements.txt``, so the build sees the installed torch (an isolated build would fetch a
different torch wheel, so pyproject.toml lists only setuptools, wheel and pybind11).
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


# The CUDA half of the RoPE extension. scripts/check_cuda_compile.py compiles the same source with
# the same macros and nvcc flags (plus torch's own) on machines without a CUDA torch, so keep the
# build's definition here, in one place.
ROPE_CUDA_SOURCE = os.path.join("csrc", "rope_cuda.cu")
ROPE_DEFINE_MACROS_CUDA = [("WITH_CUDA", None)]
ROPE_NVCC_FLAGS = ["-O3"]
# Built when no GPU is visible (a build node): sm_80 = A100, sm_90 = H100/H200; override with
# TORCH_CUDA_ARCH_LIST as usual.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def want_cuda_extension(torch_version_cuda, cuda_home, have_source: bool = True) -> bool:
    """Build the CUDA kernels whenever the toolchain and a CUDA build of torch are present.

    A visible GPU is not required: a build node without one compiles for the arch list.

    Args:
        torch_version_cuda: ``torch.version.cuda`` (None for a CPU wheel).
        cuda_home: ``torch.utils.cpp_extension.CUDA_HOME`` (None when nvcc/CUDA is not found).
        have_source: whether csrc/rope_cuda.cu exists.
    """
    return bool(torch_version_cuda) and cuda_home is not None and have_source


def _extensions():
    exts, cmdclass = [], {}
    if os.environ.get("MEGATRON_LITE_NO_EXT") == "1":
        return exts, cmdclass
    data_src = os.path.join("csrc", "data_helpers.cpp")
    if os.path.exists(os.path.join(HERE, data_src)):
        from pybind11.setup_helpers import Pybind11Extension

        exts.append(Pybind11Extension("megatron_lite._data_helpers", [data_src],
                                      extra_compile_args=["-O3"], cxx_std=17))
    rope_src = os.path.join("csrc", "rope.cpp")
    if os.path.exists(os.path.join(HERE, rope_src)):
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError:
            # pip's isolated build has setuptools and pybind11 (pyproject.toml) but never torch
            raise SystemExit(
                "megatron_lite: building the fused RoPE extension needs torch in the build "
                "environment, and pip's build isolation hides it. Install the requirements first "
                "and build without isolation, as for flash-attn and apex:\n"
                "    pip install -r requirements.txt\n"
                "    pip install --no-build-isolation -e .\n"
                "(or run `source scripts/setup_env.sh`; MEGATRON_LITE_NO_EXT=1 builds without "
                "the extensions)") from None

        sources = [rope_src]
        use_cuda = want_cuda_extension(torch.version.cuda, cpp_extension.CUDA_HOME,
                                       os.path.exists(os.path.join(HERE, ROPE_CUDA_SOURCE)))
        define = []
        if use_cuda:
            sources.append(ROPE_CUDA_SOURCE)
            define = list(ROPE_DEFINE_MACROS_CUDA)
            ext_cls = cpp_extension.CUDAExtension
            if not torch.cuda.is_available():
                os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        else:
            ext_cls = cpp_extension.CppExtension
        exts.append(ext_cls("megatron_lite._rope_ops", sources, define_macros=define,
                            extra_compile_args={"cxx": ["-O3", "-fopenmp"], "nvcc": list(ROPE_NVCC_FLAGS)},
                            extra_link_args=["-fopenmp"]))
        cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return exts, cmdclass


if __name__ == "__main__":  # also under pip: setuptools runs this file as __main__
    ext_modules, cmdclass = _extensions()
    setup(
        name="megatron_lite",
        version="0.1.0",
        description="Megatron-style pretraining / CPT of LLaMA-style models: TP, packing, DeepSpeed ZeRO",
        packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
        python_requires=">=3.10",
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
