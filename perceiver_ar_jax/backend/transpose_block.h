// 8 x 8 blocks of 2- and 4-byte elements transposed in registers, for the CPU kernels of this folder.
#pragma once
#include <immintrin.h>
#include <cstdint>

namespace perceiver_ar {

// 8 x 8 blocks in registers: rows of x at stride C, rows of y at stride R.
inline void block8(const uint16_t* x, uint16_t* y, int64_t C, int64_t R) {
  __m128i r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm_loadu_si128((const __m128i*)(x + i * C));
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      b[4 * i + j] = _mm_unpacklo_epi32(a[4 * i + j], a[4 * i + j + 2]);
      b[4 * i + j + 2] = _mm_unpackhi_epi32(a[4 * i + j], a[4 * i + j + 2]);
    }
  // b[0] = cols 0,1 of rows 0-3; b[1] = cols 4,5; b[2] = cols 2,3; b[3] = cols 6,7; b[4..7] the same for rows 4-7
  const int col_of[4] = {0, 4, 2, 6};
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_si128((__m128i*)(y + col_of[j] * R), _mm_unpacklo_epi64(b[j], b[j + 4]));
    _mm_storeu_si128((__m128i*)(y + (col_of[j] + 1) * R), _mm_unpackhi_epi64(b[j], b[j + 4]));
  }
}

inline void block8(const uint32_t* x, uint32_t* y, int64_t C, int64_t R) {
  __m256 r[8], a[8], b[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps((const float*)(x + i * C));
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    b[4 * i + 0] = _mm256_shuffle_ps(a[4 * i], a[4 * i + 2], 0x44);
    b[4 * i + 1] = _mm256_shuffle_ps(a[4 * i], a[4 * i + 2], 0xEE);
    b[4 * i + 2] = _mm256_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0x44);
    b[4 * i + 3] = _mm256_shuffle_ps(a[4 * i + 1], a[4 * i + 3], 0xEE);
  }
  for (int j = 0; j < 4; ++j) {
    _mm256_storeu_ps((float*)(y + j * R), _mm256_permute2f128_ps(b[j], b[j + 4], 0x20));
    _mm256_storeu_ps((float*)(y + (j + 4) * R), _mm256_permute2f128_ps(b[j], b[j + 4], 0x31));
  }
}

}  // namespace perceiver_ar
