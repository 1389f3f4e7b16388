// Fused rotate-half RoPE: CUDA kernels for megatron_lite::rope_fwd / rope_bwd (schema in rope.cpp).
// Compiled only when setup.py finds CUDA; math identical to the CPU kernel (rope_common.h).
// The kernel itself is torch-free, in rope_cuda_kernel.cuh.

// c10 headers only (not ATen/cuda/CUDAContext.h), so the file needs no cuBLAS/cuSPARSE headers.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "rope_common.h"
#include "rope_cuda_kernel.cuh"

namespace megatron_lite {
namespace {

template <bool kBackward>
at::Tensor rope_cuda(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_rope_inputs(x_in, cos_in, sin_in);
  TORCH_CHECK(x_in.is_cuda(), "megatron_lite::rope CUDA kernel got a non-CUDA tensor");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t half = x.size(3) / 2;
  const int64_t n_pairs = x.numel() / 2;
  if (n_pairs == 0) return out;
  constexpr int kThreads = 256;
  const int64_t blocks = (n_pairs + kThreads - 1) / kThreads;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megatron_lite_rope_cuda", [&] {
    rope_kernel<scalar_t, kBackward><<<blocks, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr<scalar_t>(), n_pairs,
        x.size(2), half);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(megatron_lite, CUDA, m) {
  m.impl("rope_fwd", &rope_cuda<false>);
  m.impl("rope_bwd", &rope_cuda<true>);
}

}  // namespace megatron_lite
