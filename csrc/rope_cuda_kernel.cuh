// Torch-free CUDA kernel of the fused rotate-half RoPE (launched by rope_cuda.cu).
// Kept free of torch headers so it can be compile-checked with plain nvcc (tests/test_fused_rope.py)
// on machines whose torch is a CPU build without the CUDA headers.
#pragma once

#include <cstdint>

#include "rope_math.h"

namespace megatron_lite {

// One thread per rotated pair (i, i + d/2) of one (b, s, h) row of x [b, s, h, d] (contiguous);
// cos/sin are [b, s, d] fp32; arithmetic in fp32, output in scalar_t.
template <typename scalar_t, bool kBackward>
__global__ void rope_kernel(const scalar_t* __restrict__ x, const float* __restrict__ cos,
                            const float* __restrict__ sin, scalar_t* __restrict__ out, int64_t n_pairs,
                            int64_t heads, int64_t half) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= n_pairs) return;
  const int64_t i = idx % half;
  const int64_t row = idx / half;    // (b, s, h) row
  const int64_t token = row / heads;  // (b, s) row of cos/sin
  const int64_t dim = 2 * half;
  const float* c = cos + token * dim;
  const float* s = sin + token * dim;
  const scalar_t* xr = x + row * dim;
  float lo, hi;
  rope_pair<kBackward>(static_cast<float>(xr[i]), static_cast<float>(xr[i + half]), c[i], c[i + half], s[i],
                       s[i + half], &lo, &hi);
  out[row * dim + i] = static_cast<scalar_t>(lo);
  out[row * dim + i + half] = static_cast<scalar_t>(hi);
}

}  // namespace megatron_lite
