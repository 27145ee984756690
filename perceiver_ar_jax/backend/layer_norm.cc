// LayerNorm over the last axis and its derivative, as Flax's `nn.LayerNorm` computes it (statistics in float32, the
// variance in two passes): y = (x - mean) * (rstd * scale) + bias, rstd = 1 / sqrt(var + eps), for x float32 or
// bf16 and y of either dtype. XLA:CPU evaluates the forward and backward in several fusions and reductions that
// each read the rows again (the bench train step: ~4-5% of its time); here each row is read once from memory and
// its passes run in L1 (a row of 512-2048 channels is 2-8 KB). The backward's scale and bias gradients are summed
// per work item and then over the items in order, so results do not depend on the number of threads.
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>
#include "parallel_for.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using perceiver_ar::load;
using perceiver_ar::store;
using perceiver_ar::tail_mask;

constexpr int64_t kRows = 16;  // rows per work item

// sum over the C elements of f(i, mask) (16 lanes each)
template <typename F>
float sum_over(int64_t C, F f) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < C; i += 16) acc = _mm512_add_ps(acc, f(i, tail_mask(C - i)));
  return _mm512_reduce_add_ps(acc);
}

template <typename TX, typename TY>
void forward(ffi::ThreadPool& pool, const TX* x, const float* scale, const float* bias, TY* y, float* mean,
             float* rstd, int64_t rows, int64_t C, float eps) {
  perceiver_ar::parallel_for(pool, (rows + kRows - 1) / kRows, [=](int64_t item) {
    for (int64_t r = item * kRows; r < std::min(rows, (item + 1) * kRows); ++r) {
      const TX* row = x + r * C;
      const float mu = sum_over(C, [&](int64_t i, __mmask16 m) { return load(row + i, m); }) / C;
      const __m512 mu16 = _mm512_set1_ps(mu);
      const float var = sum_over(C, [&](int64_t i, __mmask16 m) {
        const __m512 d = _mm512_maskz_sub_ps(m, load(row + i, m), mu16);
        return _mm512_mul_ps(d, d);
      }) / C;
      const float r_std = 1.0f / std::sqrt(var + eps);
      mean[r] = mu;
      rstd[r] = r_std;
      for (int64_t i = 0; i < C; i += 16) {
        const __mmask16 m = tail_mask(C - i);
        const __m512 mul = _mm512_mul_ps(_mm512_set1_ps(r_std), load(scale + i, m));
        store(y + r * C + i, m, _mm512_fmadd_ps(_mm512_sub_ps(load(row + i, m), mu16), mul, load(bias + i, m)));
      }
    }
  });
}

// dx = rstd (g scale - mean(g scale) - xhat mean(g scale xhat)), xhat = (x - mean) rstd; per item: sums of g xhat
// (scale's gradient) and g (bias's) into partial[item][2][C]
template <typename TX, typename TY>
void backward(ffi::ThreadPool& pool, const TX* x, const float* scale, const float* mean, const float* rstd,
              const TY* dy, TX* dx, float* partial, int64_t rows, int64_t C) {
  perceiver_ar::parallel_for(pool, (rows + kRows - 1) / kRows, [=](int64_t item) {
    float* d_scale = partial + item * 2 * C;
    float* d_bias = d_scale + C;
    std::fill_n(d_scale, 2 * C, 0.0f);
    for (int64_t r = item * kRows; r < std::min(rows, (item + 1) * kRows); ++r) {
      const TX* row = x + r * C;
      const TY* g = dy + r * C;
      const __m512 mu = _mm512_set1_ps(mean[r]), rs = _mm512_set1_ps(rstd[r]);
      auto xhat = [&](int64_t i, __mmask16 m) {
        return _mm512_mul_ps(_mm512_maskz_sub_ps(m, load(row + i, m), mu), rs);
      };
      auto gs = [&](int64_t i, __mmask16 m) { return _mm512_mul_ps(load(g + i, m), load(scale + i, m)); };
      const float mean_gs = sum_over(C, gs) / C;
      const float mean_gsx =
          sum_over(C, [&](int64_t i, __mmask16 m) { return _mm512_mul_ps(gs(i, m), xhat(i, m)); }) / C;
      for (int64_t i = 0; i < C; i += 16) {
        const __mmask16 m = tail_mask(C - i);
        const __m512 xh = xhat(i, m), gi = load(g + i, m);
        const __m512 inner = _mm512_sub_ps(_mm512_sub_ps(gs(i, m), _mm512_set1_ps(mean_gs)),
                                           _mm512_mul_ps(xh, _mm512_set1_ps(mean_gsx)));
        store(dx + r * C + i, m, _mm512_mul_ps(rs, inner));
        _mm512_mask_storeu_ps(d_scale + i, m, _mm512_fmadd_ps(gi, xh, _mm512_maskz_loadu_ps(m, d_scale + i)));
        _mm512_mask_storeu_ps(d_bias + i, m, _mm512_add_ps(gi, _mm512_maskz_loadu_ps(m, d_bias + i)));
      }
    }
  });
}

bool float32_or_bf16(ffi::DataType t) { return t == ffi::DataType::F32 || t == ffi::DataType::BF16; }

// f(x pointer, y pointer) with the pointers typed as the buffers' dtypes
template <typename F>
void typed(const ffi::AnyBuffer& x, void* y, bool y_f32, F f) {
  const bool x_f32 = x.element_type() == ffi::DataType::F32;
  if (x_f32 && y_f32) f(static_cast<const float*>(x.untyped_data()), static_cast<float*>(y));
  else if (x_f32) f(static_cast<const float*>(x.untyped_data()), static_cast<uint16_t*>(y));
  else if (y_f32) f(static_cast<const uint16_t*>(x.untyped_data()), static_cast<float*>(y));
  else f(static_cast<const uint16_t*>(x.untyped_data()), static_cast<uint16_t*>(y));
}

ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                     ffi::Result<ffi::AnyBuffer> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> rstd,
                     float eps) {
  const int64_t C = scale.element_count(), n = x.element_count(), rows = C ? n / C : 0;
  if (C == 0 || n % C || bias.element_count() != C || y->element_count() != n || mean->element_count() != rows ||
      rstd->element_count() != rows || !float32_or_bf16(x.element_type()) || !float32_or_bf16(y->element_type()))
    return ffi::Error::InvalidArgument("layer_norm: x (rows, C) float32 or bf16, scale and bias (C,) expected");
  typed(x, y->untyped_data(), y->element_type() == ffi::DataType::F32, [&](auto xp, auto yp) {
    forward(pool, xp, scale.typed_data(), bias.typed_data(), yp, mean->typed_data(), rstd->typed_data(), rows, C,
            eps);
  });
  return ffi::Error::Success();
}

ffi::Error LayerNormGrad(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Buffer<ffi::F32> scale,
                         ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd, ffi::AnyBuffer dy,
                         ffi::Result<ffi::AnyBuffer> dx, ffi::ResultBuffer<ffi::F32> d_scale,
                         ffi::ResultBuffer<ffi::F32> d_bias) {
  const int64_t C = scale.element_count(), n = x.element_count(), rows = C ? n / C : 0;
  if (C == 0 || n % C || dy.element_count() != n || dx->element_count() != n || mean.element_count() != rows ||
      rstd.element_count() != rows || d_scale->element_count() != C || d_bias->element_count() != C ||
      dx->element_type() != x.element_type() || !float32_or_bf16(x.element_type()) ||
      !float32_or_bf16(dy.element_type()))
    return ffi::Error::InvalidArgument("layer_norm_grad: x, dx and dy (rows, C), scale (C,) expected");
  const int64_t items = (rows + kRows - 1) / kRows;
  std::vector<float> partial(items * 2 * C);
  // dy typed as y was; dx as x
  typed(dy, dx->untyped_data(), x.element_type() == ffi::DataType::F32, [&](auto gp, auto dxp) {
    using TX = std::remove_const_t<std::remove_pointer_t<decltype(dxp)>>;
    backward(pool, static_cast<const TX*>(x.untyped_data()), scale.typed_data(), mean.typed_data(), rstd.typed_data(),
             gp, dxp, partial.data(), rows, C);
  });
  float* ds = d_scale->typed_data();
  float* db = d_bias->typed_data();
  std::fill_n(ds, C, 0.0f);
  std::fill_n(db, C, 0.0f);
  for (int64_t item = 0; item < items; ++item)
    for (int64_t i = 0; i < C; ++i) {
      ds[i] += partial[item * 2 * C + i];
      db[i] += partial[item * 2 * C + C + i];
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArLayerNormGrad, LayerNormGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
