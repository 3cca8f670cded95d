// A decode step's attention on the CPU, its cache update in place, as an XLA FFI custom call.
//
// For each row b and token t: write its new key and value into the cache at its position, then let
// its query heads attend to the cache entries at positions lo..p (p its position, lo = 0, or
// p - window + 1 with a sliding window). Only those entries are read: a row at position 100 of a
// 8,192-entry cache reads 101 of them, where the XLA form (jaxllm.model.cached_attention) reads and
// masks all 8,192. The cache operands are aliased to the outputs, so inside a decode loop XLA
// updates them in place instead of copying each layer's cache every step.
//
//   q      (B, T, N, H) float32     k_new, v_new (B, T, K, H) float32     positions (B, T) int32
//   cache  (B, K, S, H) float32 or bfloat16 (keys, values)                window: attribute, 0 = none
//   -> out (B, T, N, H) float32, the updated caches
//
// Grouped-query attention: the G = N / K query heads of kv head k are heads k*G .. k*G+G-1, and
// read its entries once for all G. Sums, scores and the softmax are float32. The work is split by
// (row, kv head) over XLA's intra-op thread pool (cpu_kernels.h: parallel_for). H must be a multiple
// of 16 (jaxllm checks).
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

struct Shape {
  int64_t B, T, N, K, S, H, window;
};

// Row b, kv head k: write its T new entries, then attend for each token.
template <typename C>
void row_head(const Shape& d, int64_t b, int64_t k, const float* q, const float* k_new, const float* v_new,
              const int32_t* positions, C* cache_k, C* cache_v, float* out) {
  const int64_t G = d.N / d.K, H = d.H, HV = H / 16;
  C* kc = cache_k + (b * d.K + k) * d.S * H;
  C* vc = cache_v + (b * d.K + k) * d.S * H;
  for (int64_t t = 0; t < d.T; ++t) {
    int64_t p = positions[b * d.T + t];
    if (p < 0 || p >= d.S) continue;  // out of range: dropped, as the XLA form's scatter
    const float* kn = k_new + ((b * d.T + t) * d.K + k) * H;
    const float* vn = v_new + ((b * d.T + t) * d.K + k) * H;
    for (int64_t h = 0; h < H; ++h) {
      kc[p * H + h] = narrow(kn[h], kc);
      vc[p * H + h] = narrow(vn[h], vc);
    }
  }
  thread_local std::vector<float> scores;  // (G, entries)
  const float scale = 1.0f / std::sqrt(float(H));
  for (int64_t t = 0; t < d.T; ++t) {
    int64_t p = positions[b * d.T + t];
    int64_t hi = std::min<int64_t>(p, d.S - 1);
    int64_t lo = d.window > 0 ? std::max<int64_t>(0, p - d.window + 1) : 0;
    int64_t n = hi - lo + 1;
    const float* qg = q + ((b * d.T + t) * d.N + k * G) * H;
    float* og = out + ((b * d.T + t) * d.N + k * G) * H;
    if (n <= 0) {  // nothing visible (the XLA form gives NaN): zeros
      std::fill(og, og + G * H, 0.0f);
      continue;
    }
    scores.resize(size_t(G * n));
    // Scores 16 entries at a time: 16 partial dot products reduced together (lane_sums).
    for (int64_t i0 = 0; i0 < n; i0 += 16) {
      const int64_t nb = std::min<int64_t>(16, n - i0);
      for (int64_t g = 0; g < G; ++g) {
        v16 parts[16];
        for (int j = 0; j < 16; ++j) {
          v16 s{};
          if (j < nb) {
            const C* key = kc + (lo + i0 + j) * H;
            for (int64_t c = 0; c < HV; ++c) s += load(qg + g * H + 16 * c) * load(key + 16 * c);
          }
          parts[j] = s;
        }
        v16 sums = lane_sums(parts);
        for (int64_t j = 0; j < nb; ++j) scores[g * n + i0 + j] = sums[j] * scale;
      }
    }
    for (int64_t g = 0; g < G; ++g) {  // softmax, 16 lanes at a time
      float* sg = scores.data() + g * n;
      const float m = *std::max_element(sg, sg + n);
      v16 totals{};
      int64_t i = 0;
      for (; i + 16 <= n; i += 16) {
        v16 e = exp_nonpositive(load(sg + i) - m);
        store(sg + i, e);
        totals += e;
      }
      float total = 0;
      for (; i < n; ++i) total += sg[i] = std::exp(sg[i] - m);
      for (int l = 0; l < 16; ++l) total += totals[l];
      const float inv = 1.0f / total;
      for (i = 0; i < n; ++i) sg[i] *= inv;
    }
    // Outputs up to 4 vectors of a head at a time, summed in registers over the entries.
    for (int64_t g = 0; g < G; ++g) {
      const float* sg = scores.data() + g * n;
      for (int64_t c0 = 0; c0 < HV; c0 += 4) {
        const int64_t cn = std::min<int64_t>(4, HV - c0);
        v16 acc[4] = {};
        for (int64_t i = 0; i < n; ++i) {
          const C* value = vc + (lo + i) * H + 16 * c0;
          for (int64_t c = 0; c < cn; ++c) acc[c] += sg[i] * load(value + 16 * c);
        }
        for (int64_t c = 0; c < cn; ++c) store(og + g * H + 16 * (c0 + c), acc[c]);
      }
    }
  }
}

template <ffi::DataType T>
ffi::Error attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_new,
                     ffi::Buffer<ffi::F32> v_new, ffi::Buffer<T> cache_k_in, ffi::Buffer<T> cache_v_in,
                     ffi::Buffer<ffi::S32> positions, int64_t window, ffi::ResultBuffer<ffi::F32> out,
                     ffi::ResultBuffer<T> cache_k, ffi::ResultBuffer<T> cache_v) {
  using C = std::conditional_t<T == ffi::BF16, uint16_t, float>;
  auto qd = q.dimensions(), kd = k_new.dimensions(), cd = cache_k_in.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || cd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[3] != qd[3] || cd[0] != qd[0] || cd[1] != kd[2] || cd[3] != qd[3] || qd[2] % kd[2] != 0 ||
      qd[3] % 16 != 0)
    return ffi::Error::InvalidArgument("decode_attention: q (B,T,N,H), k/v (B,T,K,H), cache (B,K,S,H), H % 16 == 0");
  Shape d{qd[0], qd[1], qd[2], kd[2], cd[2], qd[3], window};
  auto* kc = reinterpret_cast<C*>(cache_k->untyped_data());
  auto* vc = reinterpret_cast<C*>(cache_v->untyped_data());
  size_t bytes = cache_k_in.size_bytes();
  if (kc != cache_k_in.untyped_data()) std::memcpy(kc, cache_k_in.untyped_data(), bytes);  // not aliased
  if (vc != cache_v_in.untyped_data()) std::memcpy(vc, cache_v_in.untyped_data(), bytes);
  const float *qp = q.typed_data(), *kn = k_new.typed_data(), *vn = v_new.typed_data();
  const int32_t* pos = positions.typed_data();
  float* o = out->typed_data();
  auto body = [=](int64_t lo, int64_t hi) {
    for (int64_t u = lo; u < hi; ++u) row_head(d, u / d.K, u % d.K, qp, kn, vn, pos, kc, vc, o);
  };
  int64_t entries = 0;  // entries read, to run small steps on the calling thread alone
  for (int64_t i = 0; i < d.B * d.T; ++i) entries += std::min<int64_t>(std::max(pos[i], 0), d.S);
  if (entries * d.K * d.H < (int64_t(1) << 16))
    body(0, d.B * d.K);
  else
    parallel_for(pool, d.B * d.K, 1, body, 2);
  return ffi::Error::Success();
}

template <ffi::DataType T>
constexpr auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<ffi::S32>>()
      .template Attr<int64_t>("window")
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttentionF32, (jaxllm::attention<xla::ffi::F32>), jaxllm::binding<xla::ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttentionBf16, (jaxllm::attention<xla::ffi::BF16>), jaxllm::binding<xla::ffi::BF16>());
