// Fused rotate-half rotary position embedding (RoPE): CPU kernel (OpenMP) and op registration.
//
// Ops (namespace megatron_lite; Python front, fake kernels and autograd in megatron_lite/ops/rope.py):
//   rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor
//       out = x * cos + rotate_half(x) * sin               (Su et al. 2021, RoFormer eq. 34;
//       rotate_half([x1, x2]) = [-x2, x1]                    GPT-NeoX / HF Llama layout)
//   rope_bwd(Tensor grad, Tensor cos, Tensor sin) -> Tensor
//       grad_x = grad * cos - rotate_half(grad * sin)      (rotate_half is linear with transpose -rotate_half)
// Shapes: x, grad [b, s, h, d] (fp32/bf16/fp16, any strides; made contiguous), cos, sin [b, s, d] fp32.
// Output: [b, s, h, d] contiguous in x's dtype; all arithmetic in fp32.
// The CUDA kernel lives in rope_cuda.cu, compiled only when setup.py finds CUDA (defines WITH_CUDA).

#include <torch/extension.h>

#include "rope_common.h"

namespace megatron_lite {
namespace {

// One (b, s, h) row of d values per iteration; pairs (i, i + d/2) are rotated together.
template <typename scalar_t, bool kBackward>
void rope_rows(const scalar_t* x, const float* cos, const float* sin, scalar_t* out, int64_t rows,
               int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  // Below ~32k elements thread start-up costs more than the work.
#pragma omp parallel for schedule(static) if (rows * dim > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t token = r / heads;  // index into the [b*s] cos/sin rows
    const float* c = cos + token * dim;
    const float* s = sin + token * dim;
    const scalar_t* xr = x + r * dim;
    scalar_t* o = out + r * dim;
    for (int64_t i = 0; i < half; ++i) {
      float lo, hi;
      rope_pair<kBackward>(static_cast<float>(xr[i]), static_cast<float>(xr[i + half]), c[i], c[i + half],
                           s[i], s[i + half], &lo, &hi);
      o[i] = static_cast<scalar_t>(lo);
      o[i + half] = static_cast<scalar_t>(hi);
    }
  }
}

template <bool kBackward>
at::Tensor rope_cpu(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  check_rope_inputs(x_in, cos_in, sin_in);
  TORCH_CHECK(x_in.device().is_cpu() && cos_in.device().is_cpu() && sin_in.device().is_cpu(),
              "megatron_lite::rope CPU kernel got a non-CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor cos = cos_in.contiguous();
  const at::Tensor sin = sin_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t heads = x.size(2), dim = x.size(3);
  const int64_t rows = x.numel() / dim;
  if (rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "megatron_lite_rope_cpu", [&] {
    rope_rows<scalar_t, kBackward>(x.data_ptr<scalar_t>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                   out.data_ptr<scalar_t>(), rows, heads, dim);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron_lite, m) {
  m.def("rope_fwd(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("rope_bwd(Tensor grad, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(megatron_lite, CPU, m) {
  m.impl("rope_fwd", &rope_cpu<false>);
  m.impl("rope_bwd", &rope_cpu<true>);
}

}  // namespace megatron_lite

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "megatron_lite fused RoPE; importing this module registers torch.ops.megatron_lite.rope_fwd/rope_bwd";
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
