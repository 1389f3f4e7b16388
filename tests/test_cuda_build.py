"""The CUDA build is checked on machines without a GPU (issue 17 item 4).

* setup.py's decision: the CUDA kernels are built whenever a CUDA torch and the toolkit are
  present, a visible GPU or not.
* csrc/rope_cuda.cu itself compiles with the local nvcc for sm_80 and sm_90, with the flags a real
  build uses (scripts/check_cuda_compile.py), and the object holds the forward and backward kernel
  for every dtype the dispatch names.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import check_cuda_compile  # noqa: E402


def test_setup_builds_cuda_without_a_visible_gpu():
    st = check_cuda_compile.load_setup_module()
    assert st.want_cuda_extension("12.8", "/usr/local/cuda")          # build node, no GPU needed
    assert not st.want_cuda_extension(None, "/usr/local/cuda")         # CPU wheel of torch
    assert not st.want_cuda_extension("12.8", None)                    # no toolkit
    assert not st.want_cuda_extension("12.8", "/usr/local/cuda", have_source=False)
    assert not hasattr(st, "ext_modules")  # importing setup.py builds nothing (setup() runs as __main__)
    assert st.DEFAULT_CUDA_ARCH_LIST == "8.0;9.0"


def test_nvcc_command_uses_the_real_build_flags(tmp_path):
    pytest.importorskip("torch")
    cmd = check_cuda_compile.nvcc_command(["80", "90"], str(tmp_path / "x.o"))
    for flag in ("-DWITH_CUDA", "-O3", "-std=c++20", "-D__CUDA_NO_HALF_CONVERSIONS__", "--expt-relaxed-constexpr",
                 "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"):
        assert flag in cmd
    assert cmd[2].endswith(os.path.join("csrc", "rope_cuda.cu"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not installed")
def test_rope_cuda_compiles_for_sm80_and_sm90(tmp_path):
    obj = tmp_path / "rope_cuda.o"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_cuda_compile.py"),
                          "--arch", "80,90", "--keep", str(obj)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "compiles for sm_80, sm_90" in res.stdout
    if shutil.which("nm"):
        syms = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True).stdout
        # AT_DISPATCH_FLOATING_TYPES_AND2(BFloat16, Half): four dtypes, forward and backward each
        for t in ("float", "double", "c10::Half", "c10::BFloat16"):
            for bwd in ("false", "true"):
                assert f"megatron_lite::rope_kernel<{t}, {bwd}>" in syms, (t, bwd)
