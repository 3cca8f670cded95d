// y[M,N] = x[M,K] @ W for the few rows M of a decode step, as an XLA FFI custom call on the CPU.
//
// XLA's CPU dots are tuned for many rows: at 8 rows a decode step's matmuls cost 2.4x the time of one
// row, though each weight is still read once (benchmarks/decode_matmul.py). These loops read every
// weight once from memory and reuse it across the rows from registers. W is float32 or bfloat16
// (widened to float32 on load: half the bytes read); x and y are float32; sums are float32.
//
//   "kn" layout: W is (K, N), a Dense kernel (in, out). Tiles of 4 rows x 64 columns accumulate in
//                registers over k; the next rows of W are prefetched (a tile walks down a column strip).
//                One float32 row: row panels instead (kn_panel_row), each thread reading long
//                contiguous row segments, 8 rows at a time: 20% faster in a decode step's chain.
//   "nk" layout: W is (N, K), a tied embedding used as the output head (y = x @ E^T). Tiles of 4 rows x
//                4 outputs accumulate 16-wide partial dot products over k, then reduce.
//   "strips":    W is (N/S, K, S): the kn layout cut into strips of S columns (64 bytes a row: 16
//                float32 or 32 bfloat16), each stored contiguously (jaxllm/decode_layout.py packs a
//                model's kernels so once, for inference). A tile of up to 30 rows walks a strip once,
//                reading one contiguous stream that the prefetchers follow, and each weight vector
//                feeds every row as it arrives (benchmarks/decode_matmul.py). One row keeps four
//                sums per vector (k mod 4): with one, each FMA waited on the last and capped the read
//                at about 115 GB/s on two AMD EPYC cores (151 with four, weights in cache), close
//                to what the memory gives when other tenants are quiet (80-86 GB/s). From 8 float32
//                rows on, a tile of up to 14 rows walks two neighbouring strips at once (two
//                streams), so each x value loaded feeds two FMAs: a strip is a GEMM's packed panel,
//                and the loop then runs at 480-500 GFLOP/s from 64 to 512 rows on two AMD EPYC
//                cores (one strip at a time: 290-360), level with or ahead of XLA's dot on the
//                dense kernel, so prefills use it too.
//
// Columns are split over XLA's intra-op thread pool (cpu_kernels.h: parallel_for).
//
// Built on first use by jaxllm/cpu_kernels.py (g++ -O3 -march=native) into one library with the
// other kernels of this folder.
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

constexpr int kRows = 4;         // kn and nk: rows per register tile
constexpr int kPrefetchRows = 16;  // kn: how many rows of W ahead to prefetch
// strips: the most rows per register tile, by vectors per strip row (NV): NV x rows sums and NV
// weight vectors within the 32 vector registers
constexpr int kStripTileRows[3] = {0, 30, 14};
constexpr int kStripPrefetchRows = 64;  // strips: how many rows of the strip ahead to prefetch (4 KiB)
constexpr int64_t kStripBlock = 64;     // strips: rows of W per turn when the rows take several tiles
constexpr int64_t kPairRows = 8;        // strips, float32: from this many rows on, two strips per tile

// strips: whether M rows read strips of W (elements of `w_bytes`) two at a time: float32 ones (strip_columns)
constexpr bool paired(size_t w_bytes, int64_t M) { return w_bytes == 4 && M >= kPairRows; }

// strips: elements from one row of W to the next in a tile reading NV vectors a row, of one strip or
// (kApart) of NV neighbouring 16-column strips
constexpr int64_t row_step(int NV, bool kApart) { return kApart ? 16 : 16 * NV; }

// kn: y[0:MB, 0:16*NV] (row stride ldy) for W (K, row stride ldw), from x (MB, K).
template <int MB, int NV, bool kPrefetch, typename W>
inline void kn_tile(const float* x, int64_t K, const W* w, int64_t ldw, float* y, int64_t ldy) {
  v16 acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = v16{};
  const W* row = w;
  for (int64_t k = 0; k < K; ++k, row += ldw) {
    v16 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load(row + 16 * j);
    if (kPrefetch)
      for (int b = 0; b < NV * 16 * int(sizeof(W)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * ldw) + b);
    for (int m = 0; m < MB; ++m) {
      float xv = x[m * K + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xv * wv[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) store(y + m * ldy + 16 * j, acc[m][j]);
}

// All M rows of one strip of 16*NV columns whose W rows are `ldw` apart.
template <int NV, bool kPrefetch, typename W>
inline void kn_strip(const float* x, int64_t M, int64_t K, const W* w, int64_t ldw, float* y, int64_t N) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows) kn_tile<kRows, NV, kPrefetch>(x + m * K, K, w, ldw, y + m * N, N);
  const float* xm = x + m * K;
  float* ym = y + m * N;
  switch (M - m) {
    case 1: kn_tile<1, NV, kPrefetch>(xm, K, w, ldw, ym, N); break;
    case 2: kn_tile<2, NV, kPrefetch>(xm, K, w, ldw, ym, N); break;
    case 3: kn_tile<3, NV, kPrefetch>(xm, K, w, ldw, ym, N); break;
    default: break;
  }
}

// Columns [lo, hi), in 64-column strips that every row tile reads straight from memory (the strip
// stays in cache between tiles), measured fastest for float32 (benchmarks/decode_matmul.py). For
// bfloat16 W: with 1-2 rows, 128-column strips (256 bytes of each W row, as float32's 64 columns);
// with more than 8 rows, each strip is widened once into a contiguous float32 buffer that the row
// tiles then read, instead of widening it again for every tile.
template <typename W>
void kn_columns(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t lo, int64_t hi) {
  constexpr bool kHalf = sizeof(W) == 2;
  thread_local std::vector<float> packed;
  int64_t n = lo;
  if (kHalf && M <= 2)  // bfloat16 rows are half as long: 128 columns per strip read 256 bytes a row
    for (; n + 128 <= hi; n += 128) kn_strip<8, true>(x, M, K, w + n, N, y + n, N);
  for (; n + 64 <= hi; n += 64) {
    if (!kHalf || M <= 8) {
      kn_strip<4, true>(x, M, K, w + n, N, y + n, N);
      continue;
    }
    packed.resize(size_t(K) * 64);
    for (int64_t k = 0; k < K; ++k) {
      const W* src = w + k * N + n;
      for (int b = 0; b < 64 * int(sizeof(W)); b += 64)
        __builtin_prefetch(reinterpret_cast<const char*>(src + kPrefetchRows * N) + b);
      for (int j = 0; j < 4; ++j) store(packed.data() + k * 64 + 16 * j, load(src + 16 * j));
    }
    kn_strip<4, false>(x, M, K, packed.data(), 64, y + n, N);
  }
  for (; n + 16 <= hi; n += 16) kn_strip<1, true>(x, M, K, w + n, N, y + n, N);
  for (; n < hi; ++n)
    for (int64_t m = 0; m < M; ++m) {
      float sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += x[m * K + k] * widen(w[k * N + n]);
      y[m * N + n] = sum;
    }
}

// Row panels, for one row: y[lo:hi] walked P rows of W at a time, each row's segment [lo, hi) read
// contiguously (P streams at once, which the hardware prefetchers follow), the sums kept in y
// between panels (L1-resident). Measured faster than column strips for one float32 row only (for
// more rows, or bfloat16 W, slower).
template <int P, typename W>
inline void kn_panel_row(const float* x, int64_t K, const W* w, float* y, int64_t N, int64_t lo, int64_t hi) {
  for (int64_t k0 = 0; k0 < K; k0 += P) {
    const int kc = int(std::min<int64_t>(P, K - k0));
    float xv[P];
    for (int kk = 0; kk < P; ++kk) xv[kk] = kk < kc ? x[k0 + kk] : 0.0f;
    const W* wk = w + k0 * N;
    int64_t n = lo;
    for (; n + 16 <= hi; n += 16) {
      v16 acc = k0 ? load(y + n) : v16{};
      if (kc == P)  // a full panel: a constant trip count the compiler unrolls
        for (int kk = 0; kk < P; ++kk) acc += xv[kk] * load(wk + kk * N + n);
      else
        for (int kk = 0; kk < kc; ++kk) acc += xv[kk] * load(wk + kk * N + n);
      store(y + n, acc);
    }
    for (; n < hi; ++n) {
      float sum = k0 ? y[n] : 0.0f;
      for (int kk = 0; kk < kc; ++kk) sum += xv[kk] * widen(wk[kk * N + n]);
      y[n] = sum;
    }
  }
}

// nk: y[0:MB, n0:n0+nb] (nb <= 4) for W (N, K).
template <int MB, typename W>
inline void nk_tile(const float* x, int64_t K, const W* w, int64_t N, float* y, int64_t n0, int nb) {
  v16 acc[MB][4];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = v16{};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    v16 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = j < nb ? load(w + (n0 + j) * K + k) : v16{};
    for (int m = 0; m < MB; ++m) {
      v16 xv = load(x + m * K + k);
      for (int j = 0; j < 4; ++j) acc[m][j] += xv * wv[j];
    }
  }
  v16 parts[16];
  for (int i = 0; i < 16; ++i) parts[i] = i / 4 < MB ? acc[i / 4][i % 4] : v16{};
  v16 sums = lane_sums(parts);
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < nb; ++j) {
      float sum = sums[m * 4 + j];
      for (int64_t kk = k; kk < K; ++kk) sum += x[m * K + kk] * widen(w[(n0 + j) * K + kk]);
      y[m * N + n0 + j] = sum;
    }
}

template <typename W>
void nk_columns(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t lo, int64_t hi) {
  for (int64_t n = lo; n < hi; n += 4) {
    int nb = int(std::min<int64_t>(4, hi - n));
    int64_t m = 0;
    for (; m + kRows <= M; m += kRows) nk_tile<kRows>(x + m * K, K, w, N, y + m * N, n, nb);
    const float* xm = x + m * K;
    float* ym = y + m * N;
    switch (M - m) {
      case 1: nk_tile<1>(xm, K, w, N, ym, n, nb); break;
      case 2: nk_tile<2>(xm, K, w, N, ym, n, nb); break;
      case 3: nk_tile<3>(xm, K, w, N, ym, n, nb); break;
      default: break;
    }
  }
}

// A row of a bfloat16 strip (32 columns, 64 bytes) read as 16 32-bit lanes, lane i holding columns 2i
// (low half) and 2i+1 (high half): a shift and a mask widen both halves in place, two plain vector
// operations per row where widening each 16-column half with a zero-extending shuffle took two
// shuffles, which fewer ports run. Sums are then kept for the even and the odd columns, and
// interleaved back only when a tile stores them.
typedef uint32_t u16_unaligned __attribute__((vector_size(64), aligned(2)));

inline void load_even_odd(const uint16_t* w, v16& even, v16& odd) {
  const u16 bits = *reinterpret_cast<const u16_unaligned*>(w);
  const u16 lo = bits << 16, hi = bits & 0xFFFF0000u;
  std::memcpy(&even, &lo, sizeof(even));
  std::memcpy(&odd, &hi, sizeof(odd));
}

// y[0:32] split into its even and its odd columns.
inline void load_split(const float* y, v16& even, v16& odd) {
  const v16 a = load(y), b = load(y + 16);
  even = __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  odd = __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// y[0:32] = the even and the odd columns' values, interleaved.
inline void store_even_odd(float* y, v16 even, v16 odd) {
  store(y, __builtin_shufflevector(even, odd, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23));
  store(y + 16, __builtin_shufflevector(even, odd, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// Strips: y[0:R, 0:16 NV] (+)= x[0:R, 0:kb] (rows ldx apart) times kb rows of W, 16 NV columns. R rows
// x NV vectors of sums stay in registers, so each W vector loaded feeds R FMAs at once, and a tile's
// reads stream through the strip. The NV vectors of a row of W are one strip's row (kApart false: rows
// 16 NV apart), or the same row of NV neighbouring 16-column strips, each a stream of its own (kApart:
// rows 16 apart, strips `apart` elements apart), which lets float32's narrow strips feed two vectors
// of sums per x value loaded when there are enough rows to pay for it. A bfloat16 strip row of 32
// columns is widened as even and odd columns (load_even_odd).
template <int R, int NV, bool kPrefetch, bool kApart, typename W>
void strip_tile(const float* x, int64_t ldx, int64_t kb, const W* w, int64_t apart, float* y, int64_t ldy,
                bool accumulate) {
  constexpr bool kEvenOdd = sizeof(W) == 2 && NV == 2 && !kApart;
  constexpr int64_t kRowStep = row_step(NV, kApart);
  const int64_t vec = kApart ? apart : 16;             // elements from one vector of a row to the next
  auto load_row = [&](const W* row, v16* wv) {
    if constexpr (kEvenOdd)
      load_even_odd(row, wv[0], wv[1]);
    else
      for (int j = 0; j < NV; ++j) wv[j] = load(row + j * vec);
  };
  auto load_sums = [&](const float* out, v16* sums) {  // y's values, as the sums hold them
    if constexpr (kEvenOdd)
      load_split(out, sums[0], sums[1]);
    else
      for (int j = 0; j < NV; ++j) sums[j] = load(out + 16 * j);
  };
  auto store_sums = [&](float* out, const v16* sums) {
    if constexpr (kEvenOdd)
      store_even_odd(out, sums[0], sums[1]);
    else
      for (int j = 0; j < NV; ++j) store(out + 16 * j, sums[j]);
  };
  if constexpr (R == 1 && !kApart) {  // one row: 4 sums per vector, so the FMAs' latency never limits the read rate
    v16 acc[4][NV] = {};
    int64_t k = 0;
    for (; k + 4 <= kb; k += 4, w += 64 * NV)
#pragma GCC unroll 8
      for (int u = 0; u < 4; ++u) {
        v16 wv[NV];
        load_row(w + 16 * NV * u, wv);
        for (int j = 0; j < NV; ++j) acc[u][j] += x[k + u] * wv[j];
      }
    for (; k < kb; ++k, w += 16 * NV) {
      v16 wv[NV];
      load_row(w, wv);
      for (int j = 0; j < NV; ++j) acc[0][j] += x[k] * wv[j];
    }
    v16 sums[NV] = {};
    if (accumulate) load_sums(y, sums);
    for (int j = 0; j < NV; ++j) sums[j] += (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]);
    store_sums(y, sums);
    return;
  }
  v16 acc[R][NV] = {};
  if (accumulate)
#pragma GCC unroll 32
    for (int m = 0; m < R; ++m) load_sums(y + m * ldy, acc[m]);
  for (int64_t k = 0; k < kb; ++k, w += kRowStep) {
    v16 wv[NV];
    load_row(w, wv);
    if (kPrefetch) {
      if constexpr (kApart)
        for (int j = 0; j < NV; ++j) __builtin_prefetch(w + j * vec + kStripPrefetchRows * kRowStep);
      else
        for (int b = 0; b < 16 * NV * int(sizeof(W)); b += 64)
          __builtin_prefetch(reinterpret_cast<const char*>(w + kStripPrefetchRows * kRowStep) + b);
    }
#pragma GCC unroll 32
    for (int m = 0; m < R; ++m) {
      float xv = x[m * ldx + k];
      for (int j = 0; j < NV; ++j) acc[m][j] += xv * wv[j];
    }
  }
#pragma GCC unroll 32
  for (int m = 0; m < R; ++m) store_sums(y + m * ldy, acc[m]);
}

template <typename W>
using StripTile = void (*)(const float*, int64_t, int64_t, const W*, int64_t, float*, int64_t, bool);

// strip_tile<1..sizeof...(R), NV, kPrefetch, kApart>, indexed by rows - 1.
template <int NV, bool kPrefetch, bool kApart, typename W, int... R>
constexpr std::array<StripTile<W>, sizeof...(R)> strip_tiles(std::integer_sequence<int, R...>) {
  return {&strip_tile<R + 1, NV, kPrefetch, kApart, W>...};
}

// Tiles of up to kStripTileRows[NV] rows over a group of columns whose vectors `tile` reads: one tile
// walks the group once (every W vector feeding all the rows as it arrives: the FMAs keep pace with
// memory instead of waiting on it); more rows split into equal tiles that take turns over blocks of
// kStripBlock rows of W, so the block read by the first tile is still in L1 for the others.
template <int NV, bool kApart, typename W>
void strip_group(const StripTile<W>* tiles, const float* x, int64_t M, int64_t K, const W* w, int64_t apart,
                 float* y, int64_t N) {
  constexpr int kMax = kStripTileRows[NV];
  const int64_t count = (M + kMax - 1) / kMax, rows = (M + count - 1) / count;
  const int64_t block = count == 1 ? K : kStripBlock;
  for (int64_t k0 = 0; k0 < K; k0 += block) {
    const int64_t kb = std::min(block, K - k0);
    for (int64_t m = 0; m < M; m += rows)
      tiles[std::min(rows, M - m) - 1](x + m * K + k0, K, kb, w + k0 * row_step(NV, kApart), apart, y + m * N, N,
                                       k0 > 0);
  }
}

// Strips [lo, hi) / (16 NV) of a (N / (16 NV), K, 16 NV) W, one at a time; or, for float32 W and at
// least kPairRows rows, two neighbouring strips at a time (kApart tiles: each x value loaded feeds two
// FMAs). One row runs without software prefetch, as it measured faster in the earlier 64-column layout.
template <int NV, typename W>
void strip_columns(const float* x, int64_t M, int64_t K, const W* w, int64_t N, float* y, int64_t lo, int64_t hi) {
  constexpr int S = 16 * NV;
  constexpr auto seq = [] { return std::make_integer_sequence<int, kStripTileRows[NV]>{}; };
  static constexpr auto prefetched = strip_tiles<NV, true, false, W>(seq());
  static constexpr auto plain = strip_tiles<NV, false, false, W>(seq());
  int64_t n = lo;
  if constexpr (NV == 1 && sizeof(W) == 4) {
    static constexpr auto pairs = strip_tiles<2, true, true, W>(std::make_integer_sequence<int, kStripTileRows[2]>{});
    if (paired(sizeof(W), M))
      for (; n + 2 * S <= hi; n += 2 * S) strip_group<2, true>(pairs.data(), x, M, K, w + n * K, S * K, y + n, N);
  }
  const auto& tiles = M == 1 ? plain : prefetched;
  for (; n < hi; n += S) strip_group<NV, false>(tiles.data(), x, M, K, w + n * K, 0, y + n, N);
}

template <bool kNK, typename W>
ffi::Error run(ffi::ThreadPool& pool, const float* x, const W* w, float* y, int64_t M, int64_t K, int64_t N) {
  if constexpr (kNK)
    parallel_for(pool, N, 4, [=](int64_t lo, int64_t hi) { nk_columns(x, M, K, w, N, y, lo, hi); });
  else if (sizeof(W) == 4 && M == 1)  // row panels, one chunk of columns per thread
    parallel_for(pool, N, 16, [=](int64_t lo, int64_t hi) { kn_panel_row<8>(x, K, w, y, N, lo, hi); }, 1);
  else
    parallel_for(pool, N, 64, [=](int64_t lo, int64_t hi) { kn_columns(x, M, K, w, N, y, lo, hi); });
  return ffi::Error::Success();
}

// W's elements as the loops read them: float, or bfloat16 as its 16 bits.
template <ffi::DataType T>
auto* weights(ffi::Buffer<T>& w) {
  using W = std::conditional_t<T == ffi::BF16, uint16_t, float>;
  return reinterpret_cast<const W*>(w.untyped_data());
}

template <bool kNK, ffi::DataType T>
ffi::Error matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || wd[kNK ? 1 : 0] != xd[1])
    return ffi::Error::InvalidArgument("few_row_matmul: x must be (M, K) and W (K, N), or (N, K) for nk");
  int64_t M = xd[0], K = xd[1], N = kNK ? wd[0] : wd[1];
  return run<kNK>(pool, x.typed_data(), weights(w), y->typed_data(), M, K, N);
}

template <ffi::DataType T>
ffi::Error strips(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 3 || wd[1] != xd[1] || (wd[2] != 16 && wd[2] != 32))
    return ffi::Error::InvalidArgument("few_row_matmul strips: x must be (M, K) and W (N/S, K, S), S 16 or 32");
  const int64_t M = xd[0], K = xd[1], S = wd[2], N = wd[0] * S;
  const float* xp = x.typed_data();
  auto* wp = weights(w);
  float* yp = y->typed_data();
  if (S == 16)  // chunks of whole pairs of strips where strip_columns pairs them
    parallel_for(pool, N, paired(sizeof(*wp), M) ? 2 * S : S,
                 [=](int64_t lo, int64_t hi) { strip_columns<1>(xp, M, K, wp, N, yp, lo, hi); });
  else
    parallel_for(pool, N, S, [=](int64_t lo, int64_t hi) { strip_columns<2>(xp, M, K, wp, N, yp, lo, hi); });
  return ffi::Error::Success();
}

template <ffi::DataType T>
constexpr auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulKnF32, (jaxllm::matmul<false, xla::ffi::F32>), jaxllm::binding<xla::ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulNkF32, (jaxllm::matmul<true, xla::ffi::F32>), jaxllm::binding<xla::ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulKnBf16, (jaxllm::matmul<false, xla::ffi::BF16>), jaxllm::binding<xla::ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulStripsF32, jaxllm::strips<xla::ffi::F32>, jaxllm::binding<xla::ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulStripsBf16, jaxllm::strips<xla::ffi::BF16>, jaxllm::binding<xla::ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmulNkBf16, (jaxllm::matmul<true, xla::ffi::BF16>), jaxllm::binding<xla::ffi::BF16>());
