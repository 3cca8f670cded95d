// What jaxllm's CPU kernels share: GCC generic vectors of 16 floats (AVX-512, AVX2 or NEON alike),
// bfloat16 <-> float32, and a parallel loop on the kernels' own spinning helper threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The kernels' own helper threads (as many as XLA's intra-op pool has, less the caller's, at most
// 15). A decode step is a chain of a few hundred kernel calls microseconds apart; a helper spins for
// kSpinMicros after a job before it sleeps, so the next call finds it awake (waking a sleeping pool
// thread for every call cost 10-15% of a SmolLM2-135M decode step on 2 cores).
//
// A job is a callable that takes chunks from its own counter until none are left. `launch` replaces
// the current job: a helper that finds a job late, or already finished, claims nothing from it, and
// each caller does the chunks nobody claimed, so concurrent callers stay correct.
class Helpers {
 public:
  static Helpers& get(int64_t pool_threads) {
    static Helpers* h = new Helpers(int(std::clamp<int64_t>(pool_threads - 1, 0, 15)));
    return *h;
  }
  int64_t size() const { return count_; }
  void launch(std::shared_ptr<std::function<void()>> job) {
    std::atomic_store(&job_, std::move(job));
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_.load(std::memory_order_acquire) > 0) {
      std::lock_guard<std::mutex> lock(mu_);
      cv_.notify_all();
    }
  }

 private:
  explicit Helpers(int n) : count_(n) {
    for (int i = 0; i < n; ++i) std::thread([this] { run(); }).detach();
  }
  void run() {
    uint64_t seen = generation_.load(std::memory_order_acquire);
    for (;;) {
      auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        cpu_relax();
        if (spins % 64 == 0 && std::chrono::steady_clock::now() > until) break;
      }
      if (generation_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lock(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load(std::memory_order_acquire);
      if (auto job = std::atomic_load(&job_)) (*job)();
    }
  }
  static constexpr int kSpinMicros = 200;
  const int count_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0};
  std::shared_ptr<std::function<void()>> job_;
  std::mutex mu_;
  std::condition_variable cv_;
};

// body(lo, hi) over [0, total) in chunks of a multiple of `align`, about `per_thread` per thread.
// Chunks are taken from a shared counter by the calling thread and by the helpers. The caller only
// waits for chunks that a helper has claimed, so busy helpers cannot stall it.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t total, int64_t align, F body, int64_t per_thread = 4) {
  Helpers& helpers = Helpers::get(pool.num_threads());
  int64_t threads = helpers.size() + 1;
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
  if (chunks->count > 1 && threads > 1) helpers.launch(std::make_shared<std::function<void()>>(work));
  work();
  // yield, not spin: on a loaded machine the helper that holds a chunk may need this core
  while (chunks->finished.load(std::memory_order_acquire) < chunks->count) std::this_thread::yield();
}

}  // namespace jaxllm
