// Attention's products: for every (b1, b2) of two batch axes, C (M, N) = A (M, K) @ B (K, N), float32
// accumulation, a float32 or bf16 (rounded to nearest even) result. bf16 operands run on the AMX tile units of
// Intel CPUs (Sapphire Rapids and later), float32 ones on AVX-512 FMAs. Every operand is addressed through element
// strides, so the products read and write the model's own (batch, n, heads, head_dim) and (batch, heads, queries,
// keys) layouts, with either axis of A or B the contracted one; only C's columns must be contiguous. bf16: M, N and
// K multiples of 32 (the caller uses XLA otherwise); float32: any sizes.
//
// Why: XLA:CPU runs these batched products of 64-1024 wide matrices at 230-500 GFLOP/s in bf16 (oneDNN, in torch,
// at 700-1200 on the same CPU) and 75-200 in float32 (torch: 200-300), those with a transposed operand (the key
// and value gradients) slowest.
//
// bf16: each work item is one (b1, b2); B is packed whole into panels of 16 columns with k-pairs interleaved (the
// "VNNI" layout TDPBF16PS multiplies), then A 32 rows at a time into 16 x 32 tiles, each a contiguous 1 KB, and
// the product runs in 32 x 32 blocks of C (four accumulator tiles) over all of K. A whose contracted axis is not
// contiguous (the transposed operand) is packed through 8 x 8 register transposes. float32: blocked (below).
//
// `emulate` runs the same packing with a scalar loop in place of the tile instructions, on any CPU: for tests.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#include "batched_matmul_f32.h"
#include "parallel_for.h"
#include "transpose_block.h"
#include "vector_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using perceiver_ar::BlocksF32;
using perceiver_ar::Dims;
using perceiver_ar::Matrix;
using perceiver_ar::block_product_f32;

#if defined(__clang__) ? (__clang_major__ >= 12) : (__GNUC__ >= 11)
#define HAVE_AMX 1
#define AMX __attribute__((target("amx-tile,amx-bf16")))
#else
#define HAVE_AMX 0
#define AMX
#endif

// A's rows [m0, m0 + 32) over all K -> [2 halves][K / 32][16 rows][32]
void pack_a(Matrix<uint16_t> a, int64_t K, int64_t m0, uint16_t* out) {
  auto dst = [&](int64_t m, int64_t k) { return out + (((m / 16) * (K / 32) + k / 32) * 16 + m % 16) * 32 + k % 32; };
  if (a.cols == 1) {  // rows contiguous
    for (int64_t m = 0; m < 32; ++m)
      for (int64_t k = 0; k < K; k += 32) std::memcpy(dst(m, k), a.data + (m0 + m) * a.rows + k, 64);
  } else if (a.rows == 1) {  // stored transposed: the 8 rows of m that follow each other are contiguous
    for (int64_t m = 0; m < 32; m += 8)
      for (int64_t k = 0; k < K; k += 8) perceiver_ar::block8(a.data + k * a.cols + m0 + m, dst(m, k), a.cols, 32);
  } else {
    for (int64_t m = 0; m < 32; ++m)
      for (int64_t k = 0; k < K; ++k) *dst(m, k) = a.at(m0 + m, k);
  }
}

// B (K, N) -> N / 16 panels of [K / 2][16 columns][2]: row kk of a panel holds, per column, b[2kk] and b[2kk + 1]
void pack_b(Matrix<uint16_t> b, int64_t K, int64_t N, uint16_t* out) {
  for (int64_t p = 0; p < N / 16; ++p) {
    uint32_t* o = reinterpret_cast<uint32_t*>(out + p * K * 16);
    if (b.cols == 1) {  // rows contiguous: interleave rows 2kk and 2kk + 1
      for (int64_t kk = 0; kk < K / 2; ++kk) {
        const uint16_t* even = b.data + 2 * kk * b.rows + p * 16;
        __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)even));
        __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(even + b.rows)));
        _mm512_storeu_si512(o + kk * 16, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    } else if (b.rows == 1) {  // columns contiguous: a column's k-pair is one 32-bit word
      for (int64_t j = 0; j < 16; ++j) {
        const uint16_t* column = b.data + (p * 16 + j) * b.cols;
        for (int64_t kk = 0; kk < K / 2; ++kk) std::memcpy(o + kk * 16 + j, column + 2 * kk, 4);
      }
    } else {
      for (int64_t kk = 0; kk < K / 2; ++kk)
        for (int64_t j = 0; j < 16; ++j)
          o[kk * 16 + j] = b.at(2 * kk, p * 16 + j) | (uint32_t(b.at(2 * kk + 1, p * 16 + j)) << 16);
    }
  }
}

inline float widen(uint16_t x) {
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// The 32 x 32 block of C at columns [16 p, 16 p + 32) into acc (row stride 32): packed A block x panels p, p + 1.
#if HAVE_AMX
AMX void block_amx(const uint16_t* a_block, const uint16_t* b_packed, int64_t K, int64_t p, float* acc) {
  const uint16_t* a0 = a_block;
  const uint16_t* a1 = a_block + K * 16;
  const uint16_t* b0 = b_packed + p * K * 16;
  const uint16_t* b1 = b0 + K * 16;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    _tile_loadd(4, a0 + k * 16, 64);
    _tile_loadd(5, a1 + k * 16, 64);
    _tile_loadd(6, b0 + k * 16, 64);
    _tile_loadd(7, b1 + k * 16, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, acc, 128);
  _tile_stored(1, acc + 16, 128);
  _tile_stored(2, acc + 16 * 32, 128);
  _tile_stored(3, acc + 16 * 32 + 16, 128);
}

AMX void configure_tiles() {  // eight 16 x 64-byte tiles
  struct {
    uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

AMX void release_tiles() { _tile_release(); }
#endif

void block_emulated(const uint16_t* a_block, const uint16_t* b_packed, int64_t K, int64_t p, float* acc) {
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t j = 0; j < 32; ++j) {
      const uint16_t* a = a_block + (i / 16) * K * 16 + (i % 16) * 32;
      const uint16_t* b = b_packed + (p + j / 16) * K * 16 + (j % 16) * 2;
      float sum = 0;
      for (int64_t k = 0; k < K; k += 2) {
        const uint16_t* ak = a + (k / 32) * 16 * 32 + k % 32;
        const uint16_t* bk = b + (k / 2) * 32;
        sum += widen(ak[0]) * widen(bk[0]) + widen(ak[1]) * widen(bk[1]);
      }
      acc[i * 32 + j] = sum;
    }
}

// acc (32 x 32, row stride 32) -> C's rows of stride `rows`, as float32 or rounded to bf16
void store(const float* acc, void* c, int64_t rows, bool bf16) {
  for (int64_t i = 0; i < 32; ++i)
    for (int64_t j = 0; j < 32; j += 16) {
      __m512 v = _mm512_loadu_ps(acc + i * 32 + j);
      if (bf16) perceiver_ar::store_bf16(static_cast<uint16_t*>(c) + i * rows + j, 0xFFFF, v);
      else _mm512_storeu_ps(static_cast<float*>(c) + i * rows + j, v);
    }
}

// One (b1, b2) product, on this thread's scratch.
void product(Matrix<uint16_t> a, Matrix<uint16_t> b, char* c, int64_t c_rows, size_t c_bytes, Dims d, bool emulate) {
  thread_local std::vector<uint16_t> b_packed, a_block;
  thread_local float acc[32 * 32];
  b_packed.resize(d.K * d.N);
  a_block.resize(32 * d.K);
  pack_b(b, d.K, d.N, b_packed.data());
#if HAVE_AMX
  if (!emulate) configure_tiles();
#endif
  for (int64_t m0 = 0; m0 < d.M; m0 += 32) {
    pack_a(a, d.K, m0, a_block.data());
    for (int64_t p = 0; p < d.N / 16; p += 2) {
#if HAVE_AMX
      if (!emulate) block_amx(a_block.data(), b_packed.data(), d.K, p, acc);
      else
#endif
        block_emulated(a_block.data(), b_packed.data(), d.K, p, acc);
      store(acc, c + (m0 * c_rows + p * 16) * c_bytes, c_rows, c_bytes == 2);
    }
  }
#if HAVE_AMX
  if (!emulate) release_tiles();
#endif
}

// Matrix (i1, i2) of a batched operand whose strides are (b1, b2, rows, cols)
template <typename T>
Matrix<T> batch_item(const void* data, ffi::Span<const int64_t> strides, int64_t i1, int64_t i2) {
  return {static_cast<const T*>(data) + i1 * strides[0] + i2 * strides[1], strides[2], strides[3]};
}

// The largest element offset the strides reach, below the buffer's size.
bool within(ffi::Span<const int64_t> strides, std::initializer_list<int64_t> dims, int64_t size) {
  int64_t last = 0, i = 0;
  for (int64_t dim : dims) {
    if (strides[i] < 0) return false;
    last += (dim - 1) * strides[i++];
  }
  return last < size;
}

ffi::Error BatchedMatmul(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
                         ffi::Result<ffi::AnyBuffer> c, ffi::Span<const int64_t> dims,
                         ffi::Span<const int64_t> a_strides, ffi::Span<const int64_t> b_strides,
                         ffi::Span<const int64_t> c_strides, bool emulate) {
  if (dims.size() != 5 || a_strides.size() != 4 || b_strides.size() != 4 || c_strides.size() != 4)
    return ffi::Error::InvalidArgument("batched_matmul: dims (b1, b2, M, N, K) and 4 strides per operand expected");
  const Dims d{dims[0], dims[1], dims[2], dims[3], dims[4]};
  const auto type = c->element_type(), operands = a.element_type();
  const size_t c_bytes = type == ffi::DataType::F32 ? 4 : type == ffi::DataType::BF16 ? 2 : 0;
  if (c_bytes == 0) return ffi::Error::InvalidArgument("batched_matmul: a float32 or bf16 result expected");
  const bool f32 = operands == ffi::DataType::F32;
  if (b.element_type() != operands || !(f32 || operands == ffi::DataType::BF16) || (f32 && c_bytes != 4))
    return ffi::Error::InvalidArgument("batched_matmul: bf16 operands, or float32 ones with a float32 result");
  if (d.b1 < 1 || d.b2 < 1 || d.M < 1 || d.N < 1 || d.K < 1 || c_strides[3] != 1)
    return ffi::Error::InvalidArgument("batched_matmul: positive sizes and C's columns contiguous expected");
  if (!f32 && (d.M % 32 || d.N % 32 || d.K % 32))
    return ffi::Error::InvalidArgument("batched_matmul: bf16 operands with M, N, K multiples of 32 expected");
  if (!within(a_strides, {d.b1, d.b2, d.M, d.K}, a.element_count()) ||
      !within(b_strides, {d.b1, d.b2, d.K, d.N}, b.element_count()) ||
      !within(c_strides, {d.b1, d.b2, d.M, d.N}, c->element_count()))
    return ffi::Error::InvalidArgument("batched_matmul: strides reach past an operand");
#if !HAVE_AMX
  if (!f32 && !emulate) return ffi::Error::InvalidArgument("batched_matmul: built without AMX support");
#endif
  const void* a_data = a.untyped_data();
  const void* b_data = b.untyped_data();
  char* c_data = static_cast<char*>(c->untyped_data());
  if (f32) {
    const BlocksF32 blocks(d, std::max<int64_t>(1, pool.num_threads()));
    const int64_t per_matrix = blocks.m_blocks * blocks.n_blocks;
    perceiver_ar::parallel_for(pool, d.b1 * d.b2 * per_matrix, [=](int64_t i) {
      const int64_t matrix = i / per_matrix, i1 = matrix / d.b2, i2 = matrix % d.b2;
      float* ci = reinterpret_cast<float*>(c_data) + i1 * c_strides[0] + i2 * c_strides[1];
      block_product_f32(batch_item<float>(a_data, a_strides, i1, i2), batch_item<float>(b_data, b_strides, i1, i2),
                        ci, c_strides[2], d, blocks, i % per_matrix % blocks.m_blocks,
                        i % per_matrix / blocks.m_blocks);
    });
    return ffi::Error::Success();
  }
  perceiver_ar::parallel_for(pool, d.b1 * d.b2, [=](int64_t i) {
    const int64_t i1 = i / d.b2, i2 = i % d.b2;
    product(batch_item<uint16_t>(a_data, a_strides, i1, i2), batch_item<uint16_t>(b_data, b_strides, i1, i2),
            c_data + (i1 * c_strides[0] + i2 * c_strides[1]) * c_bytes, c_strides[2], c_bytes, d, emulate);
  });
  return ffi::Error::Success();
}

}  // namespace

// 1 when this CPU has AMX tiles with bf16 products and the kernel lets this process use them, else 0.
extern "C" int PerceiverArAmxAvailable() {
#if HAVE_AMX
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return 0;
  const bool amx_bf16 = edx & (1u << 22), amx_tile = edx & (1u << 24);
  if (!amx_bf16 || !amx_tile) return 0;
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0 ? 1 : 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArBatchedMatmul, BatchedMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<ffi::Span<const int64_t>>("a_strides")
                                  .Attr<ffi::Span<const int64_t>>("b_strides")
                                  .Attr<ffi::Span<const int64_t>>("c_strides")
                                  .Attr<bool>("emulate"));
