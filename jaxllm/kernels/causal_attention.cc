// Causal self-attention of a training window on the CPU, forward and backward, as XLA FFI custom calls.
//
// XLA's form (jax.nn.dot_product_attention) runs it as batched dots of tiny matrices (one per batch row
// and head) with the softmax and its gradient as separate passes over (B, N, T, T) scores: on a 2-core
// Xeon the attention of `mini`'s training step took about twice the time of PyTorch's flash attention.
// Here one task per (batch row, kv head) does all of it, the forward pass one query row at a time
// (its scores in L1), the backward pass by blocks of keys (see backward_task):
//
//   forward:  s_j = scale q_t.k_j for the visible keys j, p = softmax(s), o_t = sum_j p_j v_j, and
//             lse_t = log sum_j exp(s_j) (saved for the backward pass, as flash attention does);
//   backward: p recomputed from lse; dv_j += p_j do_t; ds_j = p_j (do_t.v_j - do_t.o_t);
//             dq_t = scale sum_j ds_j k_j; dk_j += scale ds_j q_t.
//
// Keys j are visible to query t when t - window < j <= t (window 0: no lower bound). Grouped-query:
// query head n reads kv head n / (N / K); one task owns a kv head's keys and values and their
// gradients, so no two threads write the same row. Scores are vectorised over 16 keys at a time from
// a transposed copy of the task's keys (and values, backward), so no horizontal sums are needed.
// float32 throughout; head_dim 16, 32, 48, 64 or 128.
#include <cmath>
#include <vector>

#include "cpu_kernels.h"

namespace jaxllm {
namespace {

struct Shape {
  int64_t B, T, N, K, H, window;
  int64_t Tp() const { return (T + 15) / 16 * 16; }  // keys padded to whole vectors
  int64_t G() const { return N / K; }
  float scale() const { return 1.0f / std::sqrt(float(H)); }
  int64_t lo(int64_t t) const { return window > 0 ? std::max<int64_t>(0, t - window + 1) : 0; }
};

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
// The key indices j .. j + 15, as floats.
inline v16 lane_index(int64_t j) {
  constexpr v16 kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return kIota + float(j);
}

// xt[h * Tp + j] = x[b, j, kv, h] (x is (B, T, K, H)); padding keys are 0.
void transpose_head(const float* x, const Shape& s, int64_t b, int64_t kv, std::vector<float>& xt) {
  const int64_t Tp = s.Tp();
  xt.assign(size_t(s.H * Tp), 0.0f);
  for (int64_t j = 0; j < s.T; ++j) {
    const float* row = x + ((b * s.T + j) * s.K + kv) * s.H;
    for (int64_t h = 0; h < s.H; ++h) xt[h * Tp + j] = row[h];
  }
}

// For NJ vectors of 16 keys from key j: sum_h a[h] xt[h, keys] (and, with kTwo, sum_h b[h] yt[h, keys]),
// xt and yt being (H, Tp) transposed keys or values. The sums run as at least 4 independent chains
// (NJ vectors x P phases of h) to hide the FMA latency; H is a multiple of 16.
template <int NJ, bool kTwo>
inline void key_dots(const float* a, const float* xt, const float* b, const float* yt, int64_t H, int64_t Tp,
                     int64_t j, v16* out_a, v16* out_b) {
  constexpr int P = NJ >= 4 ? 1 : NJ == 1 ? 4 : 2;
  v16 acc_a[P][NJ], acc_b[P][NJ];
  for (int ph = 0; ph < P; ++ph)
    for (int i = 0; i < NJ; ++i) acc_a[ph][i] = acc_b[ph][i] = v16{};
  for (int64_t h0 = 0; h0 < H; h0 += P)
    for (int ph = 0; ph < P; ++ph) {
      const int64_t h = h0 + ph;
      const float ah = a[h], *xr = xt + h * Tp + j;
      for (int i = 0; i < NJ; ++i) acc_a[ph][i] += ah * load(xr + 16 * i);
      if (kTwo) {
        const float bh = b[h], *yr = yt + h * Tp + j;
        for (int i = 0; i < NJ; ++i) acc_b[ph][i] += bh * load(yr + 16 * i);
      }
    }
  for (int i = 0; i < NJ; ++i) {
    out_a[i] = acc_a[0][i], out_b[i] = acc_b[0][i];
    for (int ph = 1; ph < P; ++ph) out_a[i] += acc_a[ph][i], out_b[i] += acc_b[ph][i];
  }
}

// f(j, dots of a, dots of b) for every vector of 16 keys j = j0, j0 + 16, ... up to t, four at a time.
template <bool kTwo, typename F>
inline void for_key_vectors(const float* a, const float* xt, const float* b, const float* yt, int64_t H, int64_t Tp,
                            int64_t j0, int64_t t, F f) {
  v16 va[4], vb[4];
  int64_t j = j0;
  for (; j + 48 <= t; j += 64) {
    key_dots<4, kTwo>(a, xt, b, yt, H, Tp, j, va, vb);
    for (int i = 0; i < 4; ++i) f(j + 16 * i, va[i], vb[i]);
  }
  if (j > t) return;
  const int left = int((t - j) / 16 + 1);
  if (left == 1) key_dots<1, kTwo>(a, xt, b, yt, H, Tp, j, va, vb);
  if (left == 2) key_dots<2, kTwo>(a, xt, b, yt, H, Tp, j, va, vb);
  if (left == 3) key_dots<3, kTwo>(a, xt, b, yt, H, Tp, j, va, vb);
  for (int i = 0; i < left; ++i) f(j + 16 * i, va[i], vb[i]);
}

// Key rows interleaved per loop turn so that the sums over keys form independent chains, all of them
// (J x HV vectors) in registers.
template <int HV>
constexpr int kInterleave = HV <= 2 ? 4 : HV <= 4 ? 2 : 1;

template <int HV>
void forward_task(const float* q, const float* k, const float* v, float* o, float* lse, const Shape& s, int64_t task) {
  constexpr int J = kInterleave<HV>;
  const int64_t b = task / s.K, kv = task % s.K, Tp = s.Tp(), H = s.H;
  const float scale = s.scale();
  thread_local std::vector<float> kt, p;
  transpose_head(k, s, b, kv, kt);
  p.resize(size_t(Tp));
  const int64_t v_stride = s.K * H;
  for (int64_t g = 0; g < s.G(); ++g) {
    const int64_t n = kv * s.G() + g;
    for (int64_t t = 0; t < s.T; ++t) {
      const float* qt = q + ((b * s.T + t) * s.N + n) * H;
      const int64_t lo = s.lo(t), j0 = lo / 16 * 16;
      const v16 lo_v = v16{} + float(lo), t_v = v16{} + float(t), neg = v16{} - INFINITY;
      v16 mx = neg;
      for_key_vectors<false>(qt, kt.data(), nullptr, nullptr, H, Tp, j0, t, [&](int64_t j, v16 sc, v16) {
        const v16 idx = lane_index(j);
        const v16 x = (idx >= lo_v && idx <= t_v) ? sc * scale : neg;
        store(p.data() + j, x);
        mx = mx > x ? mx : x;
      });
      const float m = hmax(mx);
      v16 sum{};
      for (int64_t j = j0; j <= t; j += 16) {
        const v16 idx = lane_index(j);
        v16 e = exp_nonpositive(load(p.data() + j) - m);
        e = (idx >= lo_v && idx <= t_v) ? e : v16{};
        store(p.data() + j, e);
        sum += e;
      }
      const float l = hsum(sum);
      v16 acc[J][HV];
      for (int i = 0; i < J; ++i)
        for (int hv = 0; hv < HV; ++hv) acc[i][hv] = v16{};
      const float* vrow = v + ((b * s.T + lo) * s.K + kv) * H;
      int64_t j = lo;
      for (; j + J - 1 <= t; j += J, vrow += J * v_stride)
#pragma GCC unroll 4
        for (int i = 0; i < J; ++i)
          for (int hv = 0; hv < HV; ++hv) acc[i][hv] += p[j + i] * load(vrow + i * v_stride + 16 * hv);
      for (; j <= t; ++j, vrow += v_stride)
        for (int hv = 0; hv < HV; ++hv) acc[0][hv] += p[j] * load(vrow + 16 * hv);
      float* ot = o + ((b * s.T + t) * s.N + n) * H;
      for (int hv = 0; hv < HV; ++hv) {
        v16 total = acc[0][hv];
        for (int i = 1; i < J; ++i) total += acc[i][hv];
        store(ot + 16 * hv, total / l);
      }
      lse[(b * s.N + n) * s.T + t] = m + std::log(l);
    }
  }
}

// Keys per block of the backward pass: the block's dk and dv sums (2 H floats a key) stay in L1.
constexpr int64_t key_block(int64_t H) { return H <= 32 ? 64 : H <= 64 ? 32 : 16; }

// Flash attention's backward order: an outer loop over blocks of keys, whose dk and dv sums stay in
// L1 while every query row that sees the block adds to them; dq rows are summed over the blocks in a
// scratch of G x T x H floats. (At 256 tokens this measured the same as adding each row to every earlier
// key's sums; it is kept because its working set does not grow with the window.)
template <int HV>
void backward_task(const float* q, const float* k, const float* v, const float* o, const float* lse, const float* dout,
                   float* dq, float* dk, float* dv, const Shape& s, int64_t task) {
  constexpr int J = kInterleave<HV>;
  const int64_t b = task / s.K, kv = task % s.K, Tp = s.Tp(), H = s.H, G = s.G(), kv_stride = s.K * H;
  const int64_t KB = key_block(H);
  const float scale = s.scale();
  thread_local std::vector<float> kt, vt, p, ds, acc, dq_sum, dsum;
  transpose_head(k, s, b, kv, kt);
  transpose_head(v, s, b, kv, vt);
  p.resize(size_t(Tp));
  ds.resize(size_t(Tp));
  acc.assign(size_t(KB * 2 * H), 0.0f);  // the block's dk rows then dv rows
  dq_sum.assign(size_t(G * s.T * H), 0.0f);
  dsum.resize(size_t(G * s.T));
  const int64_t first = (b * s.T * s.K + kv) * H;  // row 0 of this task's keys, values and their gradients
  auto at = [&](int64_t g, int64_t t) { return ((b * s.T + t) * s.N + kv * G + g) * H; };
  for (int64_t g = 0; g < G; ++g)  // D_t = do_t . o_t
    for (int64_t t = 0; t < s.T; ++t) {
      v16 sum{};
      for (int hv = 0; hv < HV; ++hv) sum += load(dout + at(g, t) + 16 * hv) * load(o + at(g, t) + 16 * hv);
      dsum[g * s.T + t] = hsum(sum);
    }
  for (int64_t jb = 0; jb < s.T; jb += KB) {
    const int64_t je = std::min(jb + KB, s.T);  // keys [jb, je)
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = kv * G + g;
      for (int64_t t = jb; t < s.T; ++t) {
        const int64_t lo = std::max(s.lo(t), jb), hi = std::min(t, je - 1);  // the block's keys row t sees
        if (lo > hi) continue;
        const float *qt = q + at(g, t), *dot = dout + at(g, t);
        const float D = dsum[g * s.T + t], l = lse[(b * s.N + n) * s.T + t];
        float* dqt = dq_sum.data() + (g * s.T + t) * H;
        v16 qv[HV], dov[HV], dqv[J][HV];
        for (int hv = 0; hv < HV; ++hv) {
          qv[hv] = load(qt + 16 * hv) * scale;
          dov[hv] = load(dot + 16 * hv);
          for (int i = 0; i < J; ++i) dqv[i][hv] = v16{};
        }
        const v16 lo_v = v16{} + float(lo), hi_v = v16{} + float(hi);
        for_key_vectors<true>(qt, kt.data(), dot, vt.data(), H, Tp, lo / 16 * 16, hi, [&](int64_t j, v16 sc, v16 dp) {
          const v16 idx = lane_index(j);
          v16 pj = exp_nonpositive(sc * scale - l);  // masked lanes may overflow: they are zeroed next
          pj = (idx >= lo_v && idx <= hi_v) ? pj : v16{};
          store(p.data() + j, pj);
          store(ds.data() + j, pj * (dp - D));
        });
        const float* krow = k + first + lo * kv_stride;
        float* dkrow = acc.data() + (lo - jb) * H;
        float* dvrow = dkrow + KB * H;
        int64_t j = lo;
        for (; j + J - 1 <= hi; j += J, krow += J * kv_stride, dkrow += J * H, dvrow += J * H)
#pragma GCC unroll 4
          for (int i = 0; i < J; ++i) {
            const float pj = p[j + i], dsj = ds[j + i];
            for (int hv = 0; hv < HV; ++hv) {
              dqv[i][hv] += dsj * load(krow + i * kv_stride + 16 * hv);
              store(dkrow + i * H + 16 * hv, load(dkrow + i * H + 16 * hv) + dsj * qv[hv]);
              store(dvrow + i * H + 16 * hv, load(dvrow + i * H + 16 * hv) + pj * dov[hv]);
            }
          }
        for (; j <= hi; ++j, krow += kv_stride, dkrow += H, dvrow += H) {
          const float pj = p[j], dsj = ds[j];
          for (int hv = 0; hv < HV; ++hv) {
            dqv[0][hv] += dsj * load(krow + 16 * hv);
            store(dkrow + 16 * hv, load(dkrow + 16 * hv) + dsj * qv[hv]);
            store(dvrow + 16 * hv, load(dvrow + 16 * hv) + pj * dov[hv]);
          }
        }
        for (int hv = 0; hv < HV; ++hv) {
          v16 total = load(dqt + 16 * hv);
          for (int i = 0; i < J; ++i) total += dqv[i][hv];
          store(dqt + 16 * hv, total);
        }
      }
    }
    for (int64_t j = jb; j < je; ++j) {
      std::copy_n(acc.data() + (j - jb) * H, H, dk + first + j * kv_stride);
      std::copy_n(acc.data() + (KB + j - jb) * H, H, dv + first + j * kv_stride);
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < s.T; ++t)
      for (int hv = 0; hv < HV; ++hv) store(dq + at(g, t) + 16 * hv, load(dq_sum.data() + (g * s.T + t) * H + 16 * hv) * scale);
}

// Every task of a call, split over the kernels' threads.
template <int HV>
void forward_tasks(ffi::ThreadPool& pool, const float* q, const float* k, const float* v, float* o, float* lse,
                   const Shape& s) {
  parallel_for(pool, s.B * s.K, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) forward_task<HV>(q, k, v, o, lse, s, task);
  });
}

template <int HV>
void backward_tasks(ffi::ThreadPool& pool, const float* q, const float* k, const float* v, const float* o,
                    const float* lse, const float* dout, float* dq, float* dk, float* dv, const Shape& s) {
  parallel_for(pool, s.B * s.K, 1, [=](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) backward_task<HV>(q, k, v, o, lse, dout, dq, dk, dv, s, task);
  });
}

// The (B, T, N, H) query and (B, T, K, H) key/value shapes into `s`, checked.
ffi::Error shape_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::F32>& v,
                    int64_t window, Shape& s) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("causal_attention: q, k, v must be (B, T, heads, head_dim)");
  s = Shape{qd[0], qd[1], qd[2], kd[2], qd[3], window};
  for (int i : {0, 1, 3})
    if (kd[i] != qd[i] || vd[i] != qd[i])
      return ffi::Error::InvalidArgument("causal_attention: q, k, v disagree in batch, length or head_dim");
  const int64_t hv = s.H / 16;
  if (vd[2] != s.K || s.K == 0 || s.N % s.K != 0 || s.H % 16 != 0 || !(hv <= 4 || hv == 8))
    return ffi::Error::InvalidArgument("causal_attention: heads must group evenly, head_dim 16, 32, 48, 64 or 128");
  return ffi::Error::Success();
}

ffi::Error forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                   int64_t window, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  Shape sh;
  if (auto e = shape_of(q, k, v, window, sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  switch (sh.H / 16) {  // the head dims shape_of accepts
    case 1: forward_tasks<1>(pool, qp, kp, vp, op, lp, sh); break;
    case 2: forward_tasks<2>(pool, qp, kp, vp, op, lp, sh); break;
    case 3: forward_tasks<3>(pool, qp, kp, vp, op, lp, sh); break;
    case 4: forward_tasks<4>(pool, qp, kp, vp, op, lp, sh); break;
    default: forward_tasks<8>(pool, qp, kp, vp, op, lp, sh); break;
  }
  return ffi::Error::Success();
}

ffi::Error backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, int64_t window,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shape sh;
  if (auto e = shape_of(q, k, v, window, sh); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  switch (sh.H / 16) {  // the head dims shape_of accepts
    case 1: backward_tasks<1>(pool, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh); break;
    case 2: backward_tasks<2>(pool, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh); break;
    case 3: backward_tasks<3>(pool, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh); break;
    case 4: backward_tasks<4>(pool, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh); break;
    default: backward_tasks<8>(pool, qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jaxllm

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionFwdF32, jaxllm::forward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBwdF32, jaxllm::backward,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::ThreadPool>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Arg<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>()
                                  .Ret<xla::ffi::Buffer<xla::ffi::F32>>());
