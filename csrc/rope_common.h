// Shared pieces of the fused RoPE CPU (rope.cpp) and CUDA (rope_cuda.cu) kernels.
#pragma once

#include <ATen/ATen.h>

#if defined(__CUDACC__)
#define ML_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ML_HOST_DEVICE inline
#endif

namespace megatron_lite {

// Rotate one pair (x1 = x[i], x2 = x[i + d/2]) with cos/sin at i and i + d/2.
// Forward (x * cos + rotate_half(x) * sin):
//   lo = x1 * c_lo - x2 * s_lo,  hi = x2 * c_hi + x1 * s_hi
// Backward (g * cos - rotate_half(g * sin)), the transpose of the forward map:
//   lo = g1 * c_lo + g2 * s_hi,  hi = g2 * c_hi - g1 * s_lo
template <bool kBackward>
ML_HOST_DEVICE void rope_pair(float x1, float x2, float c_lo, float c_hi, float s_lo, float s_hi, float* lo,
                              float* hi) {
  if (kBackward) {
    *lo = x1 * c_lo + x2 * s_hi;
    *hi = x2 * c_hi - x1 * s_lo;
  } else {
    *lo = x1 * c_lo - x2 * s_lo;
    *hi = x2 * c_hi + x1 * s_hi;
  }
}

inline void check_rope_inputs(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4, "megatron_lite::rope expects x [b, s, h, d], got ", x.sizes());
  TORCH_CHECK(cos.dim() == 3 && cos.sizes() == sin.sizes(), "megatron_lite::rope expects cos/sin [b, s, d], got ",
              cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == x.size(1) && cos.size(2) == x.size(3),
              "megatron_lite::rope: cos ", cos.sizes(), " does not match x ", x.sizes(), " on b, s, d");
  TORCH_CHECK(x.size(3) % 2 == 0, "megatron_lite::rope needs an even head dim, got ", x.size(3));
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "megatron_lite::rope expects fp32 cos/sin (positions need fp32), got ", cos.scalar_type());
  TORCH_CHECK(x.device() == cos.device() && x.device() == sin.device(),
              "megatron_lite::rope: x, cos, sin must be on one device");
}

}  // namespace megatron_lite
