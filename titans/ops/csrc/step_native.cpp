// The neural memory's decode step in C++ (titans/layers/decode.py MemoryDecoder; the Python there
// is the readable definition and the fallback, tests/models/test_decode.py compares the two).
//
// One token per batch row, every (row, head) pair on its own: the causal conv of the projected
// input, q/k/v features, the gates, the memory rule's update at the chunk-start weights
// (ops/step.py memory_step), the read with the new weights, and the output path's per-head
// RMSNorm and SiLU gate. What the Python does in ~80 small tensor operations per layer is here
// one call; the arithmetic is the same up to rounding.
//
// Shapes (B rows, H heads, D head dim, C = 3 H D, K conv taps, L memory layers):
//   u [B, C] = x W_qkv     gates [B, 3 H] sigmoid of the gate logits (theta, eta, alpha)     g [B, H D] = x W_gate_out
//   conv [B, K - 1, C] the last K - 1 rows of u (oldest first), shifted in place
//   conv_w [K, C] (row K - 1 the newest tap), conv_b [C]
//   W, S, Wc: L tensors [B, H, d_out, d_in] (weights, momentum, chunk-start weights), in place
//   out_norm [H, D]; returns the output path's input to W_o, [B, H D]

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr double kNormEps = 1e-2;   // features.NORM_EPS
constexpr double kRmsEps = 1e-6;    // features.RMS_EPS

template <typename T>
inline T act_fn(int act, T z) {
  if (act == 0) return z / (T(1) + std::exp(-z));                        // SiLU
  if (act == 1) return T(0.5) * z * (T(1) + std::erf(z * T(M_SQRT1_2)));  // exact GELU
  return std::tanh(z);
}

template <typename T>
inline T act_grad(int act, T z) {
  if (act == 0) {
    T s = T(1) / (T(1) + std::exp(-z));
    return s * (T(1) + z * (T(1) - s));
  }
  if (act == 1) {
    T pdf = std::exp(T(-0.5) * z * z) * T(0.3989422804014327);
    return T(0.5) * (T(1) + std::erf(z * T(M_SQRT1_2))) + z * pdf;
  }
  T t = std::tanh(z);
  return T(1) - t * t;
}

template <typename T>
inline T silu(T z) { return z / (T(1) + std::exp(-z)); }

template <typename T>
void l2norm(T* x, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  T r = T(1) / std::sqrt(s + T(kNormEps));
  for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// y = f(x; weights) for one head; weights[l] points at that head's [d_out, d_in] block.
// Keeps each layer's input in hs[l] and pre-activation in zs[l] when asked (for the backward).
template <typename T>
void mlp_forward(const std::vector<const T*>& w, const std::vector<int64_t>& dims, int act, bool residual,
                 const T* x, T* y, std::vector<std::vector<T>>* hs, std::vector<std::vector<T>>* zs) {
  const int64_t L = (int64_t)w.size();
  std::vector<T> h(x, x + dims[0]), z;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t di = dims[l], dout = dims[l + 1];
    z.assign(dout, T(0));
    const T* wl = w[l];
    for (int64_t o = 0; o < dout; ++o) {
      T acc = 0;
      const T* row = wl + o * di;
      for (int64_t i = 0; i < di; ++i) acc += row[i] * h[i];
      z[o] = acc;
    }
    if (hs) (*hs)[l] = h;
    if (zs) (*zs)[l] = z;
    if (l < L - 1) {
      h.resize(dout);
      for (int64_t o = 0; o < dout; ++o) h[o] = act_fn(act, z[o]);
    }
  }
  for (int64_t o = 0; o < dims[L]; ++o) y[o] = z[o] + (residual ? x[o] : T(0));
}

// The output path for one head: RMSNorm(r) * weight * SiLU(g).
template <typename T>
void read_out(const T* r, const T* weight, const T* g, T* out, int64_t D) {
  T s = 0;
  for (int64_t i = 0; i < D; ++i) s += r[i] * r[i];
  T rstd = T(1) / std::sqrt(s / T(D) + T(kRmsEps));
  for (int64_t i = 0; i < D; ++i) out[i] = r[i] * rstd * weight[i] * silu(g[i]);
}

template <typename T>
std::vector<const T*> head_blocks(const std::vector<torch::Tensor>& ws, int64_t n) {
  std::vector<const T*> out;
  for (const auto& w : ws) out.push_back(w.data_ptr<T>() + n * w.size(2) * w.size(3));
  return out;
}

template <typename T>
void step_impl(const torch::Tensor& u, const torch::Tensor& logits, const torch::Tensor& g, torch::Tensor& conv,
               const torch::Tensor& conv_w, const torch::Tensor& conv_b, std::vector<torch::Tensor>& W,
               std::vector<torch::Tensor>& S, std::vector<torch::Tensor>& Wc, const torch::Tensor& out_norm,
               torch::Tensor& out, int64_t H, int64_t D, int act, bool residual, bool normalize, bool qk_silu,
               double max_lr, bool momentum, bool bounded, bool forgetting, bool new_chunk) {
  const int64_t B = u.size(0), C = 3 * H * D, L = (int64_t)W.size();
  const int64_t K = conv_w.numel() ? conv_w.size(0) : 0;
  std::vector<int64_t> dims{W[0].size(3)};
  for (const auto& w : W) dims.push_back(w.size(2));
  const T* up = u.data_ptr<T>();
  const T* lp = logits.data_ptr<T>();
  const T* gp = g.data_ptr<T>();
  T* cp = K > 1 ? conv.data_ptr<T>() : nullptr;
  const T* cw = K ? conv_w.data_ptr<T>() : nullptr;
  const T* cb = K ? conv_b.data_ptr<T>() : nullptr;
  const T* on = out_norm.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T tiny = std::numeric_limits<T>::min();

#pragma omp parallel for schedule(static) if (B * H > 1)
  for (int64_t n = 0; n < B * H; ++n) {
    const int64_t b = n / H, h = n % H;
    std::vector<T> f(3 * D);   // q, k, v of this head
    for (int64_t part = 0; part < 3; ++part) {
      for (int64_t i = 0; i < D; ++i) {
        const int64_t c = part * H * D + h * D + i;
        const T x = up[b * C + c];
        T s = x;
        if (K) {
          s = cb[c] + cw[(K - 1) * C + c] * x;
          for (int64_t j = 0; j < K - 1; ++j) s += cw[j * C + c] * cp[(b * (K - 1) + j) * C + c];
          for (int64_t j = 0; j + 1 < K - 1; ++j) cp[(b * (K - 1) + j) * C + c] = cp[(b * (K - 1) + j + 1) * C + c];
          if (K > 1) cp[(b * (K - 1) + K - 2) * C + c] = x;
        }
        f[part * D + i] = (part == 2 || qk_silu) ? silu(s) : s;
      }
    }
    T* q = f.data();
    T* k = f.data() + D;
    const T* v = f.data() + 2 * D;
    l2norm(q, D);
    l2norm(k, D);
    // gates, as NeuralMemory._gates
    T theta = T(max_lr) * lp[b * 3 * H + h];
    const T eta = momentum ? lp[b * 3 * H + H + h] : T(0);
    if (momentum && bounded) theta = theta * (T(1) - eta);
    const T alpha = forgetting ? lp[b * 3 * H + 2 * H + h] : T(0);
    // the gradient of ||f(k; Wc) - v||^2 at the chunk-start weights: u_l = 2 g_l h_{l-1}^T
    std::vector<std::vector<T>> hs(L), zs(L), gs(L);
    const int64_t Dv = dims[L];
    std::vector<T> e(Dv);
    mlp_forward(head_blocks<T>(Wc, n), dims, act, residual, k, e.data(), &hs, &zs);
    for (int64_t o = 0; o < Dv; ++o) e[o] -= v[o];
    gs[L - 1] = e;
    for (int64_t l = L - 1; l > 0; --l) {
      const T* wl = Wc[l].data_ptr<T>() + n * dims[l + 1] * dims[l];
      std::vector<T>& gl = gs[l - 1];
      gl.assign(dims[l], T(0));
      for (int64_t o = 0; o < dims[l + 1]; ++o) {
        const T go = gs[l][o];
        const T* row = wl + o * dims[l];
        for (int64_t i = 0; i < dims[l]; ++i) gl[i] += row[i] * go;
      }
      for (int64_t i = 0; i < dims[l]; ++i) gl[i] *= act_grad(act, zs[l - 1][i]);
    }
    T step = T(2) * theta;
    if (normalize) {   // nets.normalized_step, |u_l|^2 = 4 |g_l|^2 |h_{l-1}|^2
      auto sq = [](const T* x, int64_t m) { T s = 0; for (int64_t i = 0; i < m; ++i) s += x[i] * x[i]; return s; };
      const T d2 = T(4) * sq(e.data(), Dv), k2 = sq(k, D), v2 = sq(v, D);
      T u2 = 0;
      for (int64_t l = 0; l < L; ++l) u2 += sq(gs[l].data(), dims[l + 1]) * sq(hs[l].data(), dims[l]);
      u2 *= T(4);
      const T ratio = u2 > 0 ? d2 * k2 / std::max(u2, tiny) : T(1);
      const T clip = d2 > 0 ? std::sqrt(T(16) * std::max(v2, k2) / std::max(d2, tiny)) : T(1);
      step *= std::min(std::min(ratio, clip), T(1));
    }
    // S_t = eta S_{t-1} - theta u_t;  W_t = (1 - alpha) W_{t-1} + S_t
    for (int64_t l = 0; l < L; ++l) {
      const int64_t dout = dims[l + 1], di = dims[l], off = n * dout * di;
      T* wl = W[l].data_ptr<T>() + off;
      T* sl = S[l].data_ptr<T>() + off;
      for (int64_t o = 0; o < dout; ++o) {
        const T a = step * gs[l][o];
        for (int64_t i = 0; i < di; ++i) {
          const T s = eta * sl[o * di + i] - a * hs[l][i];
          sl[o * di + i] = s;
          wl[o * di + i] = (T(1) - alpha) * wl[o * di + i] + s;
        }
      }
      if (new_chunk) std::copy(wl, wl + dout * di, Wc[l].data_ptr<T>() + off);
    }
    // the read with the new weights, through the output path
    std::vector<T> r(Dv);
    mlp_forward<T>(head_blocks<T>(W, n), dims, act, residual, q, r.data(), nullptr, nullptr);
    read_out(r.data(), on + h * D, gp + b * H * D + h * D, op + b * H * D + h * D, D);
  }
}

template <typename T>
void read_impl(const torch::Tensor& qraw, const torch::Tensor& g, const std::vector<torch::Tensor>& W,
               const torch::Tensor& out_norm, torch::Tensor& out, int64_t H, int64_t D, int act, bool residual,
               bool qk_silu, bool shared) {
  const int64_t B = qraw.size(0), L = (int64_t)W.size();
  std::vector<int64_t> dims{W[0].size(-1)};
  for (const auto& w : W) dims.push_back(w.size(-2));
#pragma omp parallel for schedule(static) if (B * H > 1)
  for (int64_t n = 0; n < B * H; ++n) {
    const int64_t b = n / H, h = n % H;
    std::vector<T> q(D), r(dims[L]);
    const T* src = qraw.data_ptr<T>() + b * H * D + h * D;
    for (int64_t i = 0; i < D; ++i) q[i] = qk_silu ? silu(src[i]) : src[i];
    l2norm(q.data(), D);
    mlp_forward<T>(head_blocks<T>(W, shared ? h : n), dims, act, residual, q.data(), r.data(), nullptr, nullptr);
    read_out(r.data(), out_norm.data_ptr<T>() + h * D, g.data_ptr<T>() + b * H * D + h * D,
             out.data_ptr<T>() + b * H * D + h * D, D);
  }
}

void check(const torch::Tensor& t, const torch::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == like.scalar_type() && t.is_contiguous(), name,
              " must be a contiguous CPU tensor of the input's dtype");
}

}  // namespace

// One token of the memory layer, in place on conv, W, S, Wc; returns [B, H D] (see the top).
torch::Tensor memory_decode_step(torch::Tensor u, torch::Tensor logits, torch::Tensor g, torch::Tensor conv,
                                 torch::Tensor conv_w, torch::Tensor conv_b, std::vector<torch::Tensor> W,
                                 std::vector<torch::Tensor> S, std::vector<torch::Tensor> Wc, torch::Tensor out_norm,
                                 int64_t heads, int64_t head_dim, int64_t act, bool residual, bool normalize,
                                 bool qk_silu, double max_lr, bool momentum, bool bounded, bool forgetting,
                                 bool new_chunk) {
  for (auto* t : {&u, &logits, &g, &out_norm}) check(*t, u, "inputs");
  if (conv_w.numel()) for (auto* t : {&conv, &conv_w, &conv_b}) check(*t, u, "conv");
  for (auto* ws : {&W, &S, &Wc}) for (auto& w : *ws) check(w, u, "memory state");
  auto out = torch::empty({u.size(0), heads * head_dim}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "memory_decode_step", [&] {
    step_impl<scalar_t>(u, logits, g, conv, conv_w, conv_b, W, S, Wc, out_norm, out, heads, head_dim, (int)act,
                        residual, normalize, qk_silu, max_lr, momentum, bounded, forgetting, new_chunk);
  });
  return out;
}

// A read of the memory W ([B, H, d_out, d_in] per layer, or [1, H, ...] shared by the rows) with the
// query qraw [B, H D] (before its SiLU and L2 norm), through the output path: [B, H D].
torch::Tensor memory_decode_read(torch::Tensor qraw, torch::Tensor g, std::vector<torch::Tensor> W,
                                 torch::Tensor out_norm, int64_t heads, int64_t head_dim, int64_t act, bool residual,
                                 bool qk_silu) {
  for (auto* t : {&qraw, &g, &out_norm}) check(*t, qraw, "inputs");
  for (auto& w : W) check(w, qraw, "memory weights");
  const bool shared = W[0].size(0) == 1 && qraw.size(0) != 1;
  auto out = torch::empty({qraw.size(0), heads * head_dim}, qraw.options());
  AT_DISPATCH_FLOATING_TYPES(qraw.scalar_type(), "memory_decode_read", [&] {
    read_impl<scalar_t>(qraw, g, W, out_norm, out, heads, head_dim, (int)act, residual, qk_silu, shared);
  });
  return out;
}

namespace {

template <typename T>
void rms_row(const T* x, const T* w, T* y, int64_t n, double eps) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  const T r = T(1) / std::sqrt(s / T(n) + T(eps));
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * r * w[i];
}

}  // namespace

// RMSNorm over the last dim of x [R, n] with weight [n] (layers.RMSNorm for one token per row).
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  check(x, x, "x");
  check(weight, x, "weight");
  auto y = torch::empty_like(x);
  const int64_t n = x.size(-1), R = x.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    for (int64_t r = 0; r < R; ++r)
      rms_row(x.data_ptr<scalar_t>() + r * n, weight.data_ptr<scalar_t>(), y.data_ptr<scalar_t>() + r * n, n, eps);
  });
  return y;
}

// variants.BranchGate before its projection: RMSNorm_y(y) * sigmoid(RMSNorm_m(m)), y and m [R, n].
torch::Tensor branch_gate(torch::Tensor y, torch::Tensor m, torch::Tensor wy, torch::Tensor wm, double eps_y,
                          double eps_m) {
  for (auto* t : {&y, &m, &wy, &wm}) check(*t, y, "branch gate inputs");
  auto out = torch::empty_like(y);
  const int64_t n = y.size(-1), R = y.numel() / n;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "branch_gate", [&] {
    using T = scalar_t;
    std::vector<T> a(n), b(n);
    for (int64_t r = 0; r < R; ++r) {
      rms_row(y.data_ptr<T>() + r * n, wy.data_ptr<T>(), a.data(), n, eps_y);
      rms_row(m.data_ptr<T>() + r * n, wm.data_ptr<T>(), b.data(), n, eps_m);
      T* o = out.data_ptr<T>() + r * n;
      for (int64_t i = 0; i < n; ++i) o[i] = a[i] * (T(1) / (T(1) + std::exp(-b[i])));
    }
  });
  return out;
}

namespace {

template <typename T>
void attend_impl(const torch::Tensor& q, const torch::Tensor& k_new, const torch::Tensor& v_new, torch::Tensor& kbuf,
                 torch::Tensor& vbuf, const std::vector<int64_t>& slots, int64_t n_valid,
                 const std::vector<double>& cs, const std::vector<double>& sn, torch::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), S = kbuf.size(2), M = k_new.size(2), half = D / 2;
  auto rotate = [&](const T* x, T* y) {   // rotate-half: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
    for (int64_t i = 0; i < half; ++i) {
      const T c = T(cs[i]), s = T(sn[i]);
      y[i] = x[i] * c + (-x[i + half]) * s;
      y[i + half] = x[i + half] * c + x[i] * s;
    }
  };
  const T scale = T(1) / std::sqrt(T(D));
#pragma omp parallel for schedule(static) if (B * H > 1)
  for (int64_t n = 0; n < B * H; ++n) {
    T* kb = kbuf.data_ptr<T>() + n * S * D;
    T* vb = vbuf.data_ptr<T>() + n * S * D;
    for (int64_t j = 0; j < M; ++j) {
      rotate(k_new.data_ptr<T>() + (n * M + j) * D, kb + slots[j] * D);
      std::copy_n(v_new.data_ptr<T>() + (n * M + j) * D, D, vb + slots[j] * D);
    }
    std::vector<T> qr(D), p(n_valid), acc(D, T(0));
    rotate(q.data_ptr<T>() + n * D, qr.data());
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < n_valid; ++j) {
      T s = 0;
      for (int64_t i = 0; i < D; ++i) s += qr[i] * kb[j * D + i];
      p[j] = s * scale;
      mx = std::max(mx, p[j]);
    }
    T z = 0;
    for (int64_t j = 0; j < n_valid; ++j) {
      p[j] = std::exp(p[j] - mx);
      z += p[j];
      for (int64_t i = 0; i < D; ++i) acc[i] += p[j] * vb[j * D + i];
    }
    T* o = out.data_ptr<T>() + n * D;
    for (int64_t i = 0; i < D; ++i) o[i] = acc[i] / z;
  }
}

}  // namespace

// One attention step for every row and head: the new keys k_new [B, H, m, D] (and q [B, H, D])
// are rotated by RoPE at `position` (angles in double, as ops.attention.rotary), written with
// v_new into the cache buffers kbuf, vbuf [B, H, S, D] at `slots` (m of them), and q attends
// (softmax, scale 1/sqrt(D)) over the first n_valid slots. Returns [B, H D].
torch::Tensor attend_step(torch::Tensor q, torch::Tensor k_new, torch::Tensor v_new, torch::Tensor kbuf,
                          torch::Tensor vbuf, std::vector<int64_t> slots, int64_t n_valid, int64_t position,
                          double rope_base) {
  for (auto* t : {&q, &k_new, &v_new, &kbuf, &vbuf}) check(*t, q, "attention inputs");
  const int64_t D = q.size(2);
  TORCH_CHECK((int64_t)slots.size() == k_new.size(2) && n_valid <= kbuf.size(2) && D % 2 == 0,
              "attend_step: the slots, n_valid and D must fit the buffer");
  for (int64_t sl : slots) TORCH_CHECK(0 <= sl && sl < kbuf.size(2), "attend_step: a slot lies outside the buffer");
  auto out = torch::empty({q.size(0), q.size(1) * D}, q.options());
  std::vector<double> cs(D / 2), sn(D / 2);
  for (int64_t i = 0; i < D / 2; ++i) {
    const double angle = double(position) * std::pow(rope_base, -double(2 * i) / double(D));
    cs[i] = std::cos(angle);
    sn[i] = std::sin(angle);
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attend_step", [&] {
    attend_impl<scalar_t>(q, k_new, v_new, kbuf, vbuf, slots, n_valid, cs, sn, out);
  });
  return out;
}

namespace {

template <typename T>
void linear_impl(const T* x, const T* w, const T* b, T* y, int64_t R, int64_t N, int64_t K) {
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < N; ++o) {
    const T* row = w + o * K;
    for (int64_t r = 0; r < R; ++r) {
      const T* xr = x + r * K;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < K; ++i) acc += row[i] * xr[i];
      y[r * N + o] = acc + (b ? b[o] : T(0));
    }
  }
}

}  // namespace

// y = x W^T (+ b) for a few rows x [R, K], W [N, K]: a matrix-vector product per row that reads
// each weight row once for all rows, over the threads (BLAS streams a decode step's weights at
// 8-11 GB/s on some CPUs at M = 1; docs/benchmarks.md, "Inference").
torch::Tensor linear_rows(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  check(x, x, "x");
  check(w, x, "weight");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "linear_rows: x [R, K] and W [N, K]");
  if (bias) check(*bias, x, "bias");
  auto y = torch::empty({x.size(0), w.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "linear_rows", [&] {
    linear_impl<scalar_t>(x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                          bias ? bias->data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), x.size(0), w.size(0),
                          x.size(1));
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("memory_decode_step", &memory_decode_step, "one token of the memory layer (layers/decode.py)");
  m.def("memory_decode_read", &memory_decode_read, "MAC's read of the segment-start memory (layers/decode.py)");
  m.def("rms_norm", &rms_norm, "RMSNorm of one token per row");
  m.def("linear_rows", &linear_rows, "x W^T (+ b) for a few rows (layers/decode.py)", py::arg("x"), py::arg("w"),
        py::arg("bias") = py::none());
  m.def("branch_gate", &branch_gate, "RMSNorm_y(y) * sigmoid(RMSNorm_m(m)) (variants.BranchGate)");
  m.def("attend_step", &attend_step, "RoPE, cache write and one query's attention (layers/decode.py)");
}
