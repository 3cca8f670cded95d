// dW[K,N] = x[M,K]^T @ dy[M,N]: a Dense layer's weight gradient in training, as an XLA FFI custom call
// on the CPU, float32.
//
// XLA hands this dot (both operands contracted over their leading M rows) to Eigen, not YNNPACK, and
// Eigen split it poorly at a small model's shapes: on two AMD EPYC cores a (128 x 384) gradient over
// 2,048 rows took 1.0 ms, as long as on one core, where a plain dot of the same FLOPs took 0.5 ms.
//
// Columns of dW are split into blocks of 32 (and those into ranges of dW's rows when there are few)
// over XLA's intra-op pool (cpu_kernels.h: parallel_for). For each block, rows of M are taken kMBlock
// at a time: dy's 32 columns of those rows are copied into a contiguous panel (zero-padded past N),
// which then stays in L1 while tiles of 8 rows of dW x 32 columns (16 vectors of sums in registers)
// walk it, each panel row feeding 16 FMAs from 2 loads and 8 broadcasts of x.
//
// Built on first use by jaxllm/cpu_kernels.py (g++ -O3 -march=native) into one library with the
// other kernels of this folder.
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

constexpr int kCols = 32;          // columns of dW per block: two vectors
constexpr int kTileRows = 8;       // rows of dW (k) per register tile
constexpr int64_t kMBlock = 128;   // rows of M per panel: 16 KiB of dy, within L1

// dW[k0:k0+KR, 0:32] (+)= x[0:mb, k0:k0+KR]^T @ panel[0:mb, 0:32], x rows ldx apart.
template <int KR>
inline void tile(const float* x, int64_t ldx, const float* panel, int64_t mb, float* out, bool accumulate) {
  v16 acc[KR][2];
  for (int r = 0; r < KR; ++r)
    for (int j = 0; j < 2; ++j) acc[r][j] = accumulate ? load(out + r * kCols + 16 * j) : v16{};
  for (int64_t m = 0; m < mb; ++m, x += ldx, panel += kCols) {
    const v16 d0 = load(panel), d1 = load(panel + 16);
#pragma GCC unroll 8
    for (int r = 0; r < KR; ++r) {
      const float xv = x[r];
      acc[r][0] += xv * d0;
      acc[r][1] += xv * d1;
    }
  }
  for (int r = 0; r < KR; ++r)
    for (int j = 0; j < 2; ++j) store(out + r * kCols + 16 * j, acc[r][j]);
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, bool);
constexpr Tile kTiles[kTileRows] = {&tile<1>, &tile<2>, &tile<3>, &tile<4>, &tile<5>, &tile<6>, &tile<7>, &tile<8>};

// dW[k_lo:k_hi, n0:n0+32] (fewer columns at the end of a row).
void block(const float* x, const float* dy, float* dw, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t k_lo,
           int64_t k_hi) {
  thread_local std::vector<float> panel, sums;
  panel.resize(size_t(kMBlock) * kCols);
  sums.resize(size_t(k_hi - k_lo) * kCols);  // the block's sums, dW's rows k_lo.. of them
  const int64_t width = std::min<int64_t>(kCols, N - n0);
  for (int64_t m0 = 0; m0 < M; m0 += kMBlock) {
    const int64_t mb = std::min(kMBlock, M - m0);
    for (int64_t m = 0; m < mb; ++m) {  // the panel: dy[m0:m0+mb, n0:n0+32], zeros past N
      const float* src = dy + (m0 + m) * N + n0;
      float* row = panel.data() + m * kCols;
      if (width == kCols) {
        store(row, load(src));
        store(row + 16, load(src + 16));
      } else {
        for (int c = 0; c < kCols; ++c) row[c] = c < width ? src[c] : 0.0f;
      }
    }
    for (int64_t k0 = k_lo; k0 < k_hi; k0 += kTileRows) {
      const int kr = int(std::min<int64_t>(kTileRows, k_hi - k0));
      kTiles[kr - 1](x + m0 * K + k0, K, panel.data(), mb, sums.data() + (k0 - k_lo) * kCols, m0 > 0);
    }
  }
  for (int64_t k = k_lo; k < k_hi; ++k)
    std::memcpy(dw + k * N + n0, sums.data() + (k - k_lo) * kCols, sizeof(float) * size_t(width));
}

ffi::Error weight_grad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                       ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions();
  auto yd = dy.dimensions();
  if (xd.size() != 2 || yd.size() != 2 || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("weight_grad: x must be (M, K) and dy (M, N)");
  const int64_t M = xd[0], K = xd[1], N = yd[1];
  const float* xp = x.typed_data();
  const float* yp = dy.typed_data();
  float* wp = dw->typed_data();
  if (M == 0 || K == 0 || N == 0) {
    std::fill(wp, wp + K * N, 0.0f);
    return ffi::Error::Success();
  }
  // Work items: column blocks, each cut into row ranges of dW when there are too few blocks to give
  // every thread several (a gradient with 128 columns has 4 blocks).
  const int64_t blocks = (N + kCols - 1) / kCols;
  const int64_t want = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t tiles = (K + kTileRows - 1) / kTileRows;
  const int64_t splits = std::min(tiles, (want + blocks - 1) / blocks);
  const int64_t k_step = (tiles + splits - 1) / splits * kTileRows;
  parallel_for(pool, blocks * splits, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const int64_t k_lo = (i % splits) * k_step;
      if (k_lo < K) block(xp, yp, wp, M, K, N, (i / splits) * kCols, k_lo, std::min(K, k_lo + k_step));
    }
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightGradF32, jaxllm::weight_grad,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
