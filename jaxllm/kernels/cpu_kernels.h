// What jaxllm's CPU kernels share: GCC generic vectors of 16 floats (AVX-512, AVX2 or NEON alike),
// bfloat16 <-> float32, reductions over lanes, e^x, and a parallel loop on XLA's intra-op thread pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxllm {

namespace ffi = xla::ffi;

typedef float v16 __attribute__((vector_size(64)));
typedef float v16_unaligned __attribute__((vector_size(64), aligned(4)));
typedef uint16_t h16_unaligned __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u16 __attribute__((vector_size(64)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16_unaligned*>(p); }
inline v16 load(const uint16_t* p) {  // bfloat16 -> float32: the 16 bits become the high half
  u16 bits = __builtin_convertvector(*reinterpret_cast<const h16_unaligned*>(p), u16) << 16;
  v16 out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline void store(float* p, v16 v) { *reinterpret_cast<v16_unaligned*>(p) = v; }
inline float widen(float v) { return v; }
inline float widen(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}
inline float narrow(float v, float*) { return v; }
inline uint16_t narrow(float v, uint16_t*) {  // float32 -> bfloat16, rounded to nearest even (as XLA)
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
// out[i] = the sum of a[i]'s 16 lanes, for 16 vectors at once: four rounds of adding the halves of
// pairs (15 vector adds, no scalar lane loops).
inline v16 lane_sums(const v16 (&a)[16]) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The largest and the sum of a vector's 16 lanes, by halving (4 shuffles, not 15 lane extractions).
template <typename Op>
inline float reduce_lanes(v16 v, Op op) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef float v4 __attribute__((vector_size(16)));
  v8 a = op(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  v4 b = op(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
  v4 c = op(b, __builtin_shufflevector(b, b, 2, 3, 0, 1));
  v4 d = op(c, __builtin_shufflevector(c, c, 1, 0, 3, 2));
  return d[0];
}
inline float hmax(v16 v) {
  return reduce_lanes(v, [](auto x, auto y) { return x > y ? x : y; });
}
inline float hsum(v16 v) {
  return reduce_lanes(v, [](auto x, auto y) { return x + y; });
}

// e^x for x <= 0 (softmax's shifted scores), within a few float32 ulps: 2^(x log2 e) split into 2^k,
// built in the exponent bits, and 2^f for f in [-1/2, 1/2] from Cephes' exp2f polynomial. Below
// -87.3 it gives about 1e-38 instead of a smaller number or 0.
inline v16 exp_nonpositive(v16 x) {
  typedef int32_t i16 __attribute__((vector_size(64)));
  const v16 lo = v16{} - 87.3f;
  x = x < lo ? lo : x;
  v16 t = x * 1.44269504088896341f;
  i16 k = __builtin_convertvector(t - 0.5f, i16);  // truncation toward 0 of t - 1/2: round(t) for t <= 0
  v16 f = t - __builtin_convertvector(k, v16);
  v16 p = v16{} + 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  i16 bits = (k + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return (1.0f + f * p) * scale;
}

struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0, size = 0, total = 0;
};

// body(lo, hi) over [0, total) in chunks of a multiple of `align`, about `per_thread` per thread.
// Chunks are taken from a shared counter by the calling thread and by tasks scheduled on XLA's own
// intra-op pool (the FFI's ThreadPool), which a pool thread runs once it is free. The caller never
// waits for a chunk nobody has claimed, so a busy pool cannot stall it; a task that starts after the
// caller took the last chunk claims nothing and returns.
//
// The pool, not threads of the kernels' own: the helper threads these kernels had, spinning 200 us
// between calls, shared two cores with XLA's pool threads, which spin too. On XLA's pool, alternating
// runs on two AMD EPYC cores: the `mini` training step 23.4-24.0 -> 21.5-22.1 ms, `advanced` 782-788
// -> 751-752 ms, SmolLM2-135M's shape 3161-3209 -> 3005 ms, a 512-token SmolLM2 prefill 626-679 ->
// 518-576 ms; SmolLM2 decode unchanged or faster (batch 1 80-85 -> 82-119 tokens/s, bandwidth-noisy). The
// tiny `mini` model's batch-1 decode, whose calls take microseconds, lost (27-33k vs 34-37k tokens/s)
// while its batch 16 gained (96-107k vs 69-72k).
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t total, int64_t align, F body, int64_t per_thread = 4) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t size = (total + threads * per_thread - 1) / (threads * per_thread);
  size = std::max<int64_t>(align, (size + align - 1) / align * align);
  auto chunks = std::make_shared<Chunks>();
  chunks->size = size;
  chunks->total = total;
  chunks->count = (total + size - 1) / size;
  auto work = [chunks, body]() {
    for (;;) {
      int64_t c = chunks->next.fetch_add(1);
      if (c >= chunks->count) return;
      int64_t lo = c * chunks->size;
      body(lo, std::min(chunks->total, lo + chunks->size));
      chunks->finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t i = 1; i < std::min(threads, chunks->count); ++i) pool.Schedule([work] { work(); });
  work();
  // yield, not spin: on a loaded machine the thread that holds a chunk may need this core
  while (chunks->finished.load(std::memory_order_acquire) < chunks->count) std::this_thread::yield();
}

}  // namespace jaxllm
