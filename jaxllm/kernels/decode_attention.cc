// Cached attention on the CPU (a decode step, or a chunk of a prefill), its cache update in place, as an
// XLA FFI custom call.
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
// Grouped-query attention: the G = N / K query heads of kv head k are heads k*G .. k*G+G-1. One token a
// row (a decode step): the G heads read kv head k's entries once, split by (row, kv head) over XLA's
// intra-op thread pool (cpu_kernels.h: parallel_for). Several tokens a row (a prefill chunk): every new
// entry is written first, then each (row, query head) attends 16 tokens at a time, one to each vector
// lane (attend_lanes), so each key and value element loaded feeds 16 tokens; the attention of a
// 512-token SmolLM2 prefill in 64-token chunks took 1.1 ms a layer on two AMD EPYC cores, 4.0 ms one
// token at a time. Sums, scores and the softmax are float32. H must be a multiple of 16 (jaxllm checks);
// chunks with head_dim past 128 go one token at a time.
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

struct Shape {
  int64_t B, T, N, K, S, H, window;
};

// Row b, kv head k: write its T new entries at their positions (out of range: dropped, as the XLA form's
// scatter).
template <typename C>
void write_entries(const Shape& d, int64_t b, int64_t k, const float* k_new, const float* v_new,
                   const int32_t* positions, C* cache_k, C* cache_v) {
  const int64_t H = d.H;
  C* kc = cache_k + (b * d.K + k) * d.S * H;
  C* vc = cache_v + (b * d.K + k) * d.S * H;
  for (int64_t t = 0; t < d.T; ++t) {
    int64_t p = positions[b * d.T + t];
    if (p < 0 || p >= d.S) continue;
    const float* kn = k_new + ((b * d.T + t) * d.K + k) * H;
    const float* vn = v_new + ((b * d.T + t) * d.K + k) * H;
    for (int64_t h = 0; h < H; ++h) {
      kc[p * H + h] = narrow(kn[h], kc);
      vc[p * H + h] = narrow(vn[h], vc);
    }
  }
}

// The entries token t of row b sees: lo..hi (none when hi < lo).
inline void visible(const Shape& d, int64_t p, int64_t& lo, int64_t& hi) {
  hi = std::min<int64_t>(p, d.S - 1);
  lo = d.window > 0 ? std::max<int64_t>(0, p - d.window + 1) : 0;
}

// Row b, kv head k, one token at a time (a decode step): write its new entries, then attend.
template <typename C>
void row_head(const Shape& d, int64_t b, int64_t k, const float* q, const float* k_new, const float* v_new,
              const int32_t* positions, C* cache_k, C* cache_v, float* out) {
  const int64_t G = d.N / d.K, H = d.H, HV = H / 16;
  write_entries(d, b, k, k_new, v_new, positions, cache_k, cache_v);
  const C* kc = cache_k + (b * d.K + k) * d.S * H;
  const C* vc = cache_v + (b * d.K + k) * d.S * H;
  thread_local std::vector<float> scores;  // (G, entries)
  const float scale = 1.0f / std::sqrt(float(H));
  for (int64_t t = 0; t < d.T; ++t) {
    int64_t lo, hi;
    visible(d, positions[b * d.T + t], lo, hi);
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

// 16 tokens of one query head at once, a token to each vector lane: scores key by key against the
// cache's rows as they lie (each key element broadcast to the 16 lanes), so neither keys nor values are
// transposed, and the softmax's max and sums are lane-wise. Tokens past `rows` see nothing.
template <int HV, typename C>
void attend_lanes(const float* const* q, int rows, const int64_t* lo, const int64_t* hi, const C* keys,
                  const C* values, float scale, std::vector<float>& sc, float* const* out) {
  constexpr int64_t H = 16 * HV;
  constexpr int NJ = 8;   // keys a pass over the queries: 8 sums in registers
  constexpr int NH = 16;  // output columns a pass over the probabilities
  int64_t lo_l[16], hi_l[16], jlo = INT64_MAX, jhi = -1;
  for (int r = 0; r < 16; ++r) {
    lo_l[r] = r < rows ? lo[r] : 1, hi_l[r] = r < rows ? hi[r] : 0;
    if (hi_l[r] >= lo_l[r]) jlo = std::min(jlo, lo_l[r]), jhi = std::max(jhi, hi_l[r]);
  }
  v16 ot[H];  // the output, transposed: ot[h][r]
  if (jhi < 0) {
    for (int r = 0; r < rows; ++r) std::fill(out[r], out[r] + H, 0.0f);
    return;
  }
  v16 qt[H], lo_v, hi_v, mx = v16{} - INFINITY;
  for (int r = 0; r < 16; ++r) lo_v[r] = float(lo_l[r]), hi_v[r] = float(hi_l[r]);
  for (int64_t h = 0; h < H; ++h)
    for (int r = 0; r < 16; ++r) qt[h][r] = q[std::min(r, rows - 1)][h] * scale;
  const int64_t n = jhi - jlo + 1;
  sc.resize(size_t(n * 16));
  for (int64_t j0 = jlo; j0 <= jhi; j0 += NJ) {
    const int nj = int(std::min<int64_t>(NJ, jhi - j0 + 1));
    v16 acc[NJ] = {};
    const C* k0 = keys + j0 * H;
    if (nj == NJ) {
      for (int64_t h = 0; h < H; ++h)
        for (int i = 0; i < NJ; ++i) acc[i] += widen(k0[i * H + h]) * qt[h];
    } else {
      for (int64_t h = 0; h < H; ++h)
        for (int i = 0; i < nj; ++i) acc[i] += widen(k0[i * H + h]) * qt[h];
    }
    for (int i = 0; i < nj; ++i) {
      const v16 j = v16{} + float(j0 + i);
      const v16 x = (j >= lo_v && j <= hi_v) ? acc[i] : v16{} - INFINITY;
      store(sc.data() + (j0 - jlo + i) * 16, x);
      mx = mx > x ? mx : x;
    }
  }
  v16 sum{};
  for (int64_t i = 0; i < n; ++i) {
    const v16 x = load(sc.data() + i * 16);
    const v16 e = x > v16{} - INFINITY ? exp_nonpositive(x - mx) : v16{};
    store(sc.data() + i * 16, e);
    sum += e;
  }
  const v16 inv = sum > 0 ? 1.0f / sum : v16{};
  for (int64_t h0 = 0; h0 < H; h0 += NH) {
    v16 acc[NH] = {};
    const C* v0 = values + jlo * H + h0;
    for (int64_t i = 0; i < n; ++i) {
      const v16 p = load(sc.data() + i * 16);
      for (int c = 0; c < NH; ++c) acc[c] += widen(v0[i * H + c]) * p;
    }
    for (int c = 0; c < NH; ++c) ot[h0 + c] = acc[c] * inv;
  }
  for (int r = 0; r < rows; ++r)
    for (int64_t h = 0; h < H; ++h) out[r][h] = ot[h][r];
}

// Query head g of kv head k, row b, several tokens (a prefill chunk; entries written already), 16
// tokens at a time (attend_lanes).
template <int HV, typename C>
void chunk_task(const Shape& d, int64_t b, int64_t k, int64_t g, const float* q, const int32_t* positions,
                const C* cache_k, const C* cache_v, float* out) {
  const int64_t H = d.H, n = k * (d.N / d.K) + g;
  const C* kc = cache_k + (b * d.K + k) * d.S * H;
  const C* vc = cache_v + (b * d.K + k) * d.S * H;
  thread_local std::vector<float> scores;
  for (int64_t t0 = 0; t0 < d.T; t0 += 16) {
    const int rows = int(std::min<int64_t>(16, d.T - t0));
    const float* qr[16];
    float* outs[16];
    int64_t lo[16], hi[16];
    for (int r = 0; r < rows; ++r) {
      const int64_t at = ((b * d.T + t0 + r) * d.N + n) * H;
      qr[r] = q + at, outs[r] = out + at;
      visible(d, positions[b * d.T + t0 + r], lo[r], hi[r]);
    }
    attend_lanes<HV>(qr, rows, lo, hi, kc, vc, 1.0f / std::sqrt(float(H)), scores, outs);
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
  int64_t entries = 0;  // entries read, to run small steps on the calling thread alone
  for (int64_t i = 0; i < d.B * d.T; ++i) entries += std::min<int64_t>(std::max(pos[i], 0), d.S);
  auto run = [&](int64_t total, auto body, int64_t per_thread = 2) {
    if (entries * d.K * d.H < (int64_t(1) << 16))
      body(0, total);
    else
      parallel_for(pool, total, 1, body, per_thread);
  };
  const int64_t G = d.N / d.K;
  auto chunk = [&](auto hv) {  // a prefill chunk: every entry written, then 16 tokens at a time
    run(d.B * d.K, [=](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u) write_entries(d, u / d.K, u % d.K, kn, vn, pos, kc, vc);
    });
    run(d.B * d.N, [=](int64_t lo, int64_t hi) {
      for (int64_t u = lo; u < hi; ++u)
        chunk_task<decltype(hv)::value>(d, u / d.N, u % d.N / G, u % G, qp, pos, kc, vc, o);
    }, d.B * d.N);  // one task at a time: few tasks, each of them long
  };
  switch (d.T > 1 ? d.H / 16 : 0) {  // head_dim 16 .. 128 (qt and ot live on the stack)
    case 1: chunk(std::integral_constant<int, 1>{}); break;
    case 2: chunk(std::integral_constant<int, 2>{}); break;
    case 3: chunk(std::integral_constant<int, 3>{}); break;
    case 4: chunk(std::integral_constant<int, 4>{}); break;
    case 5: chunk(std::integral_constant<int, 5>{}); break;
    case 6: chunk(std::integral_constant<int, 6>{}); break;
    case 7: chunk(std::integral_constant<int, 7>{}); break;
    case 8: chunk(std::integral_constant<int, 8>{}); break;
    default:  // one token a row (a decode step), or a head_dim past 128
      run(d.B * d.K, [=](int64_t lo, int64_t hi) {
        for (int64_t u = lo; u < hi; ++u) row_head(d, u / d.K, u % d.K, qp, kn, vn, pos, kc, vc, o);
      });
  }
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
