// The exact GELU of float32 or bfloat16 activations, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 evaluated in float32
// (and rounded to bf16), and its derivative times an incoming gradient of the same dtype: XLA:CPU evaluates
// float32 erfc (and, for the derivative, exp) at about 0.4 elements per ns, ~4% of the bench train step in either
// dtype; here 16 lanes at a time.
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using perceiver_ar::erf16;
using perceiver_ar::exp16;
using perceiver_ar::load;
using perceiver_ar::store;
using perceiver_ar::tail_mask;

constexpr int64_t kItem = 16384;  // elements per work item

inline __m512 cdf(__m512 x) {  // Phi(x)
  const __m512 half = _mm512_set1_ps(0.5f);
  return _mm512_fmadd_ps(half, erf16(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f))), half);
}

// f(i, mask) for the 16-element vectors i = 0, 16, ... of n elements, kItem elements per work item
template <typename F>
void each_vector(ffi::ThreadPool& pool, int64_t n, F f) {
  perceiver_ar::parallel_for(pool, (n + kItem - 1) / kItem, [=](int64_t item) {
    for (int64_t i = item * kItem; i < std::min(n, (item + 1) * kItem); i += 16) f(i, tail_mask(n - i));
  });
}

template <typename T>
void gelu(ffi::ThreadPool& pool, const T* in, T* out, int64_t n) {
  each_vector(pool, n, [=](int64_t i, __mmask16 m) {
    const __m512 v = load(in + i, m);
    store(out + i, m, _mm512_mul_ps(v, cdf(v)));
  });
}

// d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
template <typename T>
void gelu_grad(ffi::ThreadPool& pool, const T* in, const T* grad, T* out, int64_t n) {
  each_vector(pool, n, [=](int64_t i, __mmask16 m) {
    const __m512 v = load(in + i, m);
    const __m512 pdf = _mm512_mul_ps(_mm512_set1_ps(0.39894228040143268f),
                                     exp16(_mm512_mul_ps(_mm512_set1_ps(-0.5f), _mm512_mul_ps(v, v))));
    const __m512 slope = _mm512_fmadd_ps(v, pdf, cdf(v));
    store(out + i, m, _mm512_mul_ps(load(grad + i, m), slope));
  });
}

template <typename T>
const T* data(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }

// x, g and the result of one dtype, float32 or bf16
bool float32_or_bf16(ffi::DataType type, std::initializer_list<ffi::DataType> others) {
  for (ffi::DataType other : others)
    if (other != type) return false;
  return type == ffi::DataType::F32 || type == ffi::DataType::BF16;
}

ffi::Error Gelu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (!float32_or_bf16(x.element_type(), {y->element_type()}) || x.element_count() != y->element_count())
    return ffi::Error::InvalidArgument("gelu: x and y of one shape, float32 or bf16, expected");
  if (x.element_type() == ffi::DataType::F32)
    gelu(pool, data<float>(x), static_cast<float*>(y->untyped_data()), x.element_count());
  else
    gelu(pool, data<uint16_t>(x), static_cast<uint16_t*>(y->untyped_data()), x.element_count());
  return ffi::Error::Success();
}

ffi::Error GeluGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer g, ffi::Result<ffi::AnyBuffer> dx) {
  if (!float32_or_bf16(x.element_type(), {g.element_type(), dx->element_type()}) ||
      g.element_count() != x.element_count() || dx->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("gelu_grad: x, g and dx of one shape, float32 or bf16, expected");
  if (x.element_type() == ffi::DataType::F32)
    gelu_grad(pool, data<float>(x), data<float>(g), static_cast<float*>(dx->untyped_data()), x.element_count());
  else
    gelu_grad(pool, data<uint16_t>(x), data<uint16_t>(g), static_cast<uint16_t*>(dx->untyped_data()),
              x.element_count());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArGelu, Gelu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArGeluGrad, GeluGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
