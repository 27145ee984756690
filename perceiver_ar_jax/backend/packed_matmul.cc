// y (M, N) f32 = x (M, K) f32 @ w [f32 | bf16 | s8] (* scale (N) for s8), w packed in panels of 64 columns.
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include "parallel_for.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kBlock = 64;  // output columns per register tile: 4 vectors of 16 floats

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {  // bf16 -> f32: the bits shifted into the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// One register tile: rows m0 .. m0 + R - 1 of x, the 64 columns of panel p (packed weights: (panels, K, 64),
// panel p holds columns 64p .. 64p + 63 row after row, so a tile streams one contiguous K x 64 block).
template <int R, typename W>
inline void tile(const float* x, const W* panel, const float* scale, float* y, int64_t K, int64_t N, int64_t m0,
                 int64_t n) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* xr = x + m0 * K;
  constexpr int64_t kAhead = 4096 / (kBlock * sizeof(W));  // rows prefetched ahead: 4 KB of the panel
  for (int64_t k = 0; k < K; ++k) {
    const W* row = panel + k * kBlock;
    for (int64_t b = 0; b < int64_t(kBlock * sizeof(W)); b += 64)
      _mm_prefetch((const char*)(row + kAhead * kBlock) + b, _MM_HINT_T0);
    __m512 w0 = load16(row), w1 = load16(row + 16), w2 = load16(row + 32), w3 = load16(row + 48);
    for (int r = 0; r < R; ++r) {
      __m512 xb = _mm512_set1_ps(xr[r * K + k]);
      acc[r][0] = _mm512_fmadd_ps(xb, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xb, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xb, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xb, w3, acc[r][3]);
    }
  }
  for (int j = 0; j < 4; ++j) {
    int64_t col = n + 16 * j;
    if (col >= N) break;
    __mmask16 keep = col + 16 <= N ? __mmask16(0xFFFF) : __mmask16((1u << (N - col)) - 1);
    __m512 s = scale ? _mm512_maskz_loadu_ps(keep, scale + col) : _mm512_set1_ps(1.0f);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * N + col, keep, _mm512_mul_ps(acc[r][j], s));
  }
}

// Panels [p_begin, p_end) of the output for all M rows.
template <typename W>
void panels(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t K, int64_t N,
            int64_t p_begin, int64_t p_end) {
  constexpr int kRows = 6;  // 24 accumulators + 4 weight vectors + a broadcast: 29 of the 32 registers
  for (int64_t p = p_begin; p < p_end; ++p) {
    const W* panel = w + p * K * kBlock;
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) tile<kRows>(x, panel, scale, y, K, N, m, p * kBlock);
    switch (M - m) {
      case 5: tile<5>(x, panel, scale, y, K, N, m, p * kBlock); break;
      case 4: tile<4>(x, panel, scale, y, K, N, m, p * kBlock); break;
      case 3: tile<3>(x, panel, scale, y, K, N, m, p * kBlock); break;
      case 2: tile<2>(x, panel, scale, y, K, N, m, p * kBlock); break;
      case 1: tile<1>(x, panel, scale, y, K, N, m, p * kBlock); break;
      default: break;
    }
  }
}

template <typename W>
ffi::Error run(ffi::ThreadPool pool, const float* x, const W* w, const float* scale, float* y, int64_t M,
               int64_t K, int64_t N) {
  perceiver_ar::parallel_for(pool, (N + kBlock - 1) / kBlock,
                             [=](int64_t p) { panels(x, w, scale, y, M, K, N, p, p + 1); });
  return ffi::Error::Success();
}

ffi::Error PackedMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w, ffi::Buffer<ffi::F32> scale,
                        ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  int64_t M = xd[0], K = xd[1], N = yd[1];
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != K || wd[2] != kBlock || wd[0] * kBlock < N || yd[0] != M)
    return ffi::Error::InvalidArgument("packed_matmul: x (M, K), w (ceil(N / 64), K, 64), y (M, N) expected");
  const float* s = scale.element_count() > 0 ? scale.typed_data() : nullptr;
  switch (w.element_type()) {
    case ffi::F32: return run(pool, x.typed_data(), (const float*)w.untyped_data(), s, y->typed_data(), M, K, N);
    case ffi::BF16: return run(pool, x.typed_data(), (const uint16_t*)w.untyped_data(), s, y->typed_data(), M, K, N);
    case ffi::S8: return run(pool, x.typed_data(), (const int8_t*)w.untyped_data(), s, y->typed_data(), M, K, N);
    default: return ffi::Error::InvalidArgument("packed_matmul: weights must be f32, bf16 or s8");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArPackedMatmul, PackedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
