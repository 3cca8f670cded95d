// What jaxllm's CPU kernels share: GCC generic vectors of 16 floats (AVX-512, AVX2 or NEON alike),
// bfloat16 <-> float32, and a parallel loop on XLA's intra-op thread pool.
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
inline float sum(v16 v) {
  float out = 0;
  for (int l = 0; l < 16; ++l) out += v[l];
  return out;
}

struct Chunks {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  int64_t count = 0, size = 0, total = 0;
};

// body(lo, hi) over [0, total) in chunks of a multiple of `align`, about `per_thread` per thread.
// Chunks are taken from a shared counter by the calling thread and by tasks on the pool. The caller
// only waits for chunks that a task has claimed, so a busy pool (a task that never starts) cannot
// stall it.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t total, int64_t align, F body, int64_t per_thread = 4) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
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
  for (int64_t t = 1; t < threads && t < chunks->count; ++t) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  while (chunks->finished.load(std::memory_order_acquire) < chunks->count) std::this_thread::yield();
}

}  // namespace jaxllm
