// The memory layer's hot loops in C++ (titans/ops/native.py builds and loads this): the chunk
// path's per-piece forward, state update and backward (the same math as chunk.py and
// chunk_backward.py), and the layer's input and output paths (features.py). The Python code stays
// the definition and the fallback; the tests compare the two.
//
// Shape legend (as in chunk.py): BH = B * H; n tokens in the piece; per layer l the state
// WS = [W; S], [BH, 2 do, di], fp32; a, hq: layer inputs [BH, n, di]; delta, zk, zq, t: [BH, n, do];
// P, G: [BH, n, n]; gates beta, g, s_last: [BH, n], e_last: [BH].
//
// Why it exists: in Python each piece's backward is ~300 small torch operations, and the passes
// over the multi-megabyte state are separate operations each reading the state again. Here the
// elementwise chains are fused into single loops and the state passes into one, and no Python
// runs between the products. The products are MKL's, called directly: bf16 operands with fp32
// accumulation when `mixed` (as titans/ops/blas.py), else fp32 sgemm.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include <immintrin.h>
#include <omp.h>

using at::Tensor;

extern "C" void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                       const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                                       float* c, int ldc);
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

struct Operand {
  int trans;
  int64_t ld;
  Tensor t;
};

// MKL reads a matrix with unit stride along either of its last two dims; anything else is copied.
Operand operand(Tensor x) {
  const int64_t r = x.size(-2), c = x.size(-1);
  if (x.stride(-1) == 1 && x.stride(-2) >= std::max<int64_t>(1, c)) return {kNoTrans, x.stride(-2), x};
  if (x.stride(-2) == 1 && x.stride(-1) >= std::max<int64_t>(1, r)) return {kTrans, x.stride(-1), x};
  x = x.contiguous();
  return {kNoTrans, std::max<int64_t>(1, c), x};
}

// One product C = alpha op(A) op(B) + beta C on raw row-major pointers (MKL): bf16 operands with
// fp32 accumulation when `mixed`, else fp32. ta, tb: kNoTrans or kTrans; C has unit-stride rows.
// Inside a parallel region MKL runs it on the calling thread alone.
void gemm_raw(bool mixed, int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const void* A, int64_t lda,
              const void* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (mixed) {
    cblas_gemm_bf16bf16f32(kRowMajor, ta, tb, (int)m, (int)n, (int)k, alpha, (const uint16_t*)A, (int)lda,
                           (const uint16_t*)B, (int)ldb, beta, C, (int)ldc);
    return;
  }
  // Fortran (column-major) sgemm on the transposed problem: C^T = op(B)^T op(A)^T
  const char tA = ta == kTrans ? 'T' : 'N', tB = tb == kTrans ? 'T' : 'N';
  const int M = (int)m, N = (int)n, K = (int)k, LDA = (int)lda, LDB = (int)ldb, LDC = (int)ldc;
  sgemm_(&tB, &tA, &N, &M, &K, &alpha, (const float*)B, &LDB, (const float*)A, &LDA, &beta, C, &LDC);
}

// out = alpha a @ b + beta out, batched over dim 0 (a size-1 batch broadcasts). out: fp32 with
// unit-stride rows. mixed: bf16 operands (cast here if needed), fp32 accumulation; else fp32.
// With beta = 0 out's old values are never read.
void gemm(const Tensor& out, Tensor a, Tensor b, float alpha, float beta, bool mixed) {
  const int64_t N = out.size(0), m = out.size(1), n = out.size(2), k = a.size(2);
  if (m == 0 || n == 0) return;
  const auto dtype = mixed ? at::kBFloat16 : at::kFloat;
  if (a.scalar_type() != dtype) a = a.to(dtype);
  if (b.scalar_type() != dtype) b = b.to(dtype);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.stride(-1) == 1, "gemm: out must be fp32 with unit-stride rows");
  const Operand A = operand(a), B = operand(b);
  if (k == 0) {
    if (beta == 0.f) out.zero_(); else out.mul_(beta);
    return;
  }
  const auto* pa = static_cast<const char*>(A.t.data_ptr());
  const auto* pb = static_cast<const char*>(B.t.data_ptr());
  const int64_t es = A.t.element_size();
  const int64_t sa = A.t.size(0) > 1 ? A.t.stride(0) * es : 0, sb = B.t.size(0) > 1 ? B.t.stride(0) * es : 0;
  float* pc = out.data_ptr<float>();
  auto one = [&](int64_t i) {
    gemm_raw(mixed, A.trans, B.trans, m, n, k, alpha, pa + i * sa, A.ld, pb + i * sb, B.ld, beta,
             pc + i * out.stride(0), out.stride(1));
  };
  if (N == 1) {
    one(0);  // MKL threads it (inside even an inactive parallel region it would run on one thread)
    return;
  }
  // several small products: one thread each, cheaper than splitting every small product over all threads
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < N; i++) one(i);
}

// fp32 -> bf16, round to nearest even (as torch's .to(torch.bfloat16)); NaN stays NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

// o[j] = bf16(scale * x[j]) for j < n: AVX512-BF16's conversion (round to nearest even) where the
// CPU has it, else to_bf16.
inline void to_bf16_row(const float* x, uint16_t* o, int64_t n, float scale = 1.f) {
  int64_t j = 0;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  const __m512 sc = _mm512_set1_ps(scale);
  for (; j + 16 <= n; j += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(x + j), sc));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), reinterpret_cast<const __m256i&>(v));
  }
#endif
  for (; j < n; j++) o[j] = to_bf16(scale * x[j]);
}

inline uint16_t* bf16_ptr(const Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Rows of a [BH, n, d] tensor whose last dim has unit stride: pointer to row (i, j).
template <typename T>
struct Rows {
  T* p;
  int64_t sb, sr;
  Rows(const Tensor& t) : p(t.data_ptr<T>()), sb(t.stride(0)), sr(t.stride(1)) {
    TORCH_CHECK(t.dim() == 3 && t.stride(2) == 1, "native chunk path: rows must have unit stride");
  }
  T* operator()(int64_t i, int64_t j) const { return p + i * sb + j * sr; }
};

// An operand for the products: with `mixed` a bf16 copy (into `out` when given: recycled state-sized
// buffers, which fresh allocations would page-fault in), else the tensor itself. A plain loop:
// torch's .to() costs ~20 us of overhead on the [64, 384] factors, more than the copy.
Tensor to_mm(const Tensor& x, bool mixed, Tensor out = Tensor()) {
  if (!mixed) return x;
  if (x.dim() != 3 || x.stride(2) != 1 || x.scalar_type() != at::kFloat) return x.to(at::kBFloat16);
  if (!out.defined()) out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes(), "to_mm: out must be contiguous, shaped like x");
  const int64_t R = x.size(1), C = x.size(2), rows = x.size(0) * R;
  const Rows<float> X(x);
  uint16_t* o = bf16_ptr(out);
#pragma omp parallel for if (rows * C >= (1 << 16)) schedule(static)
  for (int64_t rr = 0; rr < rows; rr++) {
    const float* xr = X(rr / R, rr % R);
    uint16_t* orow = o + rr * C;
    to_bf16_row(xr, orow, C);
  }
  return out;
}

inline float silu_grad(float z, float s) { return s * (1.f + z * (1.f - s)); }
inline float silu_grad2(float z, float s) { return s * (1.f - s) * (2.f + z * (1.f - 2.f * s)); }

// Row loops over at least this many entries are split over the threads.
constexpr int64_t kParallelMin = 1 << 15;

constexpr int64_t kBlock = 4096;  // entries summed in fp32 before the running sum moves to double

// chunk_end_pass over entries [lo, hi) of each half, on the calling thread; sums: its three inner
// products, added to.
inline void chunk_end_range(float* dE, const float* WS, int64_t half, int64_t lo, int64_t hi, float b, float g,
                            float e, uint16_t* dEc, uint16_t* WSc, double* sums) {
  float *dW = dE, *dS = dE + half;
  const float *W = WS, *S = WS + half;
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t j0 = lo; j0 < hi; j0 += kBlock) {
    const int64_t j1 = std::min(j0 + kBlock, hi), len = j1 - j0;
    if (WSc) { to_bf16_row(W + j0, WSc + j0, len); to_bf16_row(S + j0, WSc + half + j0, len); }
    if (dEc) { to_bf16_row(dW + j0, dEc + j0, len); to_bf16_row(dS + j0, dEc + half + j0, len); }
    float a0 = 0, a1 = 0, a2 = 0;
#pragma omp simd reduction(+ : a0, a1, a2)
    for (int64_t j = j0; j < j1; j++) {
      const float w = W[j], s = S[j], dw = dW[j], ds = dS[j];
      a0 += dw * w;
      a1 += dw * s;
      a2 += ds * s;
      dS[j] = e * ds + g * dw;
      dW[j] = b * dw;
    }
    s0 += a0; s1 += a1; s2 += a2;
  }
  sums[0] += s0; sums[1] += s1; sums[2] += s2;
}

// The backward's chunk end for one batch entry of one layer, in one pass over the state:
//   dots += (<dW, W>, <dW, S>, <dS, S>) (per thread, in a fixed order: deterministic);
//   dEc, WSc (if not null): bf16 copies of dE (before the carry below) and of WS;
//   then in place dE <- [b dW; g dW + e dS] (the carry, transposed).
void chunk_end_pass(float* dE, const float* WS, int64_t half, float b, float g, float e, uint16_t* dEc,
                    uint16_t* WSc, double* dots) {
  std::vector<double> part(3 * omp_get_max_threads(), 0.0);
  int used = 1;
#pragma omp parallel
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    chunk_end_range(dE, WS, half, half * t / T, half * (t + 1) / T, b, g, e, dEc, WSc, &part[3 * t]);
    if (t == 0) used = T;
  }
  for (int i = 0; i < used; i++) for (int c = 0; c < 3; c++) dots[c] += part[3 * i + c];
}

// x * SiLU'(z), [BH, n, d] each. The same roundings as torch's `x * (s * (1 + z * (1 - s)))`
// with s = sigmoid(z) (KeptInternals.expand rebuilds the key path's delta that way, bit for bit).
Tensor times_silu_grad(const Tensor& x, const Tensor& z) {
  const int64_t BH = x.size(0), n = x.size(1), d = x.size(2);
  const Tensor s = at::sigmoid(z);
  Tensor out = at::empty({BH, n, d}, x.options());
  Rows<float> X(x), Z(z), Sg(s), O(out);
  #pragma omp parallel for collapse(2) schedule(static) if (BH * n * d >= kParallelMin)
  for (int64_t i = 0; i < BH; i++)
    for (int64_t r = 0; r < n; r++) {
      const float *xr = X(i, r), *zr = Z(i, r), *sr = Sg(i, r);
      float* o = O(i, r);
#pragma omp simd
      for (int64_t j = 0; j < d; j++) o[j] = xr[j] * silu_grad(zr[j], sr[j]);
    }
  return out;
}

// A [BH, n, 2 d] factor [x * gx, x * gy] (rows scaled per token), in the products' dtype.
// x: [BH, n, d]; gx, gy: [BH, n] (any strides along n).
Tensor pair(const Tensor& x, const Tensor& gx, const Tensor& gy, float sign, bool mixed) {
  const int64_t BH = x.size(0), n = x.size(1), d = x.size(2);
  Tensor out = at::empty({BH, n, 2 * d}, x.options().dtype(mixed ? at::kBFloat16 : at::kFloat));
  Rows<float> X(x);
  auto GX = gx.accessor<float, 2>(), GY = gy.accessor<float, 2>();
  #pragma omp parallel for collapse(2) schedule(static) if (BH * n * d >= kParallelMin)
  for (int64_t i = 0; i < BH; i++) {
    for (int64_t r = 0; r < n; r++) {
      const float* xr = X(i, r);
      const float a = sign * GX[i][r], c = sign * GY[i][r];
      if (mixed) {
        uint16_t* o = bf16_ptr(out) + (i * n + r) * 2 * d;
        to_bf16_row(xr, o, d, a);
        to_bf16_row(xr, o + d, d, c);
      } else {
        float* o = out.data_ptr<float>() + (i * n + r) * 2 * d;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) { o[j] = a * xr[j]; o[d + j] = c * xr[j]; }
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The fp32 state update without MKL (advance_state's carry and rank-n update in one pass):
//   O_W = b W + g S + F_W^T A,   O_S = e S + F_S^T A
// F: [n, 2 r] (F_W, F_S side by side), A: [n, c]; W, S, O_W, O_S: [r, c]. MKL's product ran near
// the CPU's fp32 rate on these rank-64 shapes in isolation, but it reads and writes the
// multi-megabyte state in a pass of its own besides the carry's, with too little arithmetic per
// byte to hide the memory traffic; here each tile of the state is read once, held in registers
// while its n terms are added, and written once. The layer's forward+backward at config (a)
// (T=4096, fp32) ran 4-5% faster (ad-hoc A/B: 4,185 -> 4,386-4,417 tok/s).
#if defined(__AVX512F__)
constexpr bool kFusedUpdate = true;
constexpr int kTileRows = 6;  // 6 rows x 32 columns of both halves: 24 of the 32 vector registers

// One tile: MR rows from r0 and 32 columns from j0 (m0, m1: which of them exist, 16 at a time) of
// both halves. Fp: the tile's coefficients packed [n][2 MR] (F_W's MR rows, then F_S's).
template <int MR>
inline void advance_tile(int64_t n, const float* Fp, const float* A, int64_t lda, const float* W, const float* S,
                         float* OW, float* OS, int64_t c, float b, float g, float e, __mmask16 m0, __mmask16 m1) {
  __m512 aw[MR][2], as[MR][2];
  const __m512 vb = _mm512_set1_ps(b), vg = _mm512_set1_ps(g), ve = _mm512_set1_ps(e);
#pragma GCC unroll 16  // unrolled, the accumulators stay in registers (else GCC keeps them on the stack)
  for (int i = 0; i < MR; i++) {
    const __m512 s0 = _mm512_maskz_loadu_ps(m0, S + i * c), s1 = _mm512_maskz_loadu_ps(m1, S + i * c + 16);
    const __m512 w0 = _mm512_maskz_loadu_ps(m0, W + i * c), w1 = _mm512_maskz_loadu_ps(m1, W + i * c + 16);
    aw[i][0] = _mm512_add_ps(_mm512_mul_ps(vb, w0), _mm512_mul_ps(vg, s0));
    aw[i][1] = _mm512_add_ps(_mm512_mul_ps(vb, w1), _mm512_mul_ps(vg, s1));
    as[i][0] = _mm512_mul_ps(ve, s0);
    as[i][1] = _mm512_mul_ps(ve, s1);
  }
  for (int64_t k = 0; k < n; k++) {
    const __m512 a0 = _mm512_maskz_loadu_ps(m0, A + k * lda), a1 = _mm512_maskz_loadu_ps(m1, A + k * lda + 16);
    const float* f = Fp + k * 2 * MR;
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++) {
      const __m512 fw = _mm512_set1_ps(f[i]), fs = _mm512_set1_ps(f[MR + i]);
      aw[i][0] = _mm512_fmadd_ps(fw, a0, aw[i][0]);
      aw[i][1] = _mm512_fmadd_ps(fw, a1, aw[i][1]);
      as[i][0] = _mm512_fmadd_ps(fs, a0, as[i][0]);
      as[i][1] = _mm512_fmadd_ps(fs, a1, as[i][1]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; i++) {
    _mm512_mask_storeu_ps(OW + i * c, m0, aw[i][0]);
    _mm512_mask_storeu_ps(OW + i * c + 16, m1, aw[i][1]);
    _mm512_mask_storeu_ps(OS + i * c, m0, as[i][0]);
    _mm512_mask_storeu_ps(OS + i * c + 16, m1, as[i][1]);
  }
}

// The update for every batch entry, F = -[delta G_n, delta s_n] (as pair() would make it); the
// threads split the tiles' rows. WS, out: [BH, 2 r, c] contiguous; delta: [BH, n, r], A: [BH, n, c]
// with unit-stride rows; G_n, s_n: [BH, n]; b, g, e per entry.
void advance_fused(const Tensor& WS, const Tensor& out, const Tensor& delta, const Tensor& G_n, const Tensor& s_n,
                   const Tensor& A, const std::vector<float>& b, const std::vector<float>& g,
                   const std::vector<float>& e) {
  const int64_t BH = WS.size(0), r = WS.size(1) / 2, c = WS.size(2), n = delta.size(1);
  const int64_t tiles = (r + kTileRows - 1) / kTileRows;
  const Rows<float> D(delta);
  const auto Gn = G_n.accessor<float, 2>(), Sn = s_n.accessor<float, 2>();
#pragma omp parallel
  {
    // a tile's coefficients, packed [n][2 MR]: read from F in place they touched a new page per
    // token (rows of F are 2 r floats apart) and the update ran 1.4x slower (ad-hoc timing)
    std::vector<float> Fp(2 * kTileRows * n);
#pragma omp for schedule(static)
    for (int64_t w = 0; w < BH * tiles; w++) {
      const int64_t i = w / tiles, r0 = (w % tiles) * kTileRows;
      const int mr = (int)std::min<int64_t>(kTileRows, r - r0);
      for (int64_t k = 0; k < n; k++) {
        const float* d = D(i, k) + r0;
        const float cw = -Gn[i][k], cs = -Sn[i][k];
        for (int h = 0; h < mr; h++) {
          Fp[k * 2 * mr + h] = cw * d[h];
          Fp[k * 2 * mr + mr + h] = cs * d[h];
        }
      }
      const float* W = WS.data_ptr<float>() + i * 2 * r * c + r0 * c;
      float* O = out.data_ptr<float>() + i * 2 * r * c + r0 * c;
      const float* a = A.data_ptr<float>() + i * A.stride(0);
      for (int64_t j = 0; j < c; j += 32) {
        const int64_t left = c - j;
        const __mmask16 m0 = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1);
        const __mmask16 m1 = left >= 32 ? 0xffff : left <= 16 ? 0 : (__mmask16)((1u << (left - 16)) - 1);
        switch (mr) {
#define TILE(M)                                                                                                \
  case M:                                                                                                      \
    advance_tile<M>(n, Fp.data(), a + j, A.stride(1), W + j, W + r * c + j, O + j, O + r * c + j, c, b[i], g[i], \
                    e[i], m0, m1);                                                                             \
    break;
          TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
#undef TILE
        }
      }
    }
  }
}
#else
constexpr bool kFusedUpdate = false;
void advance_fused(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                   const std::vector<float>&, const std::vector<float>&, const std::vector<float>&) {
  TORCH_CHECK(false, "advance_fused needs AVX-512");
}
#endif

// Per-batch gate scalars at the piece end.
struct EndGates {
  std::vector<float> b, g, e;
};

EndGates end_gates(const Tensor& beta, const Tensor& g, const Tensor& e_last) {
  const int64_t BH = beta.size(0), n = beta.size(1);
  auto B = beta.accessor<float, 2>(), Gg = g.accessor<float, 2>();
  auto E = e_last.accessor<float, 1>();
  EndGates out;
  for (int64_t i = 0; i < BH; i++) {
    out.b.push_back(B[i][n - 1]);
    out.g.push_back(Gg[i][n - 1]);
    out.e.push_back(E[i]);
  }
  return out;
}

}  // namespace

namespace {

// The fp32 chunk end of one layer in one pass over the state, a block of rows (of both halves) at
// a time while it is in cache: X = a dE^T (the block's columns of it), da = F dE (each thread sums
// its blocks' terms, then the threads' sums are added in a fixed order), the inner products of
// chunk_end_pass and then the transposed carry. As two products and chunk_end_pass, each read the
// multi-megabyte state from memory again. dE, WS: [BH, 2 r, c] contiguous; a: [BH, n, c] and F:
// [BH, n, 2 r] with unit-stride rows; X: [BH, n, 2 r] and da: [BH, n, c] written (contiguous);
// dots: 3 per batch entry, added to.
void chunk_end_blocked(const Tensor& dE, const Tensor& WS, const Tensor& a, const Tensor& F, const Tensor& X,
                       Tensor da, const EndGates& eg, double* dots) {
  const int64_t BH = dE.size(0), r = dE.size(1) / 2, c = dE.size(2), n = a.size(1);
  const int T = omp_get_max_threads();
  // blocks of at most ~384 KB per half (a block's both halves and the products' operands fit in
  // a core's 2 MB L2), their number a multiple of the thread count
  const int64_t most = std::max<int64_t>(8, (96 * 1024) / c);
  int64_t nb = ((r + most - 1) / most + T - 1) / T * T;
  const int64_t rows = (r + nb - 1) / nb;
  nb = (r + rows - 1) / rows;
  Tensor part = at::zeros({T, BH, n, c}, X.options());
  std::vector<double> dpart((size_t)T * BH * 3, 0.0);
#pragma omp parallel
  {
    const int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t w = 0; w < BH * nb; w++) {
      const int64_t i = w / nb, r0 = (w % nb) * rows, m = std::min(rows, r - r0);
      float* dW = dE.data_ptr<float>() + i * 2 * r * c;
      const float* ai = a.data_ptr<float>() + i * a.stride(0);
      const float* Fi = F.data_ptr<float>() + i * F.stride(0);
      float* Xi = X.data_ptr<float>() + i * n * 2 * r;
      float* P = part.data_ptr<float>() + (t * BH + i) * n * c;
      for (int64_t h = 0; h < 2; h++) {  // the block's rows of the W half, then of the S half
        const float* block = dW + (h * r + r0) * c;
        gemm_raw(false, kNoTrans, kTrans, n, m, c, 1.f, ai, a.stride(1), block, c, 0.f, Xi + h * r + r0, 2 * r);
        gemm_raw(false, kNoTrans, kNoTrans, n, c, m, 1.f, Fi + h * r + r0, F.stride(1), block, c, 1.f, P, c);
      }
      chunk_end_range(dW, WS.data_ptr<float>() + i * 2 * r * c, r * c, r0 * c, (r0 + m) * c, eg.b[i], eg.g[i],
                      eg.e[i], nullptr, nullptr, &dpart[(t * BH + i) * 3]);
    }
  }
  for (int t = 0; t < T; t++) {
    for (int64_t i = 0; i < 3 * BH; i++) dots[i] += dpart[t * BH * 3 + i];
  }
  at::sum_out(da, part, {0});
}

// advance_state with the key-path inputs already in the products' dtype (acs: to_mm of a).
std::vector<Tensor> advance_state_mm(const std::vector<Tensor>& WS, const std::vector<Tensor>& acs,
                                     const std::vector<Tensor>& delta, const Tensor& beta, const Tensor& g,
                                     const Tensor& G, const Tensor& e_last, const Tensor& s_last,
                                     std::vector<Tensor> out, bool mixed) {
  const int64_t n = beta.size(1), BH = beta.size(0);
  const EndGates eg = end_gates(beta, g, e_last);
  Tensor G_n = G.select(1, n - 1);  // [BH, n]
  for (size_t l = 0; l < WS.size(); l++) {
    const int64_t r = WS[l].size(1) / 2, c = WS[l].size(2);
    TORCH_CHECK(WS[l].is_contiguous() && out[l].is_contiguous(), "native advance_state: states must be contiguous");
    const Tensor& A = acs[l];
    TORCH_CHECK(A.stride(2) == 1, "native advance_state: key-path inputs need unit-stride rows");
    if (kFusedUpdate && !mixed) {
      advance_fused(WS[l], out[l], delta[l], G_n, s_last, A, eg.b, eg.g, eg.e);
      continue;
    }
    // F = -[delta G_n, delta s_n]: [BH, n, 2 r]; the update is F^T a (the sign in the small factor:
    // MKL's bf16 kernel is faster with alpha = beta = 1)
    const Tensor F = pair(delta[l], G_n, s_last, -1.f, mixed);
    const int64_t es = F.element_size(), rows = std::max<int64_t>(8, (1 << 16) / c), blocks = (r + rows - 1) / rows;
    // the carry and the update one block of rows at a time, the block still in cache for the
    // product, one thread per block (the products run on the calling thread inside the region)
#pragma omp parallel for schedule(static) collapse(2)
    for (int64_t i = 0; i < BH; i++) {
      for (int64_t bk = 0; bk < blocks; bk++) {
        const int64_t r0 = bk * rows, r1 = std::min(r, r0 + rows);
        const float* W = WS[l].data_ptr<float>() + i * 2 * r * c;
        float* O = out[l].data_ptr<float>() + i * 2 * r * c;
        const float b = eg.b[i], gg = eg.g[i], e = eg.e[i];
#pragma omp simd
        for (int64_t j = r0 * c; j < r1 * c; j++) {
          const float w = W[j], sv = W[r * c + j];
          O[j] = b * w + gg * sv;
          O[r * c + j] = e * sv;
        }
        const char* f = static_cast<const char*>(F.data_ptr()) + i * F.stride(0) * es;
        const char* av = static_cast<const char*>(A.data_ptr()) + i * A.stride(0) * A.element_size();
        for (int64_t half = 0; half < 2; half++) {  // rows r0..r1 of the W half, then of the S half
          gemm_raw(mixed, kTrans, kNoTrans, r1 - r0, c, n, 1.f, f + (half * r + r0) * es, 2 * r, av, A.stride(1),
                   1.f, O + (half * r + r0) * c, c);
        }
      }
    }
  }
  return out;
}

}  // namespace

// The state after a piece (chunk.advance_state): per layer
//   WS' = [b_n W + g_n S; e_n S] - [delta G_n, delta s_n]^T a.
// out: per layer [BH, 2 do, di] fp32 buffers to write into; returns them.
std::vector<Tensor> advance_state(std::vector<Tensor> WS, std::vector<Tensor> a, std::vector<Tensor> delta,
                                  Tensor beta, Tensor g, Tensor G, Tensor e_last, Tensor s_last,
                                  std::vector<Tensor> out, bool mixed) {
  for (auto& x : a) x = to_mm(x, mixed);
  return advance_state_mm(WS, a, delta, beta, g, G, e_last, s_last, std::move(out), mixed);
}

// NaN-propagating min, as torch.minimum / clamp_max (a NaN gate must reach the trainer's check).
inline float nan_min(float x, float y) { return (std::isnan(x) || std::isnan(y)) ? NAN : std::min(x, y); }

inline float sum_sq(const float* x, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; j++) s += x[j] * x[j];
  return s;
}

// chunk.step_scale (nets.normalized_step) in one pass per token, and delta and t scaled by it in
// place: s = min(1, |dl/df|^2 |k|^2 / |u|^2, sqrt(16 max(|v|^2, |k|^2) / |dl/df|^2)), a bound 1 where
// its denominator is 0, |u|^2 = sum_l |delta_l|^2 |a_l|^2. Returns s, [BH, n]. (In torch operations
// these were ~20 small kernels per piece, most of the key path's time at batch 1.)
Tensor step_scale(const std::vector<Tensor>& a, std::vector<Tensor>& delta, std::vector<Tensor>& t, const Tensor& v) {
  const int64_t L = (int64_t)delta.size(), BH = v.size(0), n = v.size(1);
  Tensor scale = at::empty({BH, n}, v.options());
  float* sc = scale.data_ptr<float>();
  std::vector<Rows<float>> A, D, Tt;
  for (int64_t l = 0; l < L; l++) {
    A.emplace_back(a[l]);
    D.emplace_back(delta[l]);
  }
  for (auto& x : t) Tt.emplace_back(x);
  const Rows<float> V(v);
  const float tiny = std::numeric_limits<float>::min();
  const int64_t work = BH * n * v.size(2) * 2 * L;
  #pragma omp parallel for collapse(2) schedule(static) if (work >= kParallelMin)
  for (int64_t i = 0; i < BH; i++)
    for (int64_t r = 0; r < n; r++) {
      float un = 0.f, k2 = 0.f, dl = 0.f;
      for (int64_t l = 0; l < L; l++) {
        const float d2 = sum_sq(D[l](i, r), delta[l].size(2)), a2 = sum_sq(A[l](i, r), a[l].size(2));
        un += d2 * a2;
        if (l == 0) k2 = a2;
        if (l == L - 1) dl = d2;
      }
      const float v2 = sum_sq(V(i, r), v.size(2));
      const float ratio = un > 0.f ? dl * k2 / std::max(un, tiny) : 1.f;
      const float bound = (std::isnan(v2) || std::isnan(k2) ? NAN : std::max(v2, k2)) * 16.f;
      const float clip = dl > 0.f ? std::sqrt(bound / std::max(dl, tiny)) : 1.f;
      const float s = nan_min(nan_min(ratio, clip), 1.f);
      sc[i * n + r] = s;
      for (int64_t l = 0; l < L; l++) {
        float* d = D[l](i, r);
#pragma omp simd
        for (int64_t j = 0; j < delta[l].size(2); j++) d[j] *= s;
      }
      for (size_t l = 0; l < Tt.size(); l++) {
        float* x = Tt[l](i, r);
#pragma omp simd
        for (int64_t j = 0; j < t[l].size(2); j++) x[j] *= s;
      }
    }
  return scale;
}

// The key path (chunk.key_path): the memory's forward on the keys at Wg and the analytic backward
// of ||f(k) - v||^2. Wgc: per layer [BH, do, di] in the products' dtype. Fills a (a[0] = k), zk,
// delta, t, and acs, dcs: a and delta as product operands.
void key_path(const Tensor& k, const Tensor& v, const std::vector<Tensor>& Wgc, bool residual, bool mixed,
              bool normalize, std::vector<Tensor>& a, std::vector<Tensor>& zk, std::vector<Tensor>& delta,
              std::vector<Tensor>& t, std::vector<Tensor>& acs, std::vector<Tensor>& dcs, Tensor& scale) {
  const int64_t L = (int64_t)Wgc.size(), BH = k.size(0), n = k.size(1);
  auto opts = k.options();
  a = {k};
  acs = {to_mm(k, mixed)};
  for (int64_t l = 0; l < L - 1; l++) {
    Tensor z = at::empty({BH, n, Wgc[l].size(1)}, opts);
    gemm(z, acs[l], Wgc[l].transpose(1, 2), 1.f, 0.f, mixed);
    zk.push_back(z);
    a.push_back(at::silu(z));
    acs.push_back(to_mm(a.back(), mixed));
  }
  const int64_t dv = Wgc[L - 1].size(1);
  Tensor out = at::empty({BH, n, dv}, opts);
  gemm(out, acs[L - 1], Wgc[L - 1].transpose(1, 2), 1.f, 0.f, mixed);
  {  // delta_L = 2 (out + k - v) with the residual, else 2 (out - v)
    Rows<float> O(out), V(v), K(k);
    #pragma omp parallel for collapse(2) schedule(static) if (BH * n * dv >= kParallelMin)
    for (int64_t i = 0; i < BH; i++)
      for (int64_t r = 0; r < n; r++) {
        float* o = O(i, r);
        const float *vr = V(i, r), *kr = K(i, r);
        if (residual) {
#pragma omp simd
          for (int64_t j = 0; j < dv; j++) o[j] = 2.f * (o[j] + kr[j] - vr[j]);
        } else {
#pragma omp simd
          for (int64_t j = 0; j < dv; j++) o[j] = 2.f * (o[j] - vr[j]);
        }
      }
  }
  delta.assign(L, Tensor());
  dcs.assign(L, Tensor());
  t.assign(L > 1 ? L - 1 : 0, Tensor());
  delta[L - 1] = out;
  dcs[L - 1] = to_mm(out, mixed);
  for (int64_t l = L - 2; l >= 0; l--) {
    const int64_t doo = Wgc[l].size(1);
    t[l] = at::empty({BH, n, doo}, opts);
    gemm(t[l], dcs[l + 1], Wgc[l + 1], 1.f, 0.f, mixed);
    delta[l] = times_silu_grad(t[l], zk[l]);
    dcs[l] = to_mm(delta[l], mixed);
  }
  if (normalize) {  // chunk.step_scale: delta and t times its s_m
    scale = step_scale(a, delta, t, v);
    for (int64_t l = 0; l < L; l++) dcs[l] = to_mm(delta[l], mixed);
  }
}

// One piece inside one chunk (chunk.piece_forward). WS: per layer [BH, 2 do, di] fp32, the state at
// the piece start; Wg_given: where the gradients are taken (empty: W itself, the piece starts a
// chunk); out: buffers for the state after the piece (empty: do not advance); scratch: per layer a
// bf16 buffer shaped like WS for its copy (mixed; empty: allocate).
// normalize: the normalised step (delta and t come scaled, the scale is returned; else None).
// Returns (y, WS after the piece or [], a, zk, delta, t, hq, zq (layers 0..L-2), P, scale).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
           std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, c10::optional<Tensor>>
piece_forward(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor g, Tensor G, Tensor e_last, Tensor s_last,
              std::vector<Tensor> WS, std::vector<Tensor> Wg_given, std::vector<Tensor> out,
              std::vector<Tensor> scratch, bool residual, bool mixed, bool normalize) {
  const int64_t L = (int64_t)WS.size(), BH = q.size(0), n = q.size(1);
  auto opts = q.options();
  std::vector<Tensor> WSc(L), Wgc(L);
  for (int64_t l = 0; l < L; l++) {
    const int64_t doo = WS[l].size(1) / 2;
    WSc[l] = to_mm(WS[l], mixed, scratch.empty() ? Tensor() : scratch[l]);
    Wgc[l] = Wg_given.empty() ? WSc[l].narrow(1, 0, doo) : to_mm(Wg_given[l], mixed);
  }
  std::vector<Tensor> a, zk, delta, t, acs, dcs;
  Tensor scale;
  key_path(k, v, Wgc, residual, mixed, normalize, a, zk, delta, t, acs, dcs, scale);

  // query path: z_i = beta_i W h_i + g_i S h_i - sum_{m<=i} G_{i,m} (a_m . h_i) delta_m
  auto Be = beta.accessor<float, 2>(), Ga = g.accessor<float, 2>();
  std::vector<Tensor> hq = {q}, zq, P;
  Tensor hc = to_mm(q, mixed);
  for (int64_t l = 0; l < L; l++) {
    const int64_t doo = WS[l].size(1) / 2;
    Tensor m = at::empty({BH, n, 2 * doo}, opts);  // W h and S h at once
    gemm(m, hc, WSc[l].transpose(1, 2), 1.f, 0.f, mixed);
    Tensor Pl = at::empty({BH, n, n}, opts);
    gemm(Pl, hc, acs[l].transpose(1, 2), 1.f, 0.f, mixed);
    P.push_back(Pl);
    Tensor z = at::empty({BH, n, doo}, opts);
    {
      Rows<float> M(m), Z(z);
      #pragma omp parallel for collapse(2) schedule(static) if (BH * n * doo >= kParallelMin)
      for (int64_t i = 0; i < BH; i++)
        for (int64_t r = 0; r < n; r++) {
          const float *mw = M(i, r), *ms = mw + doo;
          float* zr = Z(i, r);
          const float bb = Be[i][r], gg = Ga[i][r];
#pragma omp simd
          for (int64_t j = 0; j < doo; j++) zr[j] = bb * mw[j] + gg * ms[j];
        }
    }
    gemm(z, at::mul(G, Pl).neg_(), dcs[l], 1.f, 1.f, mixed);
    zq.push_back(z);
    if (l < L - 1) {
      hq.push_back(at::silu(z));
      hc = to_mm(hq.back(), mixed);
    }
  }
  Tensor y = residual ? zq[L - 1] + q : zq[L - 1];
  zq.pop_back();  // the last layer's pre-activation is not needed by the backward
  std::vector<Tensor> WS_new;
  if (!out.empty()) WS_new = advance_state_mm(WS, acs, delta, beta, g, G, e_last, s_last, out, mixed);
  c10::optional<Tensor> scale_out;
  if (normalize) scale_out = scale;
  return {y, WS_new, a, zk, delta, t, hq, zq, P, scale_out};
}

// The elementwise part of KeptInternals.expand: a[l + 1] = SiLU(zk[l]), delta[l] = t[l] * SiLU'(zk[l]),
// hq[l + 1] = SiLU(zq[l]) for l < L - 1, with the functions piece_forward used (bit for bit what it
// computed). Returns [a[1:], delta[:-1], hq[1:]]; in Python these took ~10 torch operations per layer.
std::vector<std::vector<Tensor>> expand(std::vector<Tensor> zk, std::vector<Tensor> t, std::vector<Tensor> zq) {
  std::vector<Tensor> a, delta, hq;
  for (size_t l = 0; l < zk.size(); l++) {
    a.push_back(at::silu(zk[l]));
    delta.push_back(times_silu_grad(t[l], zk[l]));
    hq.push_back(at::silu(zq[l]));
  }
  return {a, delta, hq};
}

// One piece's backward (chunk_backward.piece_backward with the SiLU activation); the same
// arguments, flattened. dWS: per layer the gradient of the piece-end state, overwritten with
// that of the piece-start state. The gate gradients (dbeta ... ds) are accumulated in place.
// scratch: 2 L bf16 buffers shaped like WS (per layer: the copies of WS and of dWS; mixed; empty: allocate).
// Returns [dq, dk, dv, dWg per layer (only when Wg_given is not empty)].
std::vector<Tensor> piece_backward(std::vector<Tensor> a, std::vector<Tensor> zk, std::vector<Tensor> delta,
                                   std::vector<Tensor> t, std::vector<Tensor> hq, std::vector<Tensor> zq,
                                   std::vector<Tensor> P, c10::optional<Tensor> scale, Tensor beta, Tensor g,
                                   Tensor G, Tensor e_last,
                                   Tensor s_last, std::vector<Tensor> WS, std::vector<Tensor> Wg_given,
                                   Tensor dy, std::vector<Tensor> dWS, Tensor dbeta, Tensor dg, Tensor dG,
                                   Tensor de, Tensor ds, std::vector<Tensor> scratch, bool residual, bool mixed) {
  const int64_t L = (int64_t)WS.size(), BH = dy.size(0), n = dy.size(1);
  const EndGates eg = end_gates(beta, g, e_last);
  Tensor G_n = G.select(1, n - 1);  // [BH, n]
  auto opts = dy.options();
  std::vector<int64_t> dos, dis;
  for (auto& ws : WS) { dos.push_back(ws.size(1) / 2); dis.push_back(ws.size(2)); }

  // operands used by several products, cast once
  std::vector<Tensor> ac, hc, dc;
  for (int64_t l = 0; l < L; l++) {
    ac.push_back(to_mm(a[l], mixed));
    hc.push_back(to_mm(hq[l], mixed));
    dc.push_back(to_mm(delta[l], mixed));
  }

  // chunk end: WS' = [b_n W + g_n S; e_n S] - coef^T a, coef = [delta G_n, delta s_n]
  std::vector<Tensor> WSc(L), ddelta(L), da(L);
  auto dBe = dbeta.accessor<float, 2>(), dGg = dg.accessor<float, 2>();
  auto dEl = de.accessor<float, 1>();
  for (int64_t l = 0; l < L; l++) {
    const int64_t doo = dos[l], di = dis[l], half = doo * di;
    TORCH_CHECK(WS[l].is_contiguous() && dWS[l].is_contiguous(), "native chunk path: states must be contiguous");
    // X = a dE^T = -(d coef): [BH, n, 2 do]; da = -coef dE; the inner products and the carry
    Tensor X = at::empty({BH, n, 2 * doo}, opts);
    da[l] = at::empty({BH, n, di}, opts);
    std::vector<double> dots(3 * BH, 0.0);
    if (mixed) {  // one pass for the inner products, both bf16 copies and the carry; the products read the copies
      auto bf16_like = [&](const Tensor& x, size_t i) {
        return scratch.empty() ? at::empty_like(x, x.options().dtype(at::kBFloat16)) : scratch[i];
      };
      const Tensor dEc = bf16_like(dWS[l], 2 * l + 1);
      WSc[l] = bf16_like(WS[l], 2 * l);
      for (int64_t i = 0; i < BH; i++) {
        chunk_end_pass(dWS[l][i].data_ptr<float>(), WS[l][i].data_ptr<float>(), half, eg.b[i], eg.g[i], eg.e[i],
                       bf16_ptr(dEc[i]), bf16_ptr(WSc[l][i]), &dots[3 * i]);
      }
      gemm(X, ac[l], dEc.transpose(1, 2), 1.f, 0.f, mixed);
      gemm(da[l], pair(delta[l], G_n, s_last, -1.f, mixed), dEc, 1.f, 0.f, mixed);
    } else {  // all in one blocked pass over dE
      WSc[l] = WS[l];
      chunk_end_blocked(dWS[l], WS[l], a[l], pair(delta[l], G_n, s_last, -1.f, mixed), X, da[l], eg, dots.data());
    }
    // ddelta = -(G_n XW + s_n XS); dG[n-1] -= rowdot(delta, XW); ds -= rowdot(delta, XS)
    ddelta[l] = at::empty({BH, n, doo}, opts);
    {
      Rows<float> Xr(X), D(delta[l]), dd(ddelta[l]);
      auto Gn = G_n.accessor<float, 2>(), Sn = s_last.accessor<float, 2>();
      auto dGa = dG.accessor<float, 3>();
      auto dSa = ds.accessor<float, 2>();
      #pragma omp parallel for collapse(2) schedule(static) if (BH * n * doo >= kParallelMin)
      for (int64_t i = 0; i < BH; i++) {
        for (int64_t r = 0; r < n; r++) {
          const float *xw = Xr(i, r), *xs = xw + doo, *dl = D(i, r);
          float* o = dd(i, r);
          const float gn = Gn[i][r], sn = Sn[i][r];
          float u = 0, v = 0;
#pragma omp simd reduction(+ : u, v)
          for (int64_t j = 0; j < doo; j++) {
            o[j] = -(gn * xw[j] + sn * xs[j]);
            u += dl[j] * xw[j];
            v += dl[j] * xs[j];
          }
          dGa[i][n - 1][r] -= u;
          dSa[i][r] -= v;
        }
      }
    }
    for (int64_t i = 0; i < BH; i++) {
      dBe[i][n - 1] += (float)dots[3 * i];
      dGg[i][n - 1] += (float)dots[3 * i + 1];
      dEl[i] += (float)dots[3 * i + 2];
    }
  }

  // query path, top layer down: z = beta * m_W + g * m_S - R delta, R = G * P, P = h a^T
  auto Be = beta.accessor<float, 2>(), Ga = g.accessor<float, 2>();
  Tensor dz = dy, dh;
  for (int64_t l = L - 1; l >= 0; l--) {
    const int64_t doo = dos[l], di = dis[l];
    if (l < L - 1) dz = times_silu_grad(dh, zq[l]);
    Tensor dzc = to_mm(dz, mixed);
    // X = dz W, Y = dz S: [BH, n, di] each
    Tensor X = at::empty({BH, n, di}, opts), Y = at::empty({BH, n, di}, opts);
    gemm(X, dzc, WSc[l].narrow(1, 0, doo), 1.f, 0.f, mixed);
    gemm(Y, dzc, WSc[l].narrow(1, doo, doo), 1.f, 0.f, mixed);
    // d beta_i += X_i . h_i, d g_i += Y_i . h_i, dh = beta X + g Y (into X)
    {
      Rows<float> Xr(X), Yr(Y), Hr(hq[l]);
      #pragma omp parallel for collapse(2) schedule(static) if (BH * n * di >= kParallelMin)
      for (int64_t i = 0; i < BH; i++)
        for (int64_t r = 0; r < n; r++) {
          float* xr = Xr(i, r);
          const float *yr = Yr(i, r), *hr = Hr(i, r);
          const float bb = Be[i][r], gg = Ga[i][r];
          float u = 0, v = 0;
#pragma omp simd reduction(+ : u, v)
          for (int64_t j = 0; j < di; j++) {
            u += xr[j] * hr[j];
            v += yr[j] * hr[j];
            xr[j] = bb * xr[j] + gg * yr[j];
          }
          dBe[i][r] += u;
          dGg[i][r] += v;
        }
    }
    dh = X;
    gemm(dWS[l], pair(dz, beta, g, 1.f, mixed).transpose(1, 2), hc[l], 1.f, 1.f, mixed);  // d m = [beta dz, g dz]
    // dR = -dz delta^T; ddelta -= (G * P)^T dz; dG += dR * P; dP = dR * G
    Tensor dR = at::empty({BH, n, n}, opts);
    gemm(dR, dzc, dc[l].transpose(1, 2), -1.f, 0.f, mixed);
    Tensor nGP = at::mul(G, P[l]).neg_();
    gemm(ddelta[l], nGP.transpose(1, 2), dzc, 1.f, 1.f, mixed);
    dG.addcmul_(dR, P[l]);
    Tensor dP = dR.mul_(G);
    gemm(dh, dP, ac[l], 1.f, 1.f, mixed);
    gemm(da[l], dP.transpose(1, 2), hc[l], 1.f, 1.f, mixed);
  }
  Tensor dq = residual ? dh.add_(dy) : dh;

  // key path: gradients wrt Wg go straight into dWS when the piece took them at W itself
  const bool given = !Wg_given.empty();
  std::vector<Tensor> dWg(L), Wgc(L);
  for (int64_t l = 0; l < L; l++) {
    dWg[l] = given ? at::zeros_like(Wg_given[l]) : dWS[l].narrow(1, 0, dos[l]);
    Wgc[l] = given ? to_mm(Wg_given[l], mixed) : WSc[l].narrow(1, 0, dos[l]);
  }
  // the analytic inner backward: delta_l = t_l * SiLU'(zk_l), t_l = delta_{l+1} Wg_{l+1}
  std::vector<Tensor> gk(L > 1 ? L - 1 : 0), dzk(L > 1 ? L - 1 : 0);
  for (int64_t l = 0; l < L - 1; l++) {
    const int64_t doo = dos[l];
    Tensor s = at::sigmoid(zk[l]);
    gk[l] = at::empty({BH, n, doo}, opts);
    dzk[l] = at::empty({BH, n, doo}, opts);
    Tensor dt = at::empty({BH, n, doo}, opts);
    Rows<float> Z(zk[l]), Sg(s), Dd(ddelta[l]), Tt(t[l]), Gk(gk[l]), Dz(dzk[l]), Dt(dt);
    #pragma omp parallel for collapse(2) schedule(static) if (BH * n * doo >= kParallelMin)
    for (int64_t i = 0; i < BH; i++)
      for (int64_t r = 0; r < n; r++) {
        const float *zr = Z(i, r), *sr = Sg(i, r), *dr = Dd(i, r), *tr = Tt(i, r);
        float *gr = Gk(i, r), *zo = Dz(i, r), *to = Dt(i, r);
#pragma omp simd
        for (int64_t j = 0; j < doo; j++) {
          const float gv = silu_grad(zr[j], sr[j]);
          gr[j] = gv;
          to[j] = dr[j] * gv;
          zo[j] = dr[j] * tr[j] * silu_grad2(zr[j], sr[j]);
        }
      }
    Tensor dtc = to_mm(dt, mixed);
    gemm(ddelta[l + 1], dtc, Wgc[l + 1].transpose(1, 2), 1.f, 1.f, mixed);
    gemm(dWg[l + 1], dc[l + 1].transpose(1, 2), dtc, 1.f, 1.f, mixed);
  }
  // then delta_L = 2 (out - v) and the memory's forward on the keys; with the normalised step the
  // cache holds scaled delta and t, so only dout takes the scale (chunk_backward.piece_backward)
  Tensor dout = ddelta[L - 1].mul_(2.f);
  if (scale) dout.mul_(scale->unsqueeze(-1));
  Tensor dv = dout.neg();
  Tensor dzl = dout;
  for (int64_t l = L - 1; l >= 0; l--) {
    Tensor dzlc = to_mm(dzl, mixed);
    gemm(dWg[l], dzlc.transpose(1, 2), ac[l], 1.f, 1.f, mixed);
    gemm(da[l], dzlc, Wgc[l], 1.f, 1.f, mixed);
    if (l > 0) {  // dzl = da[l] * gk[l-1] + dzk[l-1], into da[l] (not read again)
      dzl = da[l].mul_(gk[l - 1]).add_(dzk[l - 1]);
    }
  }
  Tensor dk = residual ? da[0].add_(dout) : da[0];
  dG.tril_();
  std::vector<Tensor> result = {dq, dk, dv};
  if (given) result.insert(result.end(), dWg.begin(), dWg.end());
  return result;
}

// ---------------------------------------------------------------------------------------------
// The gate products of chunks (chunk.chunk_gates and chunk_gates_backward) for fp32 rows of n
// tokens: the same quantities from their recurrences, O(n^2) per chunk with no division,
//   beta_i = beta_{i-1} k_i (k = 1 - alpha),  e_i = e_{i-1} eta_i,  g_i = k_i g_{i-1} + e_i,
//   Pe[i, m] = eta_i Pe[i-1, m] (Pe[m, m] = 1),  M[i, m] = k_i M[i-1, m] + Pe[i, m] (M[m, m] = 1),
//   G[i, m] = M[i, m] theta_m,  s_last[m] = Pe[n-1, m] theta_m,  e_last = e_{n-1},
// where the Python code builds the segment-product matrices and multiplies them (~30 torch
// operations per group of chunks, forward and backward). Outputs in (0, 2^-80) are flushed to 0 and
// pass no gradient, as chunk._flush.

inline float flush(float x) { return x > 0.f && x < 0x1p-80f ? 0.f : x; }
inline bool flushed(float x) { return x > 0.f && x < 0x1p-80f; }

// One chunk's forward values. M, Pe: [n, n] row-major (entries m <= i written).
void gates_row(int64_t n, const float* th, const float* et, const float* al, float* keep, float* beta, float* e,
               float* g, float* M, float* Pe) {
  float b = 1.f, ee = 1.f, gg = 0.f;
  for (int64_t i = 0; i < n; i++) {
    keep[i] = 1.f - al[i];
    beta[i] = b = b * keep[i];
    e[i] = ee = ee * et[i];
    g[i] = gg = keep[i] * gg + ee;
  }
  for (int64_t m = 0; m < n; m++) {
    float pe = 1.f, mm = 1.f;
    Pe[m * n + m] = M[m * n + m] = 1.f;
    for (int64_t i = m + 1; i < n; i++) {
      Pe[i * n + m] = pe = pe * et[i];
      M[i * n + m] = mm = keep[i] * mm + pe;
    }
  }
}

// Rows of [..., n] as a contiguous fp32 [R, n] tensor.
Tensor gate_rows(const Tensor& x) { return x.reshape({-1, x.size(-1)}).to(at::kFloat).contiguous(); }

// chunk_gates(theta, eta, alpha) -> [beta, g, G, e_last, s_last]; inputs [..., n].
std::vector<Tensor> chunk_gates(Tensor theta, Tensor eta, Tensor alpha) {
  const auto lead = theta.sizes().slice(0, theta.dim() - 1).vec();
  const int64_t n = theta.size(-1);
  const Tensor th = gate_rows(theta), et = gate_rows(eta), al = gate_rows(alpha);
  const int64_t R = th.size(0);
  Tensor beta = at::empty({R, n}, th.options()), g = at::empty({R, n}, th.options());
  Tensor G = at::zeros({R, n, n}, th.options()), e_last = at::empty({R}, th.options());
  Tensor s_last = at::empty({R, n}, th.options());
#pragma omp parallel if (R * n * n >= kParallelMin)
  {
    std::vector<float> keep(n), e(n), M(n * n), Pe(n * n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) {
      const float* t = th.data_ptr<float>() + r * n;
      float *bo = beta.data_ptr<float>() + r * n, *go = g.data_ptr<float>() + r * n;
      gates_row(n, t, et.data_ptr<float>() + r * n, al.data_ptr<float>() + r * n, keep.data(), bo, e.data(), go,
                M.data(), Pe.data());
      float* Go = G.data_ptr<float>() + r * n * n;
      float* so = s_last.data_ptr<float>() + r * n;
      for (int64_t i = 0; i < n; i++) {
        bo[i] = flush(bo[i]);
        go[i] = flush(go[i]);
        for (int64_t m = 0; m <= i; m++) Go[i * n + m] = flush(M[i * n + m] * t[m]);
      }
      for (int64_t m = 0; m < n; m++) so[m] = flush(Pe[(n - 1) * n + m] * t[m]);
      e_last.data_ptr<float>()[r] = flush(e[n - 1]);
    }
  }
  auto shaped = [&](const Tensor& x, std::vector<int64_t> tail) {
    std::vector<int64_t> s = lead;
    s.insert(s.end(), tail.begin(), tail.end());
    return x.view(s);
  };
  return {shaped(beta, {n}), shaped(g, {n}), shaped(G, {n, n}), shaped(e_last, {}), shaped(s_last, {n})};
}

// chunk_gates_backward(theta, eta, alpha, dbeta, dg, dG, de_last, ds_last) -> [dtheta, deta, dalpha]:
// the chain rule through the recurrences above, last token first (a flushed output passes no
// gradient).
std::vector<Tensor> chunk_gates_backward(Tensor theta, Tensor eta, Tensor alpha, Tensor dbeta, Tensor dg, Tensor dG,
                                         Tensor de_last, Tensor ds_last) {
  const int64_t n = theta.size(-1);
  const Tensor th = gate_rows(theta), et = gate_rows(eta), al = gate_rows(alpha);
  const Tensor Db = gate_rows(dbeta), Dg = gate_rows(dg), Ds = gate_rows(ds_last);
  const Tensor DG = dG.reshape({-1, n, n}).to(at::kFloat).contiguous();
  const Tensor De = de_last.reshape({-1}).to(at::kFloat).contiguous();
  const int64_t R = th.size(0);
  Tensor dth = at::empty({R, n}, th.options()), det = at::empty({R, n}, th.options());
  Tensor dal = at::empty({R, n}, th.options());
#pragma omp parallel if (R * n * n >= kParallelMin)
  {
    std::vector<float> keep(n), beta(n), e(n), g(n), M(n * n), Pe(n * n), dkeep(n), deta(n), de(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; r++) {
      const float *t = th.data_ptr<float>() + r * n, *eta_ = et.data_ptr<float>() + r * n;
      gates_row(n, t, eta_, al.data_ptr<float>() + r * n, keep.data(), beta.data(), e.data(), g.data(), M.data(),
                Pe.data());
      const float *db = Db.data_ptr<float>() + r * n, *dgv = Dg.data_ptr<float>() + r * n;
      const float *dGr = DG.data_ptr<float>() + r * n * n, *ds = Ds.data_ptr<float>() + r * n;
      float* dt = dth.data_ptr<float>() + r * n;
      std::fill(dkeep.begin(), dkeep.end(), 0.f);
      std::fill(deta.begin(), deta.end(), 0.f);
      std::fill(de.begin(), de.end(), 0.f);
      for (int64_t m = 0; m < n; m++) {  // G and s_last, column m: through M and Pe
        const float sm = flushed(Pe[(n - 1) * n + m] * t[m]) ? 0.f : ds[m];
        float dtm = sm * Pe[(n - 1) * n + m], rM = 0.f, rP = 0.f;  // rM, rP: d M[i, m], d Pe[i, m]
        for (int64_t i = n - 1; i >= m; i--) {
          const float dGim = flushed(M[i * n + m] * t[m]) ? 0.f : dGr[i * n + m];
          dtm += dGim * M[i * n + m];
          if (i == m) break;  // M[m, m] = Pe[m, m] = 1
          rM = dGim * t[m] + (i < n - 1 ? keep[i + 1] * rM : 0.f);
          dkeep[i] += rM * M[(i - 1) * n + m];
          rP = rM + (i == n - 1 ? sm * t[m] : eta_[i + 1] * rP);
          deta[i] += rP * Pe[(i - 1) * n + m];
        }
        dt[m] = dtm;
      }
      float u = 0.f, w = 0.f, v = 0.f;  // d g_i, d e_i, d beta_i, all paths
      for (int64_t i = n - 1; i >= 0; i--) {
        u = (flushed(g[i]) ? 0.f : dgv[i]) + (i < n - 1 ? keep[i + 1] * u : 0.f);
        if (i > 0) dkeep[i] += u * g[i - 1];
        de[i] += u;
      }
      de[n - 1] += flushed(e[n - 1]) ? 0.f : De.data_ptr<float>()[r];
      for (int64_t i = n - 1; i >= 0; i--) {
        w = de[i] + (i < n - 1 ? eta_[i + 1] * w : 0.f);
        deta[i] += w * (i > 0 ? e[i - 1] : 1.f);
        v = (flushed(beta[i]) ? 0.f : db[i]) + (i < n - 1 ? keep[i + 1] * v : 0.f);
        dkeep[i] += v * (i > 0 ? beta[i - 1] : 1.f);
      }
      float *deo = det.data_ptr<float>() + r * n, *dao = dal.data_ptr<float>() + r * n;
      for (int64_t i = 0; i < n; i++) { deo[i] = deta[i]; dao[i] = -dkeep[i]; }
    }
  }
  return {dth.view(theta.sizes()), det.view(theta.sizes()), dal.view(theta.sizes())};
}

// ---------------------------------------------------------------------------------------------
// The layer's input path (features.qkv_features): q, k, v = SiLU(causal depthwise conv([past; u])),
// q and k L2-normalised per head. u: [B, T, C], C = 3 H Dh (q, k, v channels); past: [B, K-1, C];
// weight: [C, K] (tap K-1 multiplies the newest token); bias: [C]. Computed in fp32 whatever the
// input dtype (fp32 or bf16); one pass per token row, where the torch version makes ~25 passes.

namespace {

// sig[c] = sigmoid(z[c]) for c < n. With AVX-512, exp is Cephes' expf polynomial on
// [-ln2/2, ln2/2] scaled by 2^k (~2 ulp): std::exp is a scalar call that GCC does not vectorise.
inline void sigmoid_row(const float* z, float* sig, int64_t n) {
  int64_t c = 0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; c + 16 <= n; c += 16) {
    __m512 x = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_loadu_ps(z + c));  // exp(-z)
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, one));
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_storeu_ps(sig + c, _mm512_div_ps(one, _mm512_add_ps(one, e)));
  }
#endif
  for (; c < n; c++) sig[c] = 1.f / (1.f + std::exp(-z[c]));
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

constexpr float kNormEps = 1e-2f;  // features.NORM_EPS: a / sqrt(|a|^2 + eps)

// Pre-activation of one token row: z[c] = bias[c] + sum_j wT[j][c] xp[t + j][c], where xp is
// [past; u] (K-1 past rows first). wT: [K, C] fp32.
template <typename T>
void conv_row(const T* u, int64_t su_t, const T* past, int64_t sp_t, int64_t t, int64_t K, int64_t C,
              const float* wT, const float* bias, float* z) {
  const int64_t P = K - 1;
  for (int64_t c = 0; c < C; c++) z[c] = bias ? bias[c] : 0.f;
  for (int64_t j = 0; j < K; j++) {
    const int64_t row = t + j;  // in xp
    const T* x = row < P ? past + row * sp_t : u + (row - P) * su_t;
    const float* w = wT + j * C;
#pragma omp simd
    for (int64_t c = 0; c < C; c++) z[c] += w[c] * to_f(x[c]);
  }
}

// The pre-activation z = conv([past; u]) (or u without conv) of token (b, t) and sig = sigmoid(z).
template <typename T>
struct InputRows {
  const Tensor &u, &past;
  const float *w, *bias;
  int64_t K, C;
  void operator()(int64_t b, int64_t t, float* z, float* sig) const {
    const T* ub = u.data_ptr<T>() + b * u.stride(0);
    if (w) {
      const T* pb = past.defined() ? past.data_ptr<T>() + b * past.stride(0) : nullptr;
      conv_row(ub, u.stride(1), pb, past.defined() ? past.stride(1) : 0, t, K, C, w, bias, z);
    } else {
      for (int64_t c = 0; c < C; c++) z[c] = to_f(ub[t * u.stride(1) + c]);
    }
    sigmoid_row(z, sig, C);
  }
};

// f(b, t, z, sig) for every token (b, t), in parallel, with the token's pre-activation row z and
// its sigmoid sig (per-thread buffers of C floats).
template <typename T, typename F>
void for_each_token(const InputRows<T>& rows, int64_t B, int64_t T_, F&& f) {
#pragma omp parallel
  {
    std::vector<float> z(rows.C), sg(rows.C);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
      for (int64_t t = 0; t < T_; t++) {
        rows(b, t, z.data(), sg.data());
        f(b, t, z.data(), sg.data());
      }
    }
  }
}

template <typename T>
std::vector<Tensor> qkv_forward_impl(const Tensor& u, const Tensor& past, const Tensor& wT, const Tensor& bias,
                                     int64_t H, bool qk_silu) {
  const int64_t B = u.size(0), T_ = u.size(1), C = u.size(2), Dh = C / (3 * H), K = wT.defined() ? wT.size(0) : 1;
  const int64_t c0 = qk_silu ? 0 : 2 * H * Dh;  // the first channel through the SiLU (v only without qk_silu)
  Tensor out = at::empty({3, B, H, T_, Dh}, u.options());
  Tensor norm = at::empty({2, B, H, T_, 1}, u.options().dtype(at::kFloat));
  T* po = out.data_ptr<T>();
  float* pn = norm.data_ptr<float>();
  const InputRows<T> rows{u, past, wT.defined() ? wT.data_ptr<float>() : nullptr,
                           bias.defined() ? bias.data_ptr<float>() : nullptr, K, C};
  for_each_token(rows, B, T_, [&](int64_t b, int64_t t, float* z, const float* sg) {
#pragma omp simd
    for (int64_t c = c0; c < C; c++) z[c] *= sg[c];  // SiLU
    for (int64_t part = 0; part < 3; part++) {
      for (int64_t h = 0; h < H; h++) {
        const float* a = z + (part * H + h) * Dh;
        T* o = po + (((part * B + b) * H + h) * T_ + t) * Dh;
        float inv = 1.f;
        if (part < 2) {
          float ss = 0.f;
#pragma omp simd reduction(+ : ss)
          for (int64_t d = 0; d < Dh; d++) ss += a[d] * a[d];
          const float nrm = std::sqrt(ss + kNormEps);
          pn[((part * B + b) * H + h) * T_ + t] = nrm;
          inv = 1.f / nrm;
        }
        for (int64_t d = 0; d < Dh; d++) o[d] = static_cast<T>(part < 2 ? a[d] * inv : a[d]);
      }
    }
  });
  return {out, norm};
}

template <typename T>
std::vector<Tensor> qkv_backward_impl(const Tensor& u, const Tensor& past, const Tensor& wT, const Tensor& bias,
                                      const Tensor& norm, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                      int64_t H, bool qk_silu) {
  const int64_t B = u.size(0), T_ = u.size(1), C = u.size(2), Dh = C / (3 * H), K = wT.defined() ? wT.size(0) : 1;
  const int64_t P = K - 1, c0 = qk_silu ? 0 : 2 * H * Dh;
  // du: gradient of the conv output (the SiLU input), fp32 [B, T, C]
  Tensor du = at::empty({B, T_, C}, u.options().dtype(at::kFloat));
  float* pdu = du.data_ptr<float>();
  const T* pu = u.data_ptr<T>();
  const T* pp = past.defined() ? past.data_ptr<T>() : nullptr;
  const float* pw = wT.defined() ? wT.data_ptr<float>() : nullptr;
  const float* pn = norm.data_ptr<float>();
  const Tensor* dys[3] = {&dq, &dk, &dv};
  const InputRows<T> rows{u, past, pw, bias.defined() ? bias.data_ptr<float>() : nullptr, K, C};
  for_each_token(rows, B, T_, [&](int64_t b, int64_t t, const float* z, const float* sg) {
    float* d = pdu + (b * T_ + t) * C;
    for (int64_t part = 0; part < 3; part++) {
      const Tensor& dyt = *dys[part];
      for (int64_t h = 0; h < H; h++) {
        float* dd = d + (part * H + h) * Dh;
        const float *zz = z + (part * H + h) * Dh, *ss = sg + (part * H + h) * Dh;
        if (!dyt.defined()) {
          for (int64_t e = 0; e < Dh; e++) dd[e] = 0.f;
          continue;
        }
        const T* dy = dyt.data_ptr<T>() + b * dyt.stride(0) + t * dyt.stride(1) + h * dyt.stride(2);
        const int64_t sd = dyt.stride(3);
        if (part < 2) {  // y = a / n, n = sqrt(|a|^2 + eps): da = (dy - y <y, dy>) / n
          const float nrm = pn[((part * B + b) * H + h) * T_ + t], inv = 1.f / nrm;
          // a: the normalised vector's input, SiLU(z) = z sig (or z itself without qk_silu)
          float* a = dd;
#pragma omp simd
          for (int64_t e = 0; e < Dh; e++) a[e] = qk_silu ? zz[e] * ss[e] : zz[e];
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t e = 0; e < Dh; e++) dot += a[e] * inv * to_f(dy[e * sd]);
#pragma omp simd
          for (int64_t e = 0; e < Dh; e++) dd[e] = (to_f(dy[e * sd]) - a[e] * inv * dot) * inv;
        } else {
#pragma omp simd
          for (int64_t e = 0; e < Dh; e++) dd[e] = to_f(dy[e * sd]);
        }
      }
    }
#pragma omp simd
    for (int64_t c = c0; c < C; c++) d[c] *= sg[c] * (1.f + z[c] * (1.f - sg[c]));  // SiLU'
  });
  if (!pw) return {du, Tensor(), Tensor(), Tensor()};
  // the conv's backward: dxp[r] = sum_j w[j] du[r - j] (a gather: no two threads write one row);
  // dw[j] = sum_t du[t] xp[t + j], db = sum_t du[t], per thread then summed in thread order
  Tensor dxp = at::empty({B, P + T_, C}, u.options().dtype(at::kFloat));
  float* px = dxp.data_ptr<float>();
  const int nt = omp_get_max_threads();
  std::vector<double> part_w(nt * K * C, 0.0), part_b(nt * C, 0.0);  // sums over up to B T rows
  int used = 1;
#pragma omp parallel
  {
    const int th = omp_get_thread_num();
    if (th == 0) used = omp_get_num_threads();
    double* pw_t = part_w.data() + th * K * C;
    double* pb_t = part_b.data() + th * C;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
      for (int64_t r = 0; r < P + T_; r++) {
        float* o = px + (b * (P + T_) + r) * C;
        for (int64_t c = 0; c < C; c++) o[c] = 0.f;
        for (int64_t j = 0; j < K; j++) {
          const int64_t t = r - j;
          if (t < 0 || t >= T_) continue;
          const float* g = pdu + (b * T_ + t) * C;
          const float* w = pw + j * C;
#pragma omp simd
          for (int64_t c = 0; c < C; c++) o[c] += w[c] * g[c];
        }
        if (r >= P) {  // this row is u[t = r - P]: its du goes into dw (all taps) and db
          const int64_t t = r - P;
          const float* g = pdu + (b * T_ + t) * C;
          for (int64_t j = 0; j < K; j++) {
            const int64_t row = t + j;
            const T* x = row < P ? pp + b * past.stride(0) + row * past.stride(1)
                                 : pu + b * u.stride(0) + (row - P) * u.stride(1);
            double* acc = pw_t + j * C;
#pragma omp simd
            for (int64_t c = 0; c < C; c++) acc[c] += g[c] * to_f(x[c]);
          }
#pragma omp simd
          for (int64_t c = 0; c < C; c++) pb_t[c] += g[c];
        }
      }
    }
  }
  Tensor dw = at::empty({K, C}, u.options().dtype(at::kFloat)), db = at::empty({C}, u.options().dtype(at::kFloat));
  float *odw = dw.data_ptr<float>(), *odb = db.data_ptr<float>();
  for (int64_t e = 0; e < K * C; e++) {
    double v = 0.0;
    for (int i = 0; i < used; i++) v += part_w[i * K * C + e];
    odw[e] = (float)v;
  }
  for (int64_t c = 0; c < C; c++) {
    double v = 0.0;
    for (int i = 0; i < used; i++) v += part_b[i * C + c];
    odb[c] = (float)v;
  }
  return {dxp, dw.t(), db, du};
}

}  // namespace

// qkv_forward(u, past, weight_t, bias, heads, qk_silu) -> [out [3, B, H, T, Dh] (u's dtype), norm [2, B, H, T, 1]
// fp32]. qk_silu false: q and k are the normalised pre-activations (only v goes through the SiLU).
// weight_t: [K, C] fp32 (undefined: no conv; past and bias then undefined too); bias fp32.
std::vector<Tensor> qkv_forward(Tensor u, c10::optional<Tensor> past, c10::optional<Tensor> weight_t,
                                c10::optional<Tensor> bias, int64_t heads, bool qk_silu) {
  TORCH_CHECK(u.stride(2) == 1, "qkv_forward: u needs unit-stride rows");
  const Tensor p = past.value_or(Tensor()), w = weight_t.value_or(Tensor()), bb = bias.value_or(Tensor());
  TORCH_CHECK(!p.defined() || p.stride(2) == 1, "qkv_forward: past needs unit-stride rows");
  if (u.scalar_type() == at::kBFloat16) return qkv_forward_impl<at::BFloat16>(u, p, w, bb, heads, qk_silu);
  return qkv_forward_impl<float>(u, p, w, bb, heads, qk_silu);
}

// qkv_backward(u, past, weight_t, bias, norm, dq, dk, dv, heads, qk_silu) -> [dxp fp32 [B, K-1+T, C] (or du
// [B, T, C] without conv), dweight [C, K] fp32, dbias [C] fp32, du]. dq, dk, dv: [B, T, H, Dh], any
// strides, u's dtype, or None.
std::vector<Tensor> qkv_backward(Tensor u, c10::optional<Tensor> past, c10::optional<Tensor> weight_t,
                                 c10::optional<Tensor> bias, Tensor norm, c10::optional<Tensor> dq,
                                 c10::optional<Tensor> dk, c10::optional<Tensor> dv, int64_t heads,
                                 bool qk_silu) {
  const Tensor p = past.value_or(Tensor()), w = weight_t.value_or(Tensor()), bb = bias.value_or(Tensor());
  const Tensor gq = dq.value_or(Tensor()), gk = dk.value_or(Tensor()), gv = dv.value_or(Tensor());
  for (const Tensor* x : {&gq, &gk, &gv}) {
    TORCH_CHECK(!x->defined() || x->scalar_type() == u.scalar_type(), "qkv_backward: gradients in u's dtype");
  }
  if (u.scalar_type() == at::kBFloat16) return qkv_backward_impl<at::BFloat16>(u, p, w, bb, norm, gq, gk, gv, heads, qk_silu);
  return qkv_backward_impl<float>(u, p, w, bb, norm, gq, gk, gv, heads, qk_silu);
}

// ---------------------------------------------------------------------------------------------
// The layer's output path (features.gated_rms_norm): out = RMSNorm(r) * weight * SiLU(g) per head.
// r: [B, T, H, Dh] fp32; weight: [H, Dh] fp32; g: [B, T, H Dh] fp32 or bf16; out fp32.

namespace {

constexpr float kRmsEps = 1e-6f;  // features.RMS_EPS

template <typename T>
Tensor rms_forward_impl(const Tensor& r, const Tensor& weight, const Tensor& g, Tensor rstd) {
  const int64_t B = r.size(0), T_ = r.size(1), H = r.size(2), Dh = r.size(3), D = H * Dh;
  Tensor out = at::empty({B, T_, D}, r.options());
  const float *pr = r.data_ptr<float>(), *pw = weight.data_ptr<float>();
  const T* pg = g.data_ptr<T>();
  float *po = out.data_ptr<float>(), *ps = rstd.data_ptr<float>();
#pragma omp parallel
  {
    std::vector<float> gf(D), sg(D);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * T_; row++) {
      const float* x = pr + row * D;
      const T* gr = pg + row * D;
      for (int64_t c = 0; c < D; c++) gf[c] = to_f(gr[c]);
      sigmoid_row(gf.data(), sg.data(), D);
      for (int64_t h = 0; h < H; h++) {
        const float* xh = x + h * Dh;
        float ss = 0.f;
#pragma omp simd reduction(+ : ss)
        for (int64_t d = 0; d < Dh; d++) ss += xh[d] * xh[d];
        const float rs = 1.f / std::sqrt(ss / Dh + kRmsEps);
        ps[row * H + h] = rs;
        float* o = po + row * D + h * Dh;
        const float *w = pw + h * Dh, *gh = gf.data() + h * Dh, *sh = sg.data() + h * Dh;
#pragma omp simd
        for (int64_t d = 0; d < Dh; d++) o[d] = xh[d] * rs * w[d] * (gh[d] * sh[d]);
      }
    }
  }
  return out;
}

template <typename T>
std::vector<Tensor> rms_backward_impl(const Tensor& r, const Tensor& weight, const Tensor& g, const Tensor& rstd,
                                      const Tensor& dout) {
  const int64_t B = r.size(0), T_ = r.size(1), H = r.size(2), Dh = r.size(3), D = H * Dh;
  Tensor dr = at::empty_like(r), dg = at::empty({B, T_, D}, r.options());
  const float *pr = r.data_ptr<float>(), *pw = weight.data_ptr<float>(), *ps = rstd.data_ptr<float>();
  const float* pd = dout.data_ptr<float>();
  const T* pg = g.data_ptr<T>();
  float *pdr = dr.data_ptr<float>(), *pdg = dg.data_ptr<float>();
  const int nt = omp_get_max_threads();
  std::vector<double> part(nt * D, 0.0);
  int used = 1;
#pragma omp parallel
  {
    const int th = omp_get_thread_num();
    if (th == 0) used = omp_get_num_threads();
    double* acc = part.data() + th * D;
    std::vector<float> gf(D), sg(D), dn(D);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < B * T_; row++) {
      const float *x = pr + row * D, *dy = pd + row * D;
      const T* gr = pg + row * D;
      for (int64_t c = 0; c < D; c++) gf[c] = to_f(gr[c]);
      sigmoid_row(gf.data(), sg.data(), D);
      for (int64_t h = 0; h < H; h++) {
        const float rs = ps[row * H + h];
        const float *xh = x + h * Dh, *w = pw + h * Dh, *dyh = dy + h * Dh;
        const float *gh = gf.data() + h * Dh, *sh = sg.data() + h * Dh;
        float *dgh = pdg + row * D + h * Dh, *dnh = dn.data() + h * Dh;
        double* ah = acc + h * Dh;
        float mean = 0.f;
#pragma omp simd reduction(+ : mean)
        for (int64_t d = 0; d < Dh; d++) {
          const float rn = xh[d] * rs, s = sh[d];
          dgh[d] = rn * w[d] * dyh[d] * (s * (1.f + gh[d] * (1.f - s)));  // through SiLU'(g)
          const float dnv = dyh[d] * gh[d] * s;                            // d (rn * weight)
          ah[d] += dnv * rn;
          dnh[d] = dnv * w[d];
          mean += dnh[d] * rn;
        }
        mean /= Dh;
        float* o = pdr + row * D + h * Dh;
#pragma omp simd
        for (int64_t d = 0; d < Dh; d++) o[d] = (dnh[d] - xh[d] * rs * mean) * rs;
      }
    }
  }
  Tensor dw = at::empty({H, Dh}, r.options());
  float* odw = dw.data_ptr<float>();
  for (int64_t c = 0; c < D; c++) {
    double v = 0.0;
    for (int i = 0; i < used; i++) v += part[i * D + c];
    odw[c] = (float)v;
  }
  return {dr, dw, dg};
}

}  // namespace

// rms_forward(r, weight, g) -> [out [B, T, H Dh] fp32, rstd [B, T, H] fp32]; r, weight fp32 contiguous,
// g fp32 or bf16 contiguous.
std::vector<Tensor> rms_forward(Tensor r, Tensor weight, Tensor g) {
  TORCH_CHECK(r.is_contiguous() && weight.is_contiguous() && g.is_contiguous(), "rms_forward: contiguous inputs");
  Tensor rstd = at::empty({r.size(0), r.size(1), r.size(2)}, r.options());
  Tensor out = g.scalar_type() == at::kBFloat16 ? rms_forward_impl<at::BFloat16>(r, weight, g, rstd)
                                                : rms_forward_impl<float>(r, weight, g, rstd);
  return {out, rstd};
}

// rms_backward(r, weight, g, rstd, dout) -> [dr, dweight, dg (fp32)]; dout fp32 contiguous.
std::vector<Tensor> rms_backward(Tensor r, Tensor weight, Tensor g, Tensor rstd, Tensor dout) {
  TORCH_CHECK(dout.is_contiguous(), "rms_backward: contiguous dout");
  return g.scalar_type() == at::kBFloat16 ? rms_backward_impl<at::BFloat16>(r, weight, g, rstd, dout)
                                          : rms_backward_impl<float>(r, weight, g, rstd, dout);
}

// RoPE without autograd (ops.attention.rotary): x [B, H, T, D] fp32, any strides with unit-stride rows;
// cos, sin [T, D/2] fp32 contiguous. out = [x1 cos - x2 sin, x2 cos + x1 sin], contiguous, rounded as
// the torch operations round it (two products, then the difference or the sum). One pass where torch
// makes seven, over a strided view.
Tensor rope_forward(Tensor x, Tensor cos, Tensor sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.stride(3) == 1, "rope_forward: x fp32 [B, H, T, D]");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat, "rope_forward: tables");
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), h = D / 2;
  Tensor out = at::empty({B, H, T, D}, x.options());
  const float *px = x.data_ptr<float>(), *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t sb = x.stride(0), sh = x.stride(1), st = x.stride(2);
  #pragma omp parallel for collapse(2) schedule(static) if (B * H * T * D >= kParallelMin)
  for (int64_t b = 0; b < B * H; b++)
    for (int64_t t = 0; t < T; t++) {
      const float* xr = px + (b / H) * sb + (b % H) * sh + t * st;
      const float *c = pc + t * h, *sn = ps + t * h;
      float* o = po + (b * T + t) * D;
#pragma omp simd
      for (int64_t j = 0; j < h; j++) {
        const float x1 = xr[j], x2 = xr[h + j];
        const float a = x1 * c[j], bb = x2 * sn[j], cc = x2 * c[j], d = x1 * sn[j];
        o[j] = a - bb;
        o[h + j] = cc + d;
      }
    }
  return out;
}

// The loop over pieces without autograd (chunk_backward.scan_forward with track=False) in one call:
// the pieces of chunk.Plan(head, (T - head) / b, b), each piece's gate products (chunk_gates, row by
// row as the batched call computes them) and its piece_forward, the states in two recycled buffers.
// At batch 1 the Python loop cost about as much as the pieces' arithmetic. Inputs in the flat
// layout: q, k [BH, T, Dk], v [BH, T, Dv], theta, eta, alpha [BH, T]; WS0 per layer [BH, 2 do, di]
// (not written); Wg0: the chunk-start weights when the call resumes inside a chunk (else empty).
// Returns (y [BH, T, Dv], WS after the last piece, WS at the start of the last piece).
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>
scan_inference(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, std::vector<Tensor> WS0,
               std::vector<Tensor> Wg0, int64_t head, int64_t b, bool residual, bool mixed, bool normalize) {
  // called without autograd: the many small operations inside skip its dispatch keys (every tensor
  // returned is a fresh buffer or WS0 itself, never a view made here)
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t T = q.size(1);
  std::vector<std::pair<int64_t, int64_t>> pieces;
  if (head > 0) pieces.emplace_back(0, head);
  int64_t lo = head;
  for (; lo + b <= T; lo += b) pieces.emplace_back(lo, lo + b);
  if (lo < T) pieces.emplace_back(lo, T);
  Tensor y_all = at::empty({v.size(0), T, v.size(2)}, v.options());
  std::vector<Tensor> WS = WS0, start = WS0, bufs[2];
  for (size_t p = 0; p < pieces.size(); p++) {
    const int64_t a = pieces[p].first, n = pieces[p].second - a;
    const std::vector<Tensor> gates = chunk_gates(theta.narrow(1, a, n), eta.narrow(1, a, n), alpha.narrow(1, a, n));
    auto& out = bufs[p % 2];
    if (out.empty())
      for (const auto& ws : WS0) out.push_back(at::empty_like(ws));
    auto res = piece_forward(q.narrow(1, a, n), k.narrow(1, a, n), v.narrow(1, a, n), gates[0], gates[1], gates[2],
                             gates[3], gates[4], WS, p == 0 ? Wg0 : std::vector<Tensor>{}, out, {}, residual, mixed,
                             normalize);
    y_all.narrow(1, a, n).copy_(std::get<0>(res));
    start = WS;
    WS = std::get<1>(res);
  }
  return {y_all, WS, start};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("advance_state", &advance_state, "the state after a piece (chunk.advance_state)");
  m.def("piece_forward", &piece_forward, "one piece of the chunk path (chunk.piece_forward)");
  m.def("rope_forward", &rope_forward, "RoPE without autograd (ops.attention.rotary)");
  m.def("scan_inference", &scan_inference, "the loop over pieces without autograd (chunk_backward.scan_forward)");
  m.def("chunk_gates", &chunk_gates, "the gate products of chunks (chunk.chunk_gates)");
  m.def("chunk_gates_backward", &chunk_gates_backward, "their backward (chunk.chunk_gates_backward)");
  m.def("expand", &expand, "the elementwise part of KeptInternals.expand (chunk.py)");
  m.def("piece_backward", &piece_backward, "one piece's backward of the chunk path (chunk_backward.py)");
  m.def("qkv_forward", &qkv_forward, "the layer's input path (features.qkv_features)");
  m.def("qkv_backward", &qkv_backward, "its backward");
  m.def("rms_forward", &rms_forward, "the layer's output path (features.gated_rms_norm)");
  m.def("rms_backward", &rms_backward, "its backward");
}
