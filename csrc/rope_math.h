// Torch-free math of the fused RoPE kernels, shared by the CPU (rope.cpp) and CUDA (rope_cuda_kernel.cuh) code.
#pragma once

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

}  // namespace megatron_lite
