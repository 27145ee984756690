// The softmax cross-entropy of a chunk of logits and its gradient, in one pass over each row: XLA:CPU reads the
// (rows, vocab) float32 logits three times (max, sum of exponentials, gradient) and evaluates the exponential
// twice at about 1 element per ns; here each row (128 KB at a 32k vocabulary) is read from memory once and then
// from L2, with a 16-lane exponential.
//
// For row r with logits x, label l, weight w and z_loss_weight z:
//   log_z[r] = log sum_j exp(x_j),  label_logit[r] = x_l,
//   grad[r, j] = w (1 + 2 z log_z) exp(x_j - log_z) - (j == l ? w : 0), rounded to grad's dtype (bf16 or f32).
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using perceiver_ar::exp16;
using perceiver_ar::tail_mask;

inline void store(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store(uint16_t* p, __mmask16 m, __m512 v) { perceiver_ar::store_bf16(p, m, v); }

template <typename G>
void row(const float* x, int64_t V, int32_t label, float w, float z, G* grad, float* log_z, float* label_logit) {
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < V; j += 16) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, tail_mask(V - j), x + j));
  const float max = _mm512_reduce_max_ps(m);
  const __m512 vmax = _mm512_set1_ps(max);
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = tail_mask(V - j);
    s = _mm512_mask_add_ps(s, k, s, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vmax)));
  }
  const float lz = max + std::log(_mm512_reduce_add_ps(s));
  const __m512 vlz = _mm512_set1_ps(lz), coef = _mm512_set1_ps(w * (1.0f + 2.0f * z * lz));
  for (int64_t j = 0; j < V; j += 16) {
    const __mmask16 k = tail_mask(V - j);
    __m512 g = _mm512_mul_ps(coef, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vlz)));
    if (label >= j && label < j + 16) {  // the label's column: - w, before the rounding (as XLA's formula)
      const __mmask16 at = __mmask16(1u << (label - j));
      g = _mm512_mask_sub_ps(g, at, g, _mm512_set1_ps(w));
    }
    store(grad + j, k, g);
  }
  *log_z = lz;
  *label_logit = (label >= 0 && label < V) ? x[label] : 0.0f;
}

// every row, one per work item
template <typename G>
void rows(ffi::ThreadPool& pool, const float* x, const int32_t* l, const float* w, float z, G* g, float* lz,
          float* ll, int64_t R, int64_t V) {
  perceiver_ar::parallel_for(pool, R, [=](int64_t r) { row(x + r * V, V, l[r], w[r], z, g + r * V, lz + r, ll + r); });
}

ffi::Error CrossEntropy(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> labels,
                        ffi::Buffer<ffi::F32> weights, ffi::Result<ffi::AnyBuffer> grad,
                        ffi::ResultBuffer<ffi::F32> log_z, ffi::ResultBuffer<ffi::F32> label_logit,
                        float z_loss_weight) {
  auto d = logits.dimensions();
  if (d.size() != 2 || labels.element_count() != d[0] || weights.element_count() != d[0] ||
      grad->element_count() != d[0] * d[1])
    return ffi::Error::InvalidArgument("cross_entropy: logits (R, V), labels (R), weights (R), grad (R, V)");
  const int64_t R = d[0], V = d[1];
  const float* x = logits.typed_data();
  const int32_t* l = labels.typed_data();
  const float* w = weights.typed_data();
  float* lz = log_z->typed_data();
  float* ll = label_logit->typed_data();
  switch (grad->element_type()) {
    case ffi::BF16:
      rows(pool, x, l, w, z_loss_weight, static_cast<uint16_t*>(grad->untyped_data()), lz, ll, R, V);
      break;
    case ffi::F32:
      rows(pool, x, l, w, z_loss_weight, static_cast<float*>(grad->untyped_data()), lz, ll, R, V);
      break;
    default: return ffi::Error::InvalidArgument("cross_entropy: grad must be bf16 or f32");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArCrossEntropy, CrossEntropy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("z_loss_weight"));
