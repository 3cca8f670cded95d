// Causal self-attention of a training window on the CPU, forward and backward, as XLA FFI custom calls.
//
// XLA's form (jax.nn.dot_product_attention) runs it as batched dots of tiny matrices (one per batch row
// and head) with the softmax and its gradient as separate passes over (B, N, T, T) scores: on a 2-core
// Xeon the attention of `mini`'s training step took about twice the time of PyTorch's flash attention.
// Here one task per (batch row, kv head) does all of it, the forward pass by tiles of query rows
// (their scores in L1), the backward pass by blocks of keys (see forward_task and backward_task):
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
#include <type_traits>
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

// Query rows per forward tile: each key vector or value row loaded feeds all of them (a head's keys
// and values, 64 KiB at 256 tokens and head_dim 64, do not fit in L1: one row at a time, the loop
// waited on L2). R rows x HV vectors of output sums stay in registers.
template <int HV>
constexpr int kTileRows = HV <= 4 ? 4 : 2;

// out[r][i] = sum_h a[r][h] xt[h, j + 16 i ...] for R rows and NJ vectors of 16 keys from key j, xt
// being (H, Tp) transposed keys or values; with kTwo also out_b[r][i] from b and yt.
template <int R, int NJ, bool kTwo = false>
inline void tile_dots(const float* const* a, const float* xt, const float* const* b, const float* yt, int64_t H,
                      int64_t Tp, int64_t j, v16 (&out)[R][4], v16 (&out_b)[R][4]) {
  v16 acc[R][NJ], acc_b[R][NJ];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NJ; ++i) acc[r][i] = acc_b[r][i] = v16{};
  for (int64_t h = 0; h < H; ++h) {
    const float* xr = xt + h * Tp + j;
    v16 x[NJ];
    for (int i = 0; i < NJ; ++i) x[i] = load(xr + 16 * i);
    for (int r = 0; r < R; ++r) {
      const float ar = a[r][h];
      for (int i = 0; i < NJ; ++i) acc[r][i] += ar * x[i];
    }
    if (kTwo) {
      const float* yr = yt + h * Tp + j;
      for (int i = 0; i < NJ; ++i) x[i] = load(yr + 16 * i);
      for (int r = 0; r < R; ++r) {
        const float br = b[r][h];
        for (int i = 0; i < NJ; ++i) acc_b[r][i] += br * x[i];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < NJ; ++i) out[r][i] = acc[r][i], out_b[r][i] = acc_b[r][i];
}

// f(j, i) after tile_dots of the vectors of 16 keys j = j0, j0 + 16, ... up to `last` (four at a time),
// their sums in out[.][i] (and out_b).
template <int R, bool kTwo, typename F>
inline void for_key_vectors(const float* const* a, const float* xt, const float* const* b, const float* yt, int64_t H,
                            int64_t Tp, int64_t j0, int64_t last, v16 (&out)[R][4], v16 (&out_b)[R][4], F f) {
  int64_t j = j0;
  for (; j + 48 <= last; j += 64) {
    tile_dots<R, 4, kTwo>(a, xt, b, yt, H, Tp, j, out, out_b);
    for (int i = 0; i < 4; ++i) f(j + 16 * i, i);
  }
  if (j > last) return;
  const int left = int((last - j) / 16 + 1);
  if (left == 1) tile_dots<R, 1, kTwo>(a, xt, b, yt, H, Tp, j, out, out_b);
  if (left == 2) tile_dots<R, 2, kTwo>(a, xt, b, yt, H, Tp, j, out, out_b);
  if (left == 3) tile_dots<R, 3, kTwo>(a, xt, b, yt, H, Tp, j, out, out_b);
  for (int i = 0; i < left; ++i) f(j + 16 * i, i);
}

template <int HV>
void forward_task(const float* q, const float* k, const float* v, float* o, float* lse, const Shape& s, int64_t task) {
  constexpr int R = kTileRows<HV>;
  const int64_t b = task / s.K, kv = task % s.K, Tp = s.Tp(), H = s.H, v_stride = s.K * H;
  const float scale = s.scale();
  const v16 neg = v16{} - INFINITY;
  thread_local std::vector<float> kt, p;
  transpose_head(k, s, b, kv, kt);
  p.resize(size_t(R * Tp));  // each row's scores, then probabilities
  for (int64_t g = 0; g < s.G(); ++g) {
    const int64_t n = kv * s.G() + g;
    for (int64_t t0 = 0; t0 < s.T; t0 += R) {
      const int rows = int(std::min<int64_t>(R, s.T - t0));
      const int64_t last = t0 + rows - 1, lo0 = s.lo(t0), j0 = lo0 / 16 * 16;
      const float* qr[R];
      for (int r = 0; r < R; ++r) qr[r] = q + ((b * s.T + t0 + std::min(r, rows - 1)) * s.N + n) * H;
      v16 lo_v[R], t_v[R], mx[R];
      for (int r = 0; r < R; ++r) lo_v[r] = v16{} + float(s.lo(t0 + r)), t_v[r] = v16{} + float(t0 + r), mx[r] = neg;
      v16 sc[R][4], unused[R][4];
      for_key_vectors<R, false>(qr, kt.data(), nullptr, nullptr, H, Tp, j0, last, sc, unused, [&](int64_t j, int i) {
        const v16 idx = lane_index(j);
        for (int r = 0; r < R; ++r) {
          const v16 x = (idx >= lo_v[r] && idx <= t_v[r]) ? sc[r][i] * scale : neg;
          store(p.data() + r * Tp + j, x);
          mx[r] = mx[r] > x ? mx[r] : x;
        }
      });
      float l[R];
      for (int r = 0; r < R; ++r) {
        const float m = hmax(mx[r]);
        v16 sum{};
        for (int64_t jj = j0; jj <= last; jj += 16) {
          float* pr = p.data() + r * Tp + jj;
          const v16 idx = lane_index(jj);
          v16 e = exp_nonpositive(load(pr) - m);
          e = (idx >= lo_v[r] && idx <= t_v[r]) ? e : v16{};
          store(pr, e);
          sum += e;
        }
        l[r] = hsum(sum);
        if (r < rows) lse[(b * s.N + n) * s.T + t0 + r] = m + std::log(l[r]);
      }
      v16 acc[R][HV];
      for (int r = 0; r < R; ++r)
        for (int hv = 0; hv < HV; ++hv) acc[r][hv] = v16{};
      const float* vrow = v + ((b * s.T + lo0) * s.K + kv) * H;
      for (int64_t jj = lo0; jj <= last; ++jj, vrow += v_stride) {
        v16 vv[HV];
        for (int hv = 0; hv < HV; ++hv) vv[hv] = load(vrow + 16 * hv);
        for (int r = 0; r < R; ++r) {
          const float pr = p[r * Tp + jj];  // 0 where key jj is not visible to row r
          for (int hv = 0; hv < HV; ++hv) acc[r][hv] += pr * vv[hv];
        }
      }
      for (int r = 0; r < rows; ++r) {
        float* ot = o + ((b * s.T + t0 + r) * s.N + n) * H;
        for (int hv = 0; hv < HV; ++hv) store(ot + 16 * hv, acc[r][hv] / l[r]);
      }
    }
  }
}

// Keys per block of the backward pass: the block's dk and dv sums (2 H floats a key) stay in L1.
constexpr int64_t key_block(int64_t H) { return H <= 64 ? 64 : 32; }
// Query rows per backward tile (4 measured faster than 2 or 8 at head_dim 32 and 64, spills and all).
template <int HV>
constexpr int kBackRows = HV <= 4 ? 4 : 2;

// Flash attention's backward order: an outer loop over blocks of keys, whose dk and dv sums stay in
// L1 while every tile of query rows that sees the block adds to them (each key's k, dk and dv loaded
// once per tile); dq rows are summed over the blocks in a scratch of G x T x H floats.
template <int HV>
void backward_task(const float* q, const float* k, const float* v, const float* o, const float* lse, const float* dout,
                   float* dq, float* dk, float* dv, const Shape& s, int64_t task) {
  constexpr int R = kBackRows<HV>;
  const int64_t b = task / s.K, kv = task % s.K, Tp = s.Tp(), H = s.H, G = s.G(), kv_stride = s.K * H;
  const int64_t KB = key_block(H);
  const float scale = s.scale();
  thread_local std::vector<float> kt, vt, p, ds, acc, dq_sum, dsum;
  transpose_head(k, s, b, kv, kt);
  transpose_head(v, s, b, kv, vt);
  p.resize(size_t(R * Tp));
  ds.resize(size_t(R * Tp));
  acc.resize(size_t(KB * 2 * H));  // the block's dk rows then dv rows
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
      for (int64_t t0 = jb; t0 < s.T && s.lo(t0) < je; t0 += R) {  // the tiles of rows that see the block
        const int rows = int(std::min<int64_t>(R, s.T - t0));
        const int64_t last = t0 + rows - 1, jlo = std::max(s.lo(t0), jb), jhi = std::min(last, je - 1);
        const float *qr[R], *dor[R];
        float D[R], l[R];
        v16 lo_v[R], hi_v[R];
        for (int r = 0; r < R; ++r) {
          const int64_t t = t0 + std::min(r, rows - 1);
          qr[r] = q + at(g, t), dor[r] = dout + at(g, t);
          D[r] = dsum[g * s.T + t], l[r] = lse[(b * s.N + n) * s.T + t];
          lo_v[r] = v16{} + float(std::max(s.lo(t0 + r), jb));
          hi_v[r] = v16{} + (r < rows ? float(std::min(t0 + r, je - 1)) : -1.0f);  // a padding row sees nothing
        }
        v16 sc[R][4], dp[R][4];
        for_key_vectors<R, true>(qr, kt.data(), dor, vt.data(), H, Tp, jlo / 16 * 16, jhi, sc, dp, [&](int64_t j, int i) {
          const v16 idx = lane_index(j);
          for (int r = 0; r < R; ++r) {
            v16 pj = exp_nonpositive(sc[r][i] * scale - l[r]);  // masked lanes may overflow: zeroed next
            pj = (idx >= lo_v[r] && idx <= hi_v[r]) ? pj : v16{};
            store(p.data() + r * Tp + j, pj);
            store(ds.data() + r * Tp + j, pj * (dp[r][i] - D[r]));
          }
        });
        v16 dqv[R][HV];
        for (int r = 0; r < R; ++r)
          for (int hv = 0; hv < HV; ++hv) dqv[r][hv] = v16{};
        const float* krow = k + first + jlo * kv_stride;
        for (int64_t j = jlo; j <= jhi; ++j, krow += kv_stride) {
          float *dkj = acc.data() + (j - jb) * H, *dvj = dkj + KB * H;
          v16 kj[HV], dkv[HV], dvv[HV];
          for (int hv = 0; hv < HV; ++hv)
            kj[hv] = load(krow + 16 * hv), dkv[hv] = load(dkj + 16 * hv), dvv[hv] = load(dvj + 16 * hv);
          for (int r = 0; r < R; ++r) {
            const float pj = p[r * Tp + j], dsj = ds[r * Tp + j], dsj_scaled = dsj * scale;
            for (int hv = 0; hv < HV; ++hv) {
              dqv[r][hv] += dsj * kj[hv];
              dkv[hv] += dsj_scaled * load(qr[r] + 16 * hv);
              dvv[hv] += pj * load(dor[r] + 16 * hv);
            }
          }
          for (int hv = 0; hv < HV; ++hv) store(dkj + 16 * hv, dkv[hv]), store(dvj + 16 * hv, dvv[hv]);
        }
        for (int r = 0; r < rows; ++r) {
          float* dqt = dq_sum.data() + (g * s.T + t0 + r) * H;
          for (int hv = 0; hv < HV; ++hv) store(dqt + 16 * hv, load(dqt + 16 * hv) + dqv[r][hv]);
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

// f(std::integral_constant<int, HV>{}) with HV = head_dim / 16, for the head dims shape_of accepts.
template <typename F>
void with_head_vectors(int64_t H, F f) {
  switch (H / 16) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
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
  with_head_vectors(sh.H, [&](auto hv) {  // one task per (batch row, kv head), over the kernels' threads
    parallel_for(pool, sh.B * sh.K, 1, [=](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task) forward_task<decltype(hv)::value>(qp, kp, vp, op, lp, sh, task);
    });
  });
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
  with_head_vectors(sh.H, [&](auto hv) {
    parallel_for(pool, sh.B * sh.K, 1, [=](int64_t lo, int64_t hi) {
      for (int64_t task = lo; task < hi; ++task)
        backward_task<decltype(hv)::value>(qp, kp, vp, op, lp, dop, dqp, dkp, dvp, sh, task);
    });
  });
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
