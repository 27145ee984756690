// AdamW's update of one float32 parameter tensor in one pass: reads the parameters, their gradient and both
// moments once and writes the parameters and moments in place (the caller aliases them), where XLA:CPU runs optax's
// update as three fusions per tensor that read the gradient three times and the new moments back (~40 bytes per
// parameter against 28; AdamW cost the bench train step ~8% more than plain SGD's one pass).
//
// The arithmetic is optax's, operation for operation (`clip_by_global_norm`, `scale_by_adam`,
// `add_decayed_weights`, `scale_by_learning_rate`, `apply_updates`), in float32 (fma: as XLA contracts them):
//   g = clip ? g / norm * max_norm : g
//   mu = fma(1 - b1, g, b1 mu),  nu = fma(b2, nu, (1 - b2) g^2)
//   u = fma(weight_decay, p, (mu / bc1) / (sqrt(nu / bc2) + eps)),  p = fma(-lr, u, p)
// The step's scalars come in a buffer: [clip (0 or 1), norm, max_norm, bc1 = 1 - b1^t, bc2 = 1 - b2^t, -lr]. It
// also returns the sums of the squared gradient (before clipping) and new parameters: the step's norm metrics,
// which would otherwise read both once more.
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

// The compiler contracts no product and sum into a fused multiply-add by itself: the ones below are where XLA:CPU
// made them in optax's update with clipping (the results then equal XLA's, the parameters to an ulp); where XLA
// contracts depends on its fusions, so elsewhere they differ from its results by an ulp.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

constexpr int64_t kItem = 16384;  // elements per work item

struct Hyper {
  float b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay;
};

struct Step {
  bool clip;
  float norm, max_norm, bc1, bc2, neg_lr;
};

// elements [i, i + 16) of those in `mask`; adds their squared gradients and new parameters to squares[0], [1]
inline void update16(const float* g_in, float* p, float* mu, float* nu, int64_t i, __mmask16 mask, const Hyper& h,
                     const Step& s, __m512* squares) {
  __m512 g = _mm512_maskz_loadu_ps(mask, g_in + i);
  squares[0] = _mm512_fmadd_ps(g, g, squares[0]);
  if (s.clip) g = _mm512_mul_ps(_mm512_div_ps(g, _mm512_set1_ps(s.norm)), _mm512_set1_ps(s.max_norm));
  const __m512 m = _mm512_fmadd_ps(_mm512_set1_ps(h.one_minus_b1), g,
                                   _mm512_mul_ps(_mm512_set1_ps(h.b1), _mm512_maskz_loadu_ps(mask, mu + i)));
  const __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(h.b2), _mm512_maskz_loadu_ps(mask, nu + i),
                                   _mm512_mul_ps(_mm512_set1_ps(h.one_minus_b2), _mm512_mul_ps(g, g)));
  _mm512_mask_storeu_ps(mu + i, mask, m);
  _mm512_mask_storeu_ps(nu + i, mask, v);
  const __m512 denominator = _mm512_add_ps(_mm512_sqrt_ps(_mm512_div_ps(v, _mm512_set1_ps(s.bc2))),
                                           _mm512_set1_ps(h.eps));
  __m512 u = _mm512_div_ps(_mm512_div_ps(m, _mm512_set1_ps(s.bc1)), denominator);
  const __m512 param = _mm512_maskz_loadu_ps(mask, p + i);
  if (h.weight_decay != 0.0f) u = _mm512_fmadd_ps(_mm512_set1_ps(h.weight_decay), param, u);
  const __m512 new_param = _mm512_maskz_mov_ps(mask, _mm512_fmadd_ps(_mm512_set1_ps(s.neg_lr), u, param));
  _mm512_mask_storeu_ps(p + i, mask, new_param);
  squares[1] = _mm512_fmadd_ps(new_param, new_param, squares[1]);
}

ffi::Error Adamw(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> param, ffi::Buffer<ffi::F32> grad,
                 ffi::Buffer<ffi::F32> mu, ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> scalars,
                 ffi::ResultBuffer<ffi::F32> param_out, ffi::ResultBuffer<ffi::F32> mu_out,
                 ffi::ResultBuffer<ffi::F32> nu_out, ffi::ResultBuffer<ffi::F32> squares, float b1,
                 float one_minus_b1, float b2, float one_minus_b2, float eps, float weight_decay) {
  const int64_t n = param.element_count();
  if (grad.element_count() != n || mu.element_count() != n || nu.element_count() != n || scalars.element_count() != 6 ||
      squares->element_count() != 2)
    return ffi::Error::InvalidArgument(
        "adamw: parameters, gradient and moments of one size, 6 scalars and 2 sums expected");
  const float* s = scalars.typed_data();
  const Step step{s[0] != 0.0f, s[1], s[2], s[3], s[4], s[5]};
  const Hyper hyper{b1, one_minus_b1, b2, one_minus_b2, eps, weight_decay};
  float* p = param_out->typed_data();
  float* m = mu_out->typed_data();
  float* v = nu_out->typed_data();
  // in place where XLA aliased the outputs to the inputs; otherwise copied first
  if (p != param.typed_data()) std::copy_n(param.typed_data(), n, p);
  if (m != mu.typed_data()) std::copy_n(mu.typed_data(), n, m);
  if (v != nu.typed_data()) std::copy_n(nu.typed_data(), n, v);
  const float* g = grad.typed_data();
  const int64_t items = (n + kItem - 1) / kItem;
  std::vector<float> partial(2 * items);  // per item, summed in order after: the same for any number of threads
  float* partial_sums = partial.data();
  perceiver_ar::parallel_for(pool, items, [=](int64_t item) {
    const int64_t end = std::min(n, (item + 1) * kItem);
    __m512 sums[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = item * kItem; i < end; i += 16)
      update16(g, p, m, v, i, perceiver_ar::tail_mask(end - i), hyper, step, sums);
    partial_sums[2 * item] = _mm512_reduce_add_ps(sums[0]);
    partial_sums[2 * item + 1] = _mm512_reduce_add_ps(sums[1]);
  });
  double total[2] = {0, 0};
  for (int64_t item = 0; item < items; ++item) {
    total[0] += partial[2 * item];
    total[1] += partial[2 * item + 1];
  }
  squares->typed_data()[0] = static_cast<float>(total[0]);
  squares->typed_data()[1] = static_cast<float>(total[1]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArAdamw, Adamw,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
