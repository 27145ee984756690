// Attention's masked softmax over the keys and its derivative, one pass over each row's data: XLA:CPU evaluates
// `softmax(where(mask, scores, MASKED))` and `where(mask, p (dp - sum(dp p)), 0)` in several fusions that read the
// (batch, heads, queries, keys) float32 scores or gradients from memory two to four times; here each row is read
// from memory once (then from L1) and written once.
//
// For a row s (keys) with mask m (True = may attend), as the dense attention path (model/attention/dense.py):
//   forward:  x_j = m_j ? s_j : -FLT_MAX,  p_j = exp(x_j - max x) / sum_k exp(x_k - max x)
//             (a row with no visible key: uniform, 1 / keys; otherwise masked keys get exactly 0)
//   backward: ds_j = m_j ? p_j (dp_j - sum_k dp_k p_k) : 0, rounded to ds's dtype (float32 or bf16)
// The mask is a bool array broadcast over batch, heads and queries (element strides, 0 where broadcast) with its
// keys contiguous.
#include <immintrin.h>
#include <algorithm>
#include <cfloat>
#include <cstdint>
#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using perceiver_ar::exp16;
using perceiver_ar::store;
using perceiver_ar::tail_mask;

constexpr int64_t kRows = 8;  // rows per work item

inline __mmask16 visible(const bool* m, __mmask16 tail) {
  const __m128i bytes = _mm_maskz_loadu_epi8(tail, m);
  return _mm_test_epi8_mask(bytes, bytes);
}

void forward_row(const float* s, const bool* m, float* p, int64_t K) {
  __m512 vmax = _mm512_set1_ps(-FLT_MAX);
  __mmask16 any = 0;
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 vis = visible(m + j, tail_mask(K - j));
    any |= vis;
    vmax = _mm512_mask_max_ps(vmax, vis, vmax, _mm512_maskz_loadu_ps(vis, s + j));
  }
  if (!any) {  // every key masked: exp(0) = 1 for each, as XLA computes it
    const __m512 uniform = _mm512_set1_ps(1.0f / static_cast<float>(K));
    for (int64_t j = 0; j < K; j += 16) _mm512_mask_storeu_ps(p + j, tail_mask(K - j), uniform);
    return;
  }
  const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 tail = tail_mask(K - j), vis = visible(m + j, tail);
    // masked lanes: exp of 0, then zeroed (exp(-FLT_MAX - max) underflows to exactly 0 in XLA too)
    const __m512 e = _mm512_maskz_mov_ps(vis, exp16(_mm512_maskz_sub_ps(vis, _mm512_maskz_loadu_ps(vis, s + j), max)));
    sum = _mm512_add_ps(sum, e);
    _mm512_mask_storeu_ps(p + j, tail, e);
  }
  const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 tail = tail_mask(K - j);
    _mm512_mask_storeu_ps(p + j, tail, _mm512_div_ps(_mm512_maskz_loadu_ps(tail, p + j), total));
  }
}

template <typename T>
void backward_row(const float* p, const float* dp, const bool* m, T* ds, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 tail = tail_mask(K - j);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, dp + j), _mm512_maskz_loadu_ps(tail, p + j), acc);
  }
  const __m512 dot = _mm512_set1_ps(_mm512_reduce_add_ps(acc));
  for (int64_t j = 0; j < K; j += 16) {
    const __mmask16 tail = tail_mask(K - j), vis = visible(m + j, tail);
    const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p + j),
                                   _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, dp + j), dot));
    store(ds + j, tail, _mm512_maskz_mov_ps(vis, g));
  }
}

struct Rows {
  int64_t B, H, Q, K, mask_b, mask_h, mask_q;
  Rows(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> mask_strides)
      : B(dims[0]), H(dims[1]), Q(dims[2]), K(dims[3]),
        mask_b(mask_strides[0]), mask_h(mask_strides[1]), mask_q(mask_strides[2]) {}
  int64_t count() const { return B * H * Q; }
  int64_t mask_offset(int64_t r) const {  // row r = (b, h, q)
    return r / (H * Q) * mask_b + r / Q % H * mask_h + r % Q * mask_q;
  }
};

// f(row) for every row, kRows rows per work item
template <typename F>
void each_row(ffi::ThreadPool& pool, const Rows& rows, F f) {
  const int64_t n = rows.count();
  perceiver_ar::parallel_for(pool, (n + kRows - 1) / kRows, [=](int64_t item) {
    for (int64_t r = item * kRows; r < std::min(n, (item + 1) * kRows); ++r) f(r);
  });
}

ffi::Error check(ffi::Span<const int64_t> dims, ffi::Span<const int64_t> mask_strides, int64_t count,
                 int64_t mask_count) {
  if (dims.size() != 4 || mask_strides.size() != 3 || dims[0] * dims[1] * dims[2] * dims[3] != count ||
      dims[3] < 1)
    return ffi::Error::InvalidArgument("masked_softmax: (batch, heads, queries, keys) scores and 3 mask strides");
  const int64_t last = (dims[0] - 1) * mask_strides[0] + (dims[1] - 1) * mask_strides[1] +
                       (dims[2] - 1) * mask_strides[2] + dims[3];
  if (last > mask_count) return ffi::Error::InvalidArgument("masked_softmax: mask strides reach past the mask");
  return ffi::Error::Success();
}

ffi::Error MaskedSoftmax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::PRED> mask,
                         ffi::ResultBuffer<ffi::F32> probs, ffi::Span<const int64_t> dims,
                         ffi::Span<const int64_t> mask_strides) {
  if (auto e = check(dims, mask_strides, scores.element_count(), mask.element_count()); e.failure()) return e;
  const Rows rows(dims, mask_strides);
  const float* s = scores.typed_data();
  const bool* m = mask.typed_data();
  float* p = probs->typed_data();
  each_row(pool, rows,
           [=](int64_t r) { forward_row(s + r * rows.K, m + rows.mask_offset(r), p + r * rows.K, rows.K); });
  return ffi::Error::Success();
}

ffi::Error MaskedSoftmaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> probs, ffi::Buffer<ffi::F32> d_probs,
                             ffi::Buffer<ffi::PRED> mask, ffi::Result<ffi::AnyBuffer> d_scores,
                             ffi::Span<const int64_t> dims, ffi::Span<const int64_t> mask_strides) {
  if (auto e = check(dims, mask_strides, probs.element_count(), mask.element_count()); e.failure()) return e;
  if (d_probs.element_count() != probs.element_count() || d_scores->element_count() != probs.element_count())
    return ffi::Error::InvalidArgument("masked_softmax_grad: probs, d_probs and d_scores of one shape expected");
  const Rows rows(dims, mask_strides);
  const float* p = probs.typed_data();
  const float* dp = d_probs.typed_data();
  const bool* m = mask.typed_data();
  const int64_t K = rows.K;
  switch (d_scores->element_type()) {
    case ffi::F32: {
      float* ds = static_cast<float*>(d_scores->untyped_data());
      each_row(pool, rows,
               [=](int64_t r) { backward_row(p + r * K, dp + r * K, m + rows.mask_offset(r), ds + r * K, K); });
      break;
    }
    case ffi::BF16: {
      uint16_t* ds = static_cast<uint16_t*>(d_scores->untyped_data());
      each_row(pool, rows,
               [=](int64_t r) { backward_row(p + r * K, dp + r * K, m + rows.mask_offset(r), ds + r * K, K); });
      break;
    }
    default: return ffi::Error::InvalidArgument("masked_softmax_grad: d_scores must be float32 or bf16");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArMaskedSoftmax, MaskedSoftmax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<ffi::Span<const int64_t>>("mask_strides"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArMaskedSoftmaxGrad, MaskedSoftmaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<ffi::Span<const int64_t>>("mask_strides"));
