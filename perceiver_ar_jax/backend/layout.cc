// Results XLA cannot fold into their consumers: a custom call's result is a buffer of its own, row-major.
//
// Transpose, y (..., C, R) = x (..., R, C) with the last two axes swapped, for 2- and 4-byte elements: XLA:CPU
// multiplies a matrix whose contracted axis is its leading one (the weight gradient x^T g of a dense layer) 3-6x
// slower than a row-major operand, and its layout assignment turns every transpose written in HLO back into
// exactly that operand; and its transposing fusions (attention's gradients, out of the (heads, head_dim, n)
// layout its products leave them in) read one side with a stride, several times slower than 8 x 8 blocks.
// Copy, y = x: XLA fuses an elementwise producer into each of its consumers and recomputes it per consumer
// element; for cos and sin broadcast over attention heads that is most of a fusion's time.
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include "parallel_for.h"
#include "transpose_block.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;  // a 64 x 64 tile of either element size fits in L1 twice over

// Rows r0 .. r0 + kTile - 1 of x into columns of y, tile by tile; 8 x 8 blocks in registers, the edges one by one.
template <typename T>
void tile_rows(const T* x, T* y, int64_t R, int64_t C, int64_t r0) {
  const int64_t r1 = std::min(r0 + kTile, R);
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t c1 = std::min(c0 + kTile, C);
    int64_t r = r0;
    for (; r + 8 <= r1; r += 8) {
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) perceiver_ar::block8(x + r * C + c, y + c * R + r, C, R);
      for (; c < c1; ++c)
        for (int64_t i = r; i < r + 8; ++i) y[c * R + i] = x[i * C + c];
    }
    for (; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) y[c * R + r] = x[r * C + c];
  }
}

// Every matrix of the batch, a tile of kTile rows per work item.
template <typename T>
ffi::Error run(ffi::ThreadPool pool, const T* x, T* y, int64_t batch, int64_t R, int64_t C) {
  const int64_t tiles = (R + kTile - 1) / kTile;
  perceiver_ar::parallel_for(pool, batch * tiles, [=](int64_t i) {
    const int64_t b = i / tiles;
    tile_rows(x + b * R * C, y + b * R * C, R, C, (i % tiles) * kTile);
  });
  return ffi::Error::Success();
}

ffi::Error Transpose(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  auto xd = x.dimensions(), yd = y->dimensions();
  const size_t n = xd.size();
  bool ok = n >= 2 && yd.size() == n && yd[n - 2] == xd[n - 1] && yd[n - 1] == xd[n - 2] &&
            x.element_type() == y->element_type();
  int64_t batch = 1;
  for (size_t i = 0; ok && i + 2 < n; ++i) {
    ok = xd[i] == yd[i];
    batch *= xd[i];
  }
  if (!ok) return ffi::Error::InvalidArgument("transpose: x (..., R, C) and y (..., C, R) of one dtype expected");
  const int64_t R = xd[n - 2], C = xd[n - 1];
  switch (ffi::ByteWidth(x.element_type())) {
    case 2: return run(pool, (const uint16_t*)x.untyped_data(), (uint16_t*)y->untyped_data(), batch, R, C);
    case 4: return run(pool, (const uint32_t*)x.untyped_data(), (uint32_t*)y->untyped_data(), batch, R, C);
    default: return ffi::Error::InvalidArgument("transpose: 2- or 4-byte elements expected");
  }
}

ffi::Error Copy(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.size_bytes() != y->size_bytes()) return ffi::Error::InvalidArgument("copy: x and y of one size expected");
  std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArCopy, Copy, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(PerceiverArTranspose, Transpose,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
