// The sum of a float32 array, read once on every kernel thread: a probe of the memory read bandwidth
// that a decode step's weight reads can reach (benchmarks/real_model.py's roofline). XLA's own reduce
// reads at about half the rate on some CPUs (41 vs 78 GB/s on a 2-core AMD EPYC): each block here
// keeps four independent vector sums, so the adds never wait on one another and only memory limits it.
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

constexpr int64_t kBlock = 1 << 16;  // floats per block (256 KiB); blocks are split over the threads

float block_sum(const float* p, int64_t n) {
  v16 s0{}, s1{}, s2{}, s3{};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    s0 += load(p + i);
    s1 += load(p + i + 16);
    s2 += load(p + i + 32);
    s3 += load(p + i + 48);
  }
  float out = hsum((s0 + s1) + (s2 + s3));
  for (; i < n; ++i) out += p[i];
  return out;
}

ffi::Error stream_sum(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  const float* p = x.typed_data();
  const int64_t n = int64_t(x.element_count());
  std::vector<float> partial((n + kBlock - 1) / kBlock);
  parallel_for(pool, int64_t(partial.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) partial[b] = block_sum(p + b * kBlock, std::min(kBlock, n - b * kBlock));
  });
  float total = 0;
  for (float v : partial) total += v;
  y->typed_data()[0] = total;
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(StreamSumF32, jaxllm::stream_sum,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
