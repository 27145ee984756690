// The float32 path of batched_matmul.cc: one matrix product C (M, N) = A (M, K) @ B (K, N) of any sizes on AVX-512
// FMAs, operands read through element strides, cut into blocks of C that threads share (`BlocksF32`).
#pragma once
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <vector>
#include "transpose_block.h"
#include "vector_math.h"

namespace perceiver_ar {

// Element (i, j) of one matrix of a batch is data[i * rows + j * cols] (strides in elements).
template <typename T>
struct Matrix {
  const T* data;
  int64_t rows, cols;
  T at(int64_t i, int64_t j) const { return data[i * rows + j * cols]; }
};

struct Dims {
  int64_t b1, b2, M, N, K;
};

// Blocked as BLAS libraries do (Goto's scheme): C is cut into blocks of up to kF32Panels x 12 rows and
// kF32Columns columns, one work item each. For each chunk of kF32Chunk k, an item packs its columns of B in panels
// of 32 (each k's 32 contiguous) and, one at a time, its rows of A k-major in panels of 12 (each k's 12 elements
// contiguous, broadcast one by one); each A panel (12 KB, stays in L1) meets every B panel (read from L2) in a 12 x 32
// block of C held in 24 registers, which keeps both FMA ports ~97% busy (~20% more than 8 x 32 blocks). Packed,
// every layout of A and B runs at the same speed.
constexpr int64_t kF32Chunk = 256, kF32Panels = 32, kF32Columns = 512, kF32InPlaceStride = 512;

// A's rows [m0, m0 + rows) (rows <= 12, zeros below), k in [k0, k0 + kc) -> out[k][12]
inline void pack_a_f32(Matrix<float> a, int64_t m0, int64_t rows, int64_t k0, int64_t kc, float* out) {
  if (a.rows == 1) {  // stored transposed: each k's rows are contiguous
    const __mmask16 valid = (1u << rows) - 1;
    for (int64_t k = 0; k < kc; ++k)
      _mm512_mask_storeu_ps(out + k * 12, 0x0FFF, _mm512_maskz_loadu_ps(valid, a.data + (k0 + k) * a.cols + m0));
  } else if (a.cols == 1 && rows == 12 && kc % 8 == 0) {  // rows contiguous: 8 x 8 and 4 x 4 transposes
    const float* x = a.data + m0 * a.rows + k0;
    for (int64_t k = 0; k < kc; k += 8)
      perceiver_ar::block8(reinterpret_cast<const uint32_t*>(x + k), reinterpret_cast<uint32_t*>(out + k * 12),
                           a.rows, 12);
    for (int64_t k = 0; k < kc; k += 4) {
      const float* y = x + 8 * a.rows + k;
      __m128 r0 = _mm_loadu_ps(y), r1 = _mm_loadu_ps(y + a.rows), r2 = _mm_loadu_ps(y + 2 * a.rows),
             r3 = _mm_loadu_ps(y + 3 * a.rows);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(out + k * 12 + 8, r0);
      _mm_storeu_ps(out + (k + 1) * 12 + 8, r1);
      _mm_storeu_ps(out + (k + 2) * 12 + 8, r2);
      _mm_storeu_ps(out + (k + 3) * 12 + 8, r3);
    }
  } else {
    for (int64_t k = 0; k < kc; ++k)
      for (int64_t r = 0; r < 12; ++r) out[k * 12 + r] = r < rows ? a.at(m0 + r, k0 + k) : 0.f;
  }
}

// B's columns [n0, n0 + cols), k in [k0, k0 + kc) -> panels of [kc][32] (zeros right of the last column)
inline void pack_b_f32(Matrix<float> b, int64_t n0, int64_t cols, int64_t k0, int64_t kc, float* out) {
  for (int64_t p = 0; p * 32 < cols; ++p) {
    float* o = out + p * kc * 32;
    const int64_t j0 = n0 + p * 32, width = std::min<int64_t>(32, cols - p * 32);
    if (b.cols == 1) {
      const __mmask16 lo = tail_mask(width), hi = width > 16 ? tail_mask(width - 16) : 0;
      for (int64_t k = 0; k < kc; ++k) {
        const float* row = b.data + (k0 + k) * b.rows + j0;
        _mm512_storeu_ps(o + k * 32, _mm512_maskz_loadu_ps(lo, row));
        _mm512_storeu_ps(o + k * 32 + 16, _mm512_maskz_loadu_ps(hi, row + 16));
      }
    } else if (b.rows == 1 && width == 32 && kc % 8 == 0) {  // columns contiguous: 8 x 8 transposes
      for (int64_t n = 0; n < 32; n += 8)
        for (int64_t k = 0; k < kc; k += 8)
          perceiver_ar::block8(reinterpret_cast<const uint32_t*>(b.data + (j0 + n) * b.cols + k0 + k),
                               reinterpret_cast<uint32_t*>(o + k * 32 + n), b.cols, 32);
    } else {
      for (int64_t k = 0; k < kc; ++k)
        for (int64_t n = 0; n < 32; ++n) o[k * 32 + n] = n < width ? b.at(k0 + k, j0 + n) : 0.f;
    }
  }
}

// C's block of `rows` x `cols` (<= 12 x 32; rows of stride c_rows) = (or +=, accumulate) an A panel x a packed B
// panel over kc k. The panel's element (row i, k) is a[k * a_stride + i] (packed: a_stride 12; or A itself where
// its rows are contiguous, e.g. the scores transposed) or, kRowMajor, a[i * a_stride + k] (A itself, row-major):
// read in place where packing would cost a pass over A for few B panels. Same FMAs in the same order either way.
template <bool kRowMajor = false>
inline void block_f32(const float* a, int64_t a_stride, const float* b, int64_t kc, float* c, int64_t c_rows,
                      int64_t rows, int64_t cols, bool accumulate) {
  __m512 acc[12][2];
  for (int i = 0; i < 12; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(b + k * 32), b1 = _mm512_loadu_ps(b + k * 32 + 16);
    for (int i = 0; i < 12; ++i) {
      const __m512 ai = _mm512_set1_ps(kRowMajor ? a[i * a_stride + k] : a[k * a_stride + i]);
      acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
      acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
    }
  }
  const __mmask16 lo = tail_mask(cols), hi = cols > 16 ? tail_mask(cols - 16) : 0;
  for (int i = 0; i < rows; ++i) {
    float* ci = c + i * c_rows;
    if (accumulate) {
      acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_maskz_loadu_ps(lo, ci));
      acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_maskz_loadu_ps(hi, ci + 16));
    }
    _mm512_mask_storeu_ps(ci, lo, acc[i][0]);
    _mm512_mask_storeu_ps(ci + 16, hi, acc[i][1]);
  }
}

// How the float32 products are cut into work items: per matrix, m_blocks x n_blocks blocks of C, each of
// `panels` panels of 12 rows (the last may be short) and up to kF32Columns columns.
struct BlocksF32 {
  int64_t panels, m_blocks, n_blocks;
  BlocksF32(const Dims& d, int64_t threads) {
    const int64_t row_panels = (d.M + 11) / 12;
    n_blocks = (d.N + kF32Columns - 1) / kF32Columns;
    m_blocks = (row_panels + kF32Panels - 1) / kF32Panels;
    // as many items as threads can share evenly: two threads left with 3 equal items would idle one a third
    while ((d.b1 * d.b2 * m_blocks * n_blocks) % threads && m_blocks < row_panels) ++m_blocks;
    panels = (row_panels + m_blocks - 1) / m_blocks;
    m_blocks = (row_panels + panels - 1) / panels;
  }
};

// Block (mb, nb) of one matrix of C, on this thread's scratch. A's full panels are read in place when its rows are
// contiguous, or its columns with k a short stride apart (packing was ~30% of the time of attention's products
// with 64 columns: those ran 10-20% faster); a short last panel is packed (zeros below), and so are columns k
// 4 KB apart, each k on another page (in place, the scores' transposes over 1024 keys ran 10-40% slower).
inline void block_product_f32(Matrix<float> a, Matrix<float> b, float* c, int64_t c_rows, const Dims& d,
                              const BlocksF32& blocks, int64_t mb, int64_t nb) {
  thread_local std::vector<float> a_packed, b_packed;
  a_packed.resize(12 * kF32Chunk);
  b_packed.resize(kF32Columns * kF32Chunk);
  const int64_t m0 = mb * blocks.panels * 12, m1 = std::min(d.M, m0 + blocks.panels * 12);
  const int64_t n0 = nb * kF32Columns, cols = std::min(kF32Columns, d.N - n0);
  const bool columns_contiguous = a.rows == 1 && a.cols <= kF32InPlaceStride,
             rows_contiguous = a.rows != 1 && a.cols == 1;
  for (int64_t k0 = 0; k0 < d.K; k0 += kF32Chunk) {
    const int64_t kc = std::min(kF32Chunk, d.K - k0);
    pack_b_f32(b, n0, cols, k0, kc, b_packed.data());
    for (int64_t m = m0; m < m1; m += 12) {
      const int64_t rows = std::min<int64_t>(12, m1 - m);
      const bool in_place = rows == 12 && (columns_contiguous || rows_contiguous);
      if (!in_place) pack_a_f32(a, m, rows, k0, kc, a_packed.data());
      for (int64_t p = 0; p * 32 < cols; ++p) {
        const float* bp = b_packed.data() + p * kc * 32;
        float* cp = c + m * c_rows + n0 + p * 32;
        const int64_t width = std::min<int64_t>(32, cols - p * 32);
        if (!in_place)
          block_f32(a_packed.data(), 12, bp, kc, cp, c_rows, rows, width, k0 > 0);
        else if (columns_contiguous)
          block_f32(a.data + m + k0 * a.cols, a.cols, bp, kc, cp, c_rows, rows, width, k0 > 0);
        else
          block_f32<true>(a.data + m * a.rows + k0, a.rows, bp, kc, cp, c_rows, rows, width, k0 > 0);
      }
    }
  }
}

}  // namespace perceiver_ar
