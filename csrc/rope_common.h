// Input checks shared by the fused RoPE CPU (rope.cpp) and CUDA (rope_cuda.cu) ops.
#pragma once

#include <ATen/ATen.h>

#include "rope_math.h"

namespace megatron_lite {

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
