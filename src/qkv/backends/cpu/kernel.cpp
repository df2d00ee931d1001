// Fused tiled attention on the CPU: scores, mask, score modifiers, online softmax and P V per
// tile, in cache, parallel over (batch, head, query tile); backward recomputes the tiles
// (FlashAttention-2, Algorithms 1 and 2). Compiled on first use by qkv/backends/cpu/build.py.
//
// Layout: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), all contiguous, in the
// compute type (float or double), or in bfloat16 / float16 for the half-precision GEMM path and
// decoding (both below; everything besides q, k, v and the output gradient then is float; the
// half path writes its output in the input type when the forward takes `half_out`, which the
// caller sets where nothing will differentiate the call). Query head h reads key/value head
// h / G (grouped heads without copies). The tile grid is `status` (nQ, nK) int8:
// 0 EMPTY (skipped), 1 PARTIAL (mask evaluated), 2 FULL (mask never evaluated).
//
// The mask of a PARTIAL tile: keys outside every interval [row_lo[i], row_hi[i]) of the row
// (causal, sliding windows, padding, prefix-LM and their &, |, ~, lowered by the Python side
// into at most kMaxIntervals intervals per (b, q)),
// keys of another document (doc_q[b, q] != doc_k[b, kv]), and a strided bool tensor.
// Score modifiers, applied in order after an optional strided bias tensor: ALiBi, a learnable
// relative-position table, softcap.
#include <ATen/core/Tensor.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

extern "C" {
// BLAS from the libraries torch links (MKL on x86 wheels). Weak: without them a plain loop runs.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

constexpr int kAlibi = 0, kRelative = 1, kSoftcap = 2;
constexpr int8_t kEmpty = 0, kFull = 2;
// Runs of backward tasks under torch.use_deterministic_algorithms(True) (see backward_typed).
constexpr int64_t kDeterministicRuns = 8;
constexpr int64_t kMaxIntervals = 8;  // qkv.mask_core.MAX_INTERVALS

// Column-major C (m x n) = alpha op(A) op(B) + beta C, as BLAS.
template <typename T>
void naive_gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
                int ldb, T beta, T* c, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      T acc = 0;
      for (int p = 0; p < k; ++p) {
        T x = ta ? a[p + i * lda] : a[i + p * lda];
        T y = tb ? b[j + p * ldb] : b[p + j * ldb];
        acc += x * y;
      }
      c[i + j * ldc] = alpha * acc + (beta == 0 ? T(0) : beta * c[i + j * ldc]);
    }
  }
}

template <typename T>
void gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
          int ldb, T beta, T* c, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) c[i + j * ldc] = beta == 0 ? T(0) : beta * c[i + j * ldc];
    return;
  }
  const char A = ta ? 'T' : 'N', B = tb ? 'T' : 'N';
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&A, &B, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    if (dgemm_) return dgemm_(&A, &B, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  }
  naive_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// exp for float that the compiler vectorises (Cephes-style: 2^n * p(r), |r| <= ln2 / 2, about
// 2 ulp); -inf and anything below the float range give 0, NaN gives NaN. Double uses std::exp.
inline float fast_exp(float x) {
  const bool nan = x != x;
  const float in = x;
  const bool tiny = x < -87.0f;
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return nan ? in : (tiny ? 0.0f : p * scale);
}
inline double fast_exp(double x) { return std::exp(x); }

template <typename T>
void exp_row(T* __restrict s, int n, T shift, T scale = T(1)) {
  // A masked (-inf) score is 0 even in a NaN row (shift NaN): its key gets no NaN gradient.
  constexpr T ninf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int c = 0; c < n; ++c) s[c] = s[c] == ninf ? T(0) : fast_exp(s[c] * scale - shift);
}

// s = exp(s - shift) in place; returns the sum of the row.
template <typename T>
T exp_sum_row(T* __restrict s, int n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < n; ++c) {
    const T e = fast_exp(s[c] - shift);
    s[c] = e;
    sum += e;
  }
  return sum;
}

// The row maximum, NaN if any entry is NaN (qkv's rule: an attended NaN makes its row NaN;
// masked entries are -inf by now, so a masked-out NaN never reaches here).
template <typename T>
T max_row(const T* __restrict s, int n) {
  T mx = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : mx) reduction(| : nan)
  for (int c = 0; c < n; ++c) {
    mx = s[c] > mx ? s[c] : mx;
    nan |= s[c] != s[c];
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : mx;
}

// float -> bfloat16 rounded to nearest even, NaN kept NaN: c10's conversion, written without
// a branch so that the loops calling it vectorise (c10's own keeps them scalar). Other types
// (float16, float) convert as usual.
template <typename H>
inline H round_to(float x) {
  if constexpr (std::is_same_v<H, at::BFloat16>) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return at::BFloat16(static_cast<uint16_t>(x != x ? 0x7FC0u : rounded),
                        at::BFloat16::from_bits());
  } else {
    return static_cast<H>(x);
  }
}

// s = exp(s * scale - shift), its row sum returned, each value also rounded into p (the half
// path's P for its P V product: one pass instead of an exp pass and a rounding pass).
template <typename T, typename H>
T exp_sum_round_row(const T* __restrict s, int n, T scale, T shift, H* __restrict p) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < n; ++c) {
    const T e = fast_exp(s[c] * scale - shift);
    sum += e;
    p[c] = round_to<H>(e);
  }
  return sum;
}

#if defined(__AVX512F__)
// The forward's two exponential passes in AVX-512, where most of a float32 or bfloat16 forward's
// own (non-GEMM) time goes. 2^x for 16 floats is 2^n p(x - n), n = round(x), p a degree-5
// polynomial fitted to 2^f on [-1/2, 1/2] (relative error 2.4e-7 in float arithmetic, like
// fast_exp's), and vscalefps applies 2^n, underflowing to 0: fewer instructions than fast_exp's
// range reduction, clamps and exponent arithmetic. A masked score (-inf) gives 0 through the
// clamp at -200; a NaN stays NaN (vmaxps returns its second operand when one is NaN).
inline __m512 exp2_16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.327645150013268e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675540961325169e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713464617729e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022120237350464e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469440460205e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0000001192092896f));
  return _mm512_scalef_ps(p, n);
}

constexpr float kLog2e = 1.44269504088896341f;

// The lanes [0, n) of a 16-lane block, for a row's last, partial block.
inline __mmask16 first_lanes(int n) { return static_cast<__mmask16>((1u << n) - 1u); }

// exp_sum_row for float: s - shift first (exact near the maximum), then to base 2.
inline float exp_sum_row(float* __restrict s, int n, float shift) {
  const __m512 to_base2 = _mm512_set1_ps(kLog2e), max = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + c), max);
    const __m512 e = exp2_16(_mm512_mul_ps(x, to_base2));
    _mm512_mask_storeu_ps(s + c, m, e);
    sum = _mm512_mask_add_ps(sum, m, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}

// exp_row for float (backward: P rebuilt from the scores and the log-sum-exp).
inline void exp_row(float* __restrict s, int n, float shift, float scale = 1.0f) {
  const __m512 to_base2 = _mm512_set1_ps(kLog2e), lse = _mm512_set1_ps(shift);
  const __m512 factor = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    const __m512 x = _mm512_maskz_loadu_ps(m, s + c);
    const __mmask16 hidden = _mm512_cmp_ps_mask(x, ninf, _CMP_EQ_OQ);
    const __m512 e = exp2_16(_mm512_mul_ps(_mm512_fmsub_ps(x, factor, lse), to_base2));
    _mm512_mask_storeu_ps(s + c, m, _mm512_maskz_mov_ps(static_cast<__mmask16>(~hidden), e));
  }
}
#endif

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// exp_sum_round_row for bfloat16 probabilities: s * scale - shift folded into one FMA in base 2
// (the rounding it adds is of the order of the product's own), and vcvtneps2bf16 rounds to
// nearest even.
inline float exp_sum_round_row(const float* __restrict s, int n, float scale, float shift,
                               at::BFloat16* __restrict p) {
  const __m512 a = _mm512_set1_ps(scale * kLog2e), b = _mm512_set1_ps(-shift * kLog2e);
  __m512 sum = _mm512_setzero_ps();
  for (int c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : first_lanes(n - c);
    const __m512 e = exp2_16(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, s + c), a, b));
    sum = _mm512_mask_add_ps(sum, m, sum, e);
    const __m256bh rounded = _mm512_cvtneps_pbh(e);
    __m256i bits;
    std::memcpy(&bits, &rounded, sizeof(bits));
    _mm256_mask_storeu_epi16(p + c, m, bits);
  }
  return _mm512_reduce_add_ps(sum);
}
#endif

// Online softmax over one tile of scores (FlashAttention-2): updates the running max m and sum
// l of each row, rescales its accumulator row, and leaves exp(s - m) in s. An attended NaN or
// +inf score makes the row NaN (as exp(inf - inf) does in the formula): m = l = NaN, and once
// NaN the row stays NaN and its tiles add nothing (s is zeroed).
//
// With `rounded` (the half path) the probabilities go to rounded (row stride ldr, a zero
// column appended when cols is odd, for the GEMM's pairs) instead of s, and the scores are
// multiplied by `scale` (> 0, so the row max commutes with it) on the way: the caller need not
// scale the tile first.
template <typename T, typename H = T>
void online_softmax_tile(T* s, int ld, int64_t rows, int cols, T* m, T* l, T* acc, int64_t Dv,
                         T scale = T(1), H* rounded = nullptr, int ldr = 0) {
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  constexpr T inf = std::numeric_limits<T>::infinity();
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t r = 0; r < rows; ++r) {
    T* row = s + r * ld;
    H* out = rounded ? rounded + r * ldr : nullptr;
    if (out && cols % 2) out[cols] = H(0.0f);
    const T tile_max = max_row(row, cols) * scale;
    const bool nan_row = std::isnan(m[r]) || std::isnan(tile_max) || tile_max == inf;
    const T new_max = nan_row ? nan : std::max(m[r], tile_max);
    if (nan_row || new_max == ninf) {  // a NaN row, or nothing attended yet: this tile adds 0
      if (nan_row) m[r] = l[r] = nan;
      if (out)
        std::fill(out, out + cols, H(0.0f));
      else
        std::fill(row, row + cols, T(0));
      continue;
    }
    const T rescale = m[r] == ninf ? T(0) : fast_exp(m[r] - new_max);
    const T sum = out ? exp_sum_round_row(row, cols, scale, new_max, out)
                      : exp_sum_row(row, cols, new_max);
    l[r] = l[r] * rescale + sum;
    m[r] = new_max;
    if (rescale != T(1)) {
      T* a = acc + r * Dv;
      for (int64_t c = 0; c < Dv; ++c) a[c] *= rescale;
    }
  }
}

// Output rows and log-sum-exp from the accumulators of a finished row block: acc / l and
// m + log(l); +inf lse (and zero output) on a row attending nothing, NaN output and lse on a
// NaN row. The output is written as O: T, or the half type of a half-precision call's inputs
// (rounded to nearest even) when nothing will differentiate it.
template <typename T, typename O>
void finish_rows(int rows, const T* m, const T* l, const T* acc, int64_t Dv, O* o, T* ls) {
  constexpr T nan = std::numeric_limits<T>::quiet_NaN();
  for (int r = 0; r < rows; ++r) {
    O* orow = o + r * Dv;
    if (std::isnan(l[r])) {
      std::fill(orow, orow + Dv, O(nan));
      ls[r] = nan;
      continue;
    }
    const bool seen = l[r] > 0;
    const T inv = seen ? T(1) / l[r] : T(0);
#pragma omp simd
    for (int64_t c = 0; c < Dv; ++c) {
      const T x = acc[r * Dv + c] * inv;
      if constexpr (std::is_same_v<O, T>)
        orow[c] = x;
      else
        orow[c] = round_to<O>(x);
    }
    ls[r] = seen ? m[r] + std::log(l[r]) : std::numeric_limits<T>::infinity();
  }
}

// Scratch memory aligned to a cache line: BLAS may take other code paths (and round
// differently) for differently aligned buffers, and results must not depend on which thread's
// allocation a tile lands in.
template <typename T>
struct Scratch {
  T* data = nullptr;
  explicit Scratch(int64_t n) {
    const size_t bytes = ((std::max<int64_t>(n, 1) * sizeof(T) + 63) / 64) * 64;
    data = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(data != nullptr, "qkv cpu kernel: out of memory for a tile");
    std::memset(data, 0, bytes);
  }
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch(Scratch&& o) noexcept : data(o.data) { o.data = nullptr; }
  T* begin() { return data; }
};

// Everything a tile needs to build its modified, masked scores.
template <typename T>
struct Problem {
  int64_t B, Hq, Hkv, G, Nq, Nk, D, Dv, tq, tk, nQ, nK;
  T scale;
  const T *q, *k, *v;
  const int8_t* status;
  // interval mask: (K, Bm, Nq), Bm in {1, B}; a key is kept if it lies in one of the K
  // intervals of its row; null when absent
  const int64_t *row_lo = nullptr, *row_hi = nullptr;
  int64_t interval_b = 0, intervals = 0;
  // documents: (Bq, Nq) and (Bk, Nk)
  const int64_t *doc_q = nullptr, *doc_k = nullptr;
  int64_t doc_qb = 0, doc_kb = 0;
  // strided bool mask and bias over (B, Hq, Nq, Nk)
  const bool* dense = nullptr;
  int64_t ds[4] = {0, 0, 0, 0};
  const T* bias = nullptr;
  int64_t bs[4] = {0, 0, 0, 0};
  // score modifiers, in order
  std::vector<int> mod_kind;
  std::vector<T> mod_value;         // softcap: cap
  std::vector<int64_t> mod_offset;  // alibi, relative: query offset
  std::vector<int64_t> mod_maxd;    // relative: max distance
  std::vector<const T*> mod_table;  // alibi: slopes (Hq); relative: table (Hq, 2M+1)
  // float: K^T (B Hkv, D, Nk) when each key tile is read by many query tiles (WholeKeysT),
  // else null and each visit transposes its key tile (transposed_tile)
  const T* kt = nullptr;
  bool modifies() const { return bias != nullptr || !mod_kind.empty(); }
};

// Scores of query rows [q0, q0 + rows) of head (b, h) against keys [k0, k0 + cols), into s
// (row stride ld), with bias and modifiers; `derivs[m]` receives d out / d in of each softcap.
template <typename T>
void finish_scores(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int rows, int64_t k0,
                   int cols, bool full, T* s, int ld, const std::vector<T*>* derivs);

#if defined(__AVX512F__)
// A 16 x 16 block of floats (rows of src at stride lds) transposed into dst (stride ldd): pairs
// of rows interleaved, then pairs of pairs, then 128-bit lanes gathered across four vectors.
inline void transpose16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; ++i) {  // per lane: rows 2i, 2i+1 at columns (0, 1) and (2, 3)
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g)  // r[4g + j], lane L: rows 4g .. 4g+3 at column 4L + j
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[4 * g + h]), b = _mm512_castps_pd(t[4 * g + 2 + h]);
      r[4 * g + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[4 * g + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int j = 0; j < 4; ++j) {  // column 4L + j: lane L of r[j], r[4 + j], r[8 + j], r[12 + j]
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x44);
    const __m512 v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xEE);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x44);
    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xEE);
    _mm512_storeu_ps(dst + (0 + j) * ldd, _mm512_shuffle_f32x4(v0, w0, 0x88));
    _mm512_storeu_ps(dst + (4 + j) * ldd, _mm512_shuffle_f32x4(v0, w0, 0xDD));
    _mm512_storeu_ps(dst + (8 + j) * ldd, _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_storeu_ps(dst + (12 + j) * ldd, _mm512_shuffle_f32x4(v1, w1, 0xDD));
  }
}
#endif

// src (rows x cols, row stride lds) transposed into dst (cols x rows, row stride ldd): 16 x 16
// blocks in registers where they fit (element by element, the key tiles' transposition was a
// tenth of a sliding-window forward), the edges element by element.
inline void transpose(const float* src, int64_t rows, int64_t cols, int64_t lds, float* dst,
                      int64_t ldd) {
  int64_t r0 = 0;
#if defined(__AVX512F__)
  for (; r0 + 16 <= rows; r0 += 16) {
    int64_t c0 = 0;
    for (; c0 + 16 <= cols; c0 += 16)
      transpose16x16(src + r0 * lds + c0, lds, dst + c0 * ldd + r0, ldd);
    for (int64_t c = c0; c < cols; ++c)
      for (int64_t r = r0; r < r0 + 16; ++r) dst[c * ldd + r] = src[r * lds + c];
  }
#endif
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = r0; r < rows; ++r) dst[c * ldd + r] = src[r * lds + c];
}

// The first `rows` rows of a score tile (row stride ld) times scale.
inline void scale_rows(float* s, int ld, int rows, int cols, float scale) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + static_cast<int64_t>(r) * ld;
#pragma omp simd
    for (int c = 0; c < cols; ++c) row[c] *= scale;
  }
}

// float32 scores run on oneDNN's brgemm micro-kernels (row-major, nothing packed per product),
// which PyTorch's CPU BLAS replaces by its GEMM where the CPU lacks them. On an AVX-512 CPU whose
// MKL takes its generic path (AMD), one thread: 64 x 64 x 128 products at 114 against 87
// GFLOP/s, 64 x 256 x 64 at 108 against 88. Their B operand is K^T: a transposed copy of all of
// K (WholeKeysT) where each key tile is read by many query tiles, else each visit transposes its
// key tile into the thread's own buffer (a copy of K is a fresh allocation per call whose pages
// fault in each time: for a sliding window that cost more than the per-visit copies).
inline const float* transposed_tile(const float* k, int cols, int64_t D) {
  thread_local std::unique_ptr<Scratch<float>> buf;
  thread_local int64_t capacity = 0;
  if (capacity < cols * D) {
    buf = std::make_unique<Scratch<float>>(cols * D);
    capacity = cols * D;
  }
  transpose(k, cols, D, D, buf->data, cols);
  return buf->data;
}

template <typename T>
void scores_tile(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int rows, int64_t k0,
                 int cols, bool full, T* s, int ld, const std::vector<T*>* derivs) {
  const int64_t hk = h / P.G;
  const T* qp = P.q + ((b * P.Hq + h) * P.Nq + q0) * P.D;
  const T* kp = P.k + ((b * P.Hkv + hk) * P.Nk + k0) * P.D;
  const int D = static_cast<int>(P.D);
  if constexpr (std::is_same_v<T, float>) {
    // forward and backward both come here: the same scores, bit for bit (with logits near
    // 2**24 a last-bit difference moves exp(s - lse) by orders of magnitude)
    if (P.kt != nullptr)
      at::native::cpublas::brgemm(rows, cols, D, D, P.Nk, ld, false, qp,
                                  P.kt + (b * P.Hkv + hk) * P.D * P.Nk + k0, s,
                                  /*is_vnni=*/false);
    else
      at::native::cpublas::brgemm(rows, cols, D, D, cols, ld, false, qp,
                                  transposed_tile(kp, cols, D), s, /*is_vnni=*/false);
    scale_rows(s, ld, rows, cols, P.scale);
    return finish_scores(P, b, h, q0, rows, k0, cols, full, s, ld, derivs);
  }
  gemm<T>(true, false, cols, rows, D, P.scale, kp, D, qp, D, T(0), s, ld);
  finish_scores(P, b, h, q0, rows, k0, cols, full, s, ld, derivs);
}

// Bias, score modifiers and mask applied to the scaled scores already in s (rows x cols).
template <typename T>
void finish_scores(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int rows, int64_t k0,
                   int cols, bool full, T* s, int ld, const std::vector<T*>* derivs) {
  for (int r = 0; r < rows; ++r) {
    T* row = s + static_cast<int64_t>(r) * ld;
    const int64_t qi = q0 + r;
    if (P.bias) {
      const T* bp = P.bias + b * P.bs[0] + h * P.bs[1] + qi * P.bs[2] + k0 * P.bs[3];
      const int64_t st = P.bs[3];
      for (int c = 0; c < cols; ++c) row[c] += bp[c * st];
    }
    size_t nsoft = 0;
    for (size_t m = 0; m < P.mod_kind.size(); ++m) {
      const int kind = P.mod_kind[m];
      if (kind == kAlibi) {
        const T slope = P.mod_table[m][h];
        const int64_t base = qi + P.mod_offset[m] - k0;
#pragma omp simd
        for (int c = 0; c < cols; ++c) row[c] -= slope * static_cast<T>(std::abs(base - c));
      } else if (kind == kRelative) {
        const int64_t M = P.mod_maxd[m];
        const T* tab = P.mod_table[m] + h * (2 * M + 1);
        // Column c reads bucket clamp(base + c, -M, M) + M: the edge buckets before c_lo and
        // after c_hi, a contiguous run of the table in between (vectorised).
        const int64_t base = k0 - qi - P.mod_offset[m];
        const int c_lo = static_cast<int>(std::clamp<int64_t>(-M - base, 0, cols));
        const int c_hi = static_cast<int>(std::clamp<int64_t>(M - base + 1, c_lo, cols));
        for (int c = 0; c < c_lo; ++c) row[c] += tab[0];
        const T* run = tab + (base + M + c_lo);  // bucket of column c_lo
#pragma omp simd
        for (int c = c_lo; c < c_hi; ++c) row[c] += run[c - c_lo];
        for (int c = c_hi; c < cols; ++c) row[c] += tab[2 * M];
      } else {
        const T cap = P.mod_value[m];
        T* d = derivs ? (*derivs)[nsoft] + static_cast<int64_t>(r) * ld : nullptr;
        for (int c = 0; c < cols; ++c) {
          const T t = std::tanh(row[c] / cap);
          row[c] = cap * t;
          if (d) d[c] = T(1) - t * t;
        }
        ++nsoft;
      }
    }
    if (full) continue;
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    if (P.row_lo) {
      const int64_t at = (P.interval_b > 1 ? b : 0) * P.Nq + qi;
      const int64_t step = P.interval_b * P.Nq;  // from one interval of the row to the next
      if (P.intervals == 1) {
        const int64_t lo = std::clamp<int64_t>(P.row_lo[at] - k0, 0, cols);
        const int64_t hi = std::clamp<int64_t>(P.row_hi[at] - k0, lo, cols);
        for (int64_t c = 0; c < lo; ++c) row[c] = ninf;
        for (int64_t c = hi; c < cols; ++c) row[c] = ninf;
      } else {
        int64_t lo[kMaxIntervals], hi[kMaxIntervals];
        for (int64_t i = 0; i < P.intervals; ++i) {
          lo[i] = std::clamp<int64_t>(P.row_lo[at + i * step] - k0, 0, cols);
          hi[i] = std::clamp<int64_t>(P.row_hi[at + i * step] - k0, lo[i], cols);
        }
        for (int64_t c = 0; c < cols; ++c) {
          bool keep = false;
          for (int64_t i = 0; i < P.intervals; ++i) keep |= (c >= lo[i]) & (c < hi[i]);
          if (!keep) row[c] = ninf;
        }
      }
    }
    if (P.doc_q) {
      const int64_t id = P.doc_q[(P.doc_qb > 1 ? b : 0) * P.Nq + qi];
      const int64_t* kid = P.doc_k + (P.doc_kb > 1 ? b : 0) * P.Nk + k0;
      for (int c = 0; c < cols; ++c)
        if (kid[c] != id) row[c] = ninf;
    }
    if (P.dense) {
      const bool* mp = P.dense + b * P.ds[0] + h * P.ds[1] + qi * P.ds[2] + k0 * P.ds[3];
      const int64_t st = P.ds[3];
      for (int c = 0; c < cols; ++c)
        if (!mp[c * st]) row[c] = ninf;
    }
  }
}

template <typename T>
std::vector<std::pair<int64_t, bool>> visits_of(const Problem<T>& P, int64_t i) {
  std::vector<std::pair<int64_t, bool>> out;
  for (int64_t j = 0; j < P.nK; ++j) {
    const int8_t st = P.status[i * P.nK + j];
    if (st != kEmpty) out.emplace_back(j, st == kFull);
  }
  return out;
}

// The keys of tile j that query rows [q0, q0 + rows) of batch b may attend: [k0, k0 + cols),
// the whole tile unless it is PARTIAL under an interval mask, which then narrows it to the
// union of the rows' intervals. A tile on the edge of a sliding window or on the causal diagonal
// is often half masked, and its masked columns need no scores, exponentials or products (a
// masked score adds exactly nothing). k0 stays even (the half path reads V in pairs of keys);
// cols is 0 when no row attends any key of the tile.
struct TileSpan {
  int64_t k0;
  int cols;
};

template <typename T>
TileSpan tile_span(const Problem<T>& P, int64_t b, int64_t q0, int rows, int64_t j, bool full) {
  const int64_t k0 = j * P.tk, k1 = std::min(k0 + P.tk, P.Nk);
  if (full || P.row_lo == nullptr) return {k0, static_cast<int>(k1 - k0)};
  const int64_t at = (P.interval_b > 1 ? b : 0) * P.Nq + q0;
  const int64_t step = P.interval_b * P.Nq;  // from one interval of a row to the next
  int64_t lo = k1, hi = k0;
  for (int64_t i = 0; i < P.intervals; ++i) {
    const int64_t* row_lo = P.row_lo + at + i * step;
    const int64_t* row_hi = P.row_hi + at + i * step;
    for (int r = 0; r < rows; ++r) {
      const int64_t a = std::max(row_lo[r], k0), z = std::min(row_hi[r], k1);
      if (a < z) {
        lo = std::min(lo, a);
        hi = std::max(hi, z);
      }
    }
  }
  if (lo >= hi) return {k0, 0};
  lo = std::max(k0, lo - lo % 2);
  return {lo, static_cast<int>(hi - lo)};
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        double scale, const at::Tensor& status, int64_t tile_q, int64_t tile_kv,
                        const at::Tensor& row_lo, const at::Tensor& row_hi,
                        const at::Tensor& doc_q, const at::Tensor& doc_k,
                        const at::Tensor& dense, const at::Tensor& bias,
                        const at::Tensor& mod_kind, const at::Tensor& mod_value,
                        const at::Tensor& mod_int, at::TensorList mod_tables) {
  Problem<T> P;
  P.B = q.size(0); P.Hq = q.size(1); P.Nq = q.size(2); P.D = q.size(3);
  P.Hkv = k.size(1); P.Nk = k.size(2); P.Dv = v.size(3); P.G = P.Hq / P.Hkv;
  P.tq = tile_q; P.tk = tile_kv; P.nQ = status.size(0); P.nK = status.size(1);
  P.scale = static_cast<T>(scale);
  if (q.scalar_type() == c10::CppTypeToScalarType<T>::value) {  // else: the half path's own
    P.q = q.data_ptr<T>(); P.k = k.data_ptr<T>(); P.v = v.data_ptr<T>();
  }
  P.status = status.data_ptr<int8_t>();
  if (row_lo.numel()) {
    TORCH_CHECK(row_lo.dim() == 3 && row_lo.size(0) <= kMaxIntervals,
                "row intervals must be (K, Bm, Nq) with K <= ", kMaxIntervals);
    P.row_lo = row_lo.data_ptr<int64_t>(); P.row_hi = row_hi.data_ptr<int64_t>();
    P.intervals = row_lo.size(0);
    P.interval_b = row_lo.size(1);
  }
  if (doc_q.numel()) {
    P.doc_q = doc_q.data_ptr<int64_t>(); P.doc_k = doc_k.data_ptr<int64_t>();
    P.doc_qb = doc_q.size(0); P.doc_kb = doc_k.size(0);
  }
  if (dense.numel()) {
    P.dense = dense.data_ptr<bool>();
    for (int d = 0; d < 4; ++d) P.ds[d] = dense.stride(d);
  }
  if (bias.numel()) {
    P.bias = bias.data_ptr<T>();
    for (int d = 0; d < 4; ++d) P.bs[d] = bias.stride(d);
  }
  const int64_t n_mods = mod_kind.numel();
  for (int64_t m = 0; m < n_mods; ++m) {
    P.mod_kind.push_back(static_cast<int>(mod_kind.data_ptr<int64_t>()[m]));
    P.mod_value.push_back(static_cast<T>(mod_value.data_ptr<double>()[m]));
    P.mod_offset.push_back(mod_int.data_ptr<int64_t>()[2 * m]);
    P.mod_maxd.push_back(mod_int.data_ptr<int64_t>()[2 * m + 1]);
    P.mod_table.push_back(mod_tables[m].numel() ? mod_tables[m].data_ptr<T>() : nullptr);
  }
  return P;
}

// K^T of every (batch, kv head), (B Hkv, D, Nk), when the call's key tiles are each read by at
// least kWholeKeysVisits query tiles on average; the problem then points at it.
constexpr double kWholeKeysVisits = 8.0;
struct WholeKeysT {
  at::Tensor kt;
  Problem<float> P;
  explicit WholeKeysT(const Problem<float>& base) : P(base) {
    int64_t visited = 0;
    for (int64_t t = 0; t < P.nQ * P.nK; ++t) visited += P.status[t] != kEmpty;
    if (P.nK == 0 || visited < kWholeKeysVisits * P.nK) return;
    kt = at::empty({P.B * P.Hkv, P.D, P.Nk}, at::kFloat);
    float* const dst = kt.data_ptr<float>();
    constexpr int64_t kBlock = 16;  // keys per task
    const int64_t blocks = (P.Nk + kBlock - 1) / kBlock;
    at::parallel_for(0, P.B * P.Hkv * blocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t m = task / blocks, n0 = (task % blocks) * kBlock;
        transpose(P.k + (m * P.Nk + n0) * P.D, std::min(kBlock, P.Nk - n0), P.D, P.D,
                  dst + m * P.D * P.Nk + n0, P.Nk);
      }
    });
    P.kt = dst;
  }
};

template <typename T>
void forward_impl(const Problem<T>& P, T* out, T* lse) {
  if constexpr (std::is_same_v<T, float>) {
    if (P.kt == nullptr) {
      const WholeKeysT keys(P);
      if (keys.P.kt != nullptr) return forward_impl(keys.P, out, lse);
    }
  }
  const int64_t tasks = P.B * P.Hq * P.nQ;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s_buf(P.tq * P.tk), acc_buf(P.tq * P.Dv);
    T* const s = s_buf.data;
    T* const acc = acc_buf.data;
    std::vector<T> m(P.tq), l(P.tq);
    const int ld = static_cast<int>(P.tk), Dv = static_cast<int>(P.Dv);
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % P.nQ, bh = task / P.nQ, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t q0 = i * P.tq;
      const int rows = static_cast<int>(std::min(P.tq, P.Nq - q0));
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc, acc + P.tq * P.Dv, T(0));
      const T* vbase = P.v + (b * P.Hkv + h / P.G) * P.Nk * P.Dv;
      for (const auto& [j, full] : visits_of(P, i)) {
        const auto [k0, cols] = tile_span(P, b, q0, rows, j, full);
        if (cols == 0) continue;
        scores_tile<T>(P, b, h, q0, rows, k0, cols, full, s, ld, nullptr);
        online_softmax_tile(s, ld, rows, cols, m.data(), l.data(), acc, Dv);
        if constexpr (std::is_same_v<T, float>)
          at::native::cpublas::brgemm(rows, Dv, cols, ld, Dv, Dv, true, s, vbase + k0 * P.Dv,
                                      acc, /*is_vnni=*/false);
        else
          gemm<T>(false, false, Dv, rows, cols, T(1), vbase + k0 * P.Dv, Dv, s, ld, T(1), acc,
                  Dv);
      }
      finish_rows(rows, m.data(), l.data(), acc, Dv, out + (bh * P.Nq + q0) * P.Dv,
                  lse + bh * P.Nq + q0);
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(false);
  });
}

// What backward reduces over all tasks besides dq, dk, dv: the gradients of a bias tensor and
// of learnable relative-position tables. Each run of tasks (see backward_typed) accumulates into
// its own float64 slice, and the slices are added in order afterwards, so that the sums do not
// depend on which thread ran which run.
struct Reductions {
  double* dbias = nullptr;  // (runs, bias shape): the bias's own shape, broadcast dims 1; or null
  int64_t dbias_numel = 0;  // elements of one run's slice
  int64_t dbias_strides[4] = {0, 0, 0, 0};  // (b, h, q, k) into a slice; 0 on broadcast dims
  std::vector<double*> tables;              // per modifier: (runs, table shape), or null
  std::vector<int64_t> table_numel;         // per modifier: elements of one run's slice
};

template <typename T>
int count_softcaps(const Problem<T>& P) {
  int n = 0;
  for (int kind : P.mod_kind) n += kind == kSoftcap;
  return n;
}

// The gradient with respect to the scores before the modifiers, in place: s holds P
// (rows x cols, row stride ld) on entry and dS (unscaled) on exit, from dp = dO V^T and
// delta = rowsum(dO * O); walks the score modifiers back and accumulates the bias's and the
// relative tables' gradients into run `run`'s slice of R.
template <typename T>
void score_grads_tile(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int rows,
                      int64_t k0, int cols, T* s_data, const T* dp_data, int ld,
                      const T* delta, const std::vector<T*>& derivs, int64_t run,
                      const Reductions& R) {
  const int n_soft = count_softcaps(P);
  for (int r = 0; r < rows; ++r) {
    T* pr = s_data + r * ld;
    const T* dpr = dp_data + r * ld;
    const T dl = delta[r];
#pragma omp simd
    for (int c = 0; c < cols; ++c) pr[c] = pr[c] * (dpr[c] - dl);
  }
  // s now holds dS w.r.t. the modified scores; walk the modifiers back.
  int soft = n_soft;
  for (int64_t m = static_cast<int64_t>(P.mod_kind.size()) - 1; m >= 0; --m) {
    const int kind = P.mod_kind[m];
    if (kind == kSoftcap) {
      --soft;
      for (int r = 0; r < rows; ++r) {
        T* pr = s_data + r * ld;
        const T* d = derivs[soft] + r * ld;
        for (int c = 0; c < cols; ++c) pr[c] *= d[c];
      }
    } else if (kind == kRelative && R.tables[m]) {
      const int64_t M = P.mod_maxd[m];
      double* tab = R.tables[m] + run * R.table_numel[m] + h * (2 * M + 1);
      for (int r = 0; r < rows; ++r) {
        const T* pr = s_data + r * ld;
        const int64_t base = k0 - (q0 + r) - P.mod_offset[m];
        const int c_lo = static_cast<int>(std::clamp<int64_t>(-M - base, 0, cols));
        const int c_hi = static_cast<int>(std::clamp<int64_t>(M - base + 1, c_lo, cols));
        double edge_lo = 0, edge_hi = 0;
        for (int c = 0; c < c_lo; ++c) edge_lo += pr[c];
        for (int c = c_hi; c < cols; ++c) edge_hi += pr[c];
        tab[0] += edge_lo;
        tab[2 * M] += edge_hi;
        double* mid = tab + (base + M + c_lo);  // one bucket per column in between
#pragma omp simd
        for (int c = c_lo; c < c_hi; ++c) mid[c - c_lo] += pr[c];
      }
    }
  }
  if (R.dbias) {
    const int64_t* st = R.dbias_strides;
    double* db = R.dbias + run * R.dbias_numel;
    for (int r = 0; r < rows; ++r) {
      const T* pr = s_data + r * ld;
      double* row = db + b * st[0] + h * st[1] + (q0 + r) * st[2] + k0 * st[3];
      for (int c = 0; c < cols; ++c) row[c * st[3]] += pr[c];
    }
  }
}

// One query tile of one head, as backward visits it: rows [q0, q0 + rows) of head h (batch b,
// key/value head hk, flat head index bh = b Hq + h), in run `run`.
struct RowBlock {
  int64_t b, hk, h, bh, i, q0, run;
  int rows;
};

// A thread's scratch for backward, shared by both paths: the probability tile P (then dS), the
// dP tile, delta = rowsum(dO * O) of the block's rows, and one tile per softcap for its
// derivative (recorded while the scores are rebuilt, used when dS is walked back).
template <typename T>
struct BackwardTiles {
  Scratch<T> s, dp, t;  // t: P^T and dS^T for the float32 products
  std::vector<T> delta;
  std::vector<Scratch<T>> deriv_store;
  std::vector<T*> derivs;
  ~BackwardTiles() {
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(false);
  }
  explicit BackwardTiles(const Problem<T>& P)
      : s(P.tq * P.tk), dp(P.tq * P.tk), t(std::is_same_v<T, float> ? P.tq * P.tk : 0),
        delta(P.tq) {
    for (int n = 0; n < count_softcaps(P); ++n) {
      deriv_store.emplace_back(P.tq * P.tk);
      derivs.push_back(deriv_store.back().data);
    }
  }
  // What scores_tile records the softcap derivatives into: null when there are none.
  std::vector<T*>* softcap_derivs() { return derivs.empty() ? nullptr : &derivs; }
};

// Runs the backward row blocks of every task (b, hk) in `runs` contiguous runs of tasks, each
// run by one thread in order: a task's heads one after the other, and each head's query tiles in
// order. So a task's dK and dV are only ever written by one thread (no atomics), and a run's
// reductions (Reductions) add up in an order fixed by the run alone. `make_thread` builds a
// thread's scratch once; `visit(scratch, block)` does one block.
template <typename T, typename MakeThread, typename Visit>
void for_each_backward_block(const Problem<T>& P, int64_t runs, MakeThread make_thread,
                             Visit visit) {
  const int64_t tasks = P.B * P.Hkv;
  at::parallel_for(0, runs, 1, [&](int64_t run_begin, int64_t run_end) {
    auto scratch = make_thread();
    for (int64_t run = run_begin; run < run_end; ++run) {
      const int64_t task_begin = run * tasks / runs, task_end = (run + 1) * tasks / runs;
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / P.Hkv, hk = task % P.Hkv;
        for (int64_t g = 0; g < P.G; ++g) {
          const int64_t h = hk * P.G + g;
          for (int64_t i = 0; i < P.nQ; ++i) {
            const int64_t q0 = i * P.tq;
            const int rows = static_cast<int>(std::min(P.tq, P.Nq - q0));
            visit(scratch, RowBlock{b, hk, h, b * P.Hq + h, i, q0, run, rows});
          }
        }
      }
    }
  });
}

// delta[r] = rowsum(dO * O) over the block's rows (dO in its own type G, O in T; row stride Dv).
template <typename T, typename G>
void row_deltas(const G* gout, const T* out, int rows, int Dv, T* delta) {
  for (int r = 0; r < rows; ++r) {
    T acc = 0;
    for (int c = 0; c < Dv; ++c) acc += static_cast<T>(gout[r * Dv + c]) * out[r * Dv + c];
    delta[r] = acc;
  }
}

// The float32 / float64 backward: the tiles of one row block on BLAS.
template <typename T>
void backward_block(const Problem<T>& P, const T* out, const T* lse, const T* gout, T* dq, T* dk,
                    T* dv, const Reductions& R, BackwardTiles<T>& W, const RowBlock& blk) {
  const int D = static_cast<int>(P.D), Dv = static_cast<int>(P.Dv), ld = static_cast<int>(P.tk);
  const int64_t bk = blk.b * P.Hkv + blk.hk, row0 = blk.bh * P.Nq + blk.q0;
  const T* kbase = P.k + bk * P.Nk * P.D;
  const T* vbase = P.v + bk * P.Nk * P.Dv;
  T* dkbase = dk + bk * P.Nk * P.D;
  T* dvbase = dv + bk * P.Nk * P.Dv;
  const T* qp = P.q + row0 * P.D;
  const T* gp = gout + row0 * P.Dv;
  const T* lp = lse + row0;
  T* dqp = dq + row0 * P.D;
  T* const s = W.s.data;
  T* const dp = W.dp.data;
  const int rows = blk.rows;
  row_deltas(gp, out + row0 * P.Dv, rows, Dv, W.delta.data());
  for (const auto& [j, full] : visits_of(P, blk.i)) {
    const auto [k0, cols] = tile_span(P, blk.b, blk.q0, rows, j, full);
    if (cols == 0) continue;
    scores_tile<T>(P, blk.b, blk.h, blk.q0, rows, k0, cols, full, s, ld, W.softcap_derivs());
    for (int r = 0; r < rows; ++r) exp_row(s + r * ld, cols, lp[r]);
    if constexpr (std::is_same_v<T, float>) {
      // the products on brgemm as the scores are (row-major, so P, V and dS are transposed
      // into the thread's buffers where they are the transposed operand)
      float* const t = W.t.data;
      // dV += P^T dO ; dP = dO V^T
      transpose(s, rows, cols, ld, t, rows);
      at::native::cpublas::brgemm(cols, Dv, rows, rows, Dv, Dv, true, t, gp,
                                  dvbase + k0 * P.Dv, /*is_vnni=*/false);
      at::native::cpublas::brgemm(rows, cols, Dv, Dv, cols, ld, false, gp,
                                  transposed_tile(vbase + k0 * P.Dv, cols, Dv), dp,
                                  /*is_vnni=*/false);
      score_grads_tile(P, blk.b, blk.h, blk.q0, rows, k0, cols, s, dp, ld, W.delta.data(),
                       W.derivs, blk.run, R);
      // dQ += scale dS K ; dK += scale dS^T Q
      scale_rows(s, ld, rows, cols, P.scale);
      at::native::cpublas::brgemm(rows, D, cols, ld, D, D, true, s, kbase + k0 * P.D, dqp,
                                  /*is_vnni=*/false);
      transpose(s, rows, cols, ld, t, rows);
      at::native::cpublas::brgemm(cols, D, rows, rows, D, D, true, t, qp, dkbase + k0 * P.D,
                                  /*is_vnni=*/false);
    } else {
      // dV += P^T dO ; dP = dO V^T
      gemm<T>(false, true, Dv, cols, rows, T(1), gp, Dv, s, ld, T(1), dvbase + k0 * P.Dv, Dv);
      gemm<T>(true, false, cols, rows, Dv, T(1), vbase + k0 * P.Dv, Dv, gp, Dv, T(0), dp, ld);
      score_grads_tile(P, blk.b, blk.h, blk.q0, rows, k0, cols, s, dp, ld, W.delta.data(),
                       W.derivs, blk.run, R);
      // dQ += scale dS K ; dK += scale dS^T Q
      gemm<T>(false, false, D, rows, cols, P.scale, kbase + k0 * P.D, D, s, ld, T(1), dqp, D);
      gemm<T>(false, true, D, cols, rows, P.scale, qp, D, s, ld, T(1), dkbase + k0 * P.D, D);
    }
  }
}

template <typename T>
void backward_impl(const Problem<T>& P, const T* out, const T* lse, const T* gout, T* dq, T* dk,
                   T* dv, const Reductions& R, int64_t runs) {
  if constexpr (std::is_same_v<T, float>) {
    if (P.kt == nullptr) {  // as the forward did: the same scores
      const WholeKeysT keys(P);
      if (keys.P.kt != nullptr) return backward_impl(keys.P, out, lse, gout, dq, dk, dv, R, runs);
    }
  }
  for_each_backward_block(
      P, runs, [&] { return BackwardTiles<T>(P); },
      [&](BackwardTiles<T>& W, const RowBlock& blk) {
        backward_block(P, out, lse, gout, dq, dk, dv, R, W, blk);
      });
}

// Sum of buf (runs, ...) over its first dim, in order (bitwise the same on every run).
at::Tensor sum_in_order(const at::Tensor& buf) {
  at::Tensor total = buf.select(0, 0).clone();
  for (int64_t c = 1; c < buf.size(0); ++c) total.add_(buf.select(0, c));
  return total;
}

// ---------------------------------------------------------------------------------------------
// Half precision (bfloat16, float16) on the CPU's matrix units.
//
// q k^T, P V and the four backward products are half x half -> float GEMMs through
// at::native::cpublas::brgemm, the oneDNN micro-kernel PyTorch's own flash-attention CPU kernel
// uses: it runs on AMX tiles, AVX512-BF16 / AVX512-FP16 dot products, whatever the CPU has, and
// throws where it has none (half_gemm_problem then says why and Python computes in float32).
// The softmax statistics, the accumulators and every gradient stay float32; the probabilities
// P and the score gradient dS are rounded to the input type for their GEMMs, as every fused
// kernel does. The micro-kernel reads its B operand in VNNI layout (pairs along the reduction
// dimension interleaved: element (k, n) at ((k / 2) * ldb + n) * 2 + k % 2), so K, V, Q and
// dO are repacked once per call (O(N D) work) and every reduction length is padded to even
// with zeros.

// C (m x n, row stride ldc) (+)= A (m x kk, row stride lda) B, B in VNNI layout with row stride
// ldb (in pairs); kk even.
template <typename H>
inline void half_gemm(int64_t m, int64_t n, int64_t kk, const H* a, int64_t lda, const H* b,
                      int64_t ldb, float* c, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(m, n, kk, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/true);
}

// x padded with zeros along dim to an even length.
at::Tensor pad_even(const at::Tensor& x, int64_t dim) {
  const int64_t n = x.size(dim);
  if (n % 2 == 0) return x;
  std::vector<int64_t> pad(2 * (x.dim() - dim), 0);
  pad[pad.size() - 1] = 1;  // constant_pad_nd lists the last dim first: (.., dim lo, dim hi)
  return at::constant_pad_nd(x, pad, 0);
}

// The VNNI repacks below move 2-byte elements (bfloat16, float16) in plain loops, one matrix per
// task: a strided tensor copy of the same layouts runs several times slower (TensorIterator's
// generic path for a last dim of 2), and the repack is O(N D) per call.

// (..., R, C) with R even -> (..., R / 2, C, 2): the VNNI layout of x as the B operand of a
// product that reduces over R (rows 2i and 2i + 1 interleaved).
at::Tensor vnni(const at::Tensor& x) {
  const int64_t R = x.size(-2), C = x.size(-1);
  TORCH_CHECK(R % 2 == 0 && x.element_size() == 2, "vnni: an even row count of 2-byte values");
  const at::Tensor src = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), {R / 2, C, 2});
  at::Tensor out = at::empty(shape, x.options());
  const auto* in = static_cast<const uint16_t*>(src.data_ptr());
  auto* o = static_cast<uint16_t*>(out.data_ptr());
  const int64_t mats = R * C == 0 ? 0 : src.numel() / (R * C);
  at::parallel_for(0, mats * (R / 2), 64, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {  // rows 2 pair, 2 pair + 1 of all matrices
      const uint16_t* r0 = in + 2 * pair * C;
      const uint16_t* r1 = r0 + C;
      uint16_t* dst = o + 2 * pair * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        dst[2 * c] = r0[c];
        dst[2 * c + 1] = r1[c];
      }
    }
  });
  return out;
}

// (..., R, C) with C even -> (..., C / 2, R, 2): vnni(x^T), the B operand of a product that
// reduces over C. Element pairs (2j, 2j + 1) of a row stay together, so it is a transpose of
// 32-bit pairs, done in blocks of 16 rows to keep the writes in few cache lines.
at::Tensor vnni_of_transpose(const at::Tensor& x) {
  const int64_t R = x.size(-2), C = x.size(-1), P = C / 2;
  TORCH_CHECK(C % 2 == 0 && x.element_size() == 2, "vnni: an even column count of 2-byte values");
  const at::Tensor src = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.insert(shape.end(), {P, R, 2});
  at::Tensor out = at::empty(shape, x.options());
  const auto* in = static_cast<const uint32_t*>(src.data_ptr());  // (mats, R, P) pairs
  auto* o = static_cast<uint32_t*>(out.data_ptr());                // (mats, P, R) pairs
  constexpr int64_t kBlock = 16;
  const int64_t blocks = (R + kBlock - 1) / kBlock;
  const int64_t mats = R * C == 0 ? 0 : src.numel() / (R * C);
  at::parallel_for(0, mats * blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t m = task / blocks, r0 = (task % blocks) * kBlock;
      const int64_t r1 = std::min(R, r0 + kBlock);
      const uint32_t* a = in + m * R * P;
      uint32_t* b = o + m * P * R;
      for (int64_t p = 0; p < P; ++p)
        for (int64_t r = r0; r < r1; ++r) b[p * R + r] = a[r * P + p];
    }
  });
  return out;
}

// Why the half GEMM cannot run for this dtype on this CPU ("" when it can): a 2 x 16 x 2
// product checked against its known value.
std::string half_gemm_problem(at::ScalarType dtype) {
  try {
    at::Tensor a = at::ones({2, 2}, at::TensorOptions().dtype(dtype));
    at::Tensor b = at::ones({1, 16, 2}, at::TensorOptions().dtype(dtype));
    at::Tensor c = at::zeros({2, 16}, at::kFloat);
    if (dtype == at::kBFloat16) {
      half_gemm(2, 16, 2, a.data_ptr<at::BFloat16>(), 2, b.data_ptr<at::BFloat16>(), 16,
                c.data_ptr<float>(), 16, false);
    } else {
      half_gemm(2, 16, 2, a.data_ptr<at::Half>(), 2, b.data_ptr<at::Half>(), 16,
                c.data_ptr<float>(), 16, false);
    }
    at::native::cpublas::brgemm_release(true);
    if (!c.eq(2).all().item<bool>()) return "the half-precision GEMM returned a wrong result";
  } catch (const std::exception& e) {
    std::string what = e.what();
    return what.substr(0, what.find('\n'));
  }
  return "";
}

std::string half_gemm_status(const std::string& dtype) {
  static const std::string bf16 = half_gemm_problem(at::kBFloat16);
  static const std::string f16 = half_gemm_problem(at::kHalf);
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float16", "unknown half dtype ", dtype);
  return dtype == "bfloat16" ? bf16 : f16;
}

// The repacked operands of one call (all contiguous, D and Dv padded to even Dp, Dvp).
template <typename H>
struct HalfOperands {
  const H* q;   // (B, Hq, Nq, Dp): A of S = Q K^T
  const H* kt;  // (B, Hkv, Dp / 2, Nkp, 2): K^T in VNNI, B of S
  const H* v;   // (B, Hkv, Nkp / 2, Dvp, 2): V in VNNI, B of P V
  // backward only
  const H* g = nullptr;    // (B, Hq, Nq, Dvp): dO, A of dP = dO V^T
  const H* gv = nullptr;   // (B, Hq, Nqp / 2, Dvp, 2): dO in VNNI, B of dV += P^T dO
  const H* vt = nullptr;   // (B, Hkv, Dvp / 2, Nkp, 2): V^T in VNNI, B of dP
  const H* kv = nullptr;   // (B, Hkv, Nkp / 2, Dp, 2): K in VNNI, B of dQ += dS K
  const H* qv = nullptr;   // (B, Hq, Nqp / 2, Dp, 2): Q in VNNI, B of dK += dS^T Q
  int64_t Nqp, Nkp;        // Nq, Nk rounded up to even
};

// Scaled, modified, masked scores of one tile into s (float, row stride ld).
// With `unscaled` (only where nothing but the mask follows) the scale is left for the softmax
// to apply (online_softmax_tile), saving a pass over the tile.
template <typename H>
void half_scores_tile(const Problem<float>& P, const HalfOperands<H>& X, int64_t b, int64_t h,
                      int64_t q0, int rows, int64_t k0, int cols, bool full, float* s, int ld,
                      const std::vector<float*>* derivs, bool unscaled = false) {
  const int64_t Dp = P.D, hk = h / P.G;
  const H* qp = X.q + ((b * P.Hq + h) * P.Nq + q0) * Dp;
  const H* kp = X.kt + (b * P.Hkv + hk) * Dp * X.Nkp + 2 * k0;
  half_gemm(rows, cols, Dp, qp, Dp, kp, X.Nkp, s, ld, false);
  if (!unscaled) scale_rows(s, ld, rows, cols, P.scale);
  finish_scores(P, b, h, q0, rows, k0, cols, full, s, ld, derivs);
}

// The transpose of a float tile (rows x cols) rounded into a half tile (cols x rows, stride
// ldh), times mul; a zero column appended when rows is odd.
template <typename H>
void round_tile_t(const float* s, int lds, int rows, int cols, float mul, H* out, int ldh) {
  for (int c = 0; c < cols; ++c) {
    H* dst = out + static_cast<int64_t>(c) * ldh;
    for (int r = 0; r < rows; ++r) dst[r] = round_to<H>(s[static_cast<int64_t>(r) * lds + c] * mul);
    if (rows % 2) dst[rows] = H(0.0f);
  }
}

// A float tile (rows x cols, stride lds) times mul rounded into a half tile out (stride ldh) and
// its transpose out_t (cols x rows, stride ldt) in one read of s, each with a zero column
// appended where its row length is odd (the GEMMs reduce over pairs).
template <typename H>
void round_tile_both(const float* s, int lds, int rows, int cols, float mul, H* out, int ldh,
                     H* out_t, int ldt) {
  for (int r = 0; r < rows; ++r) {
    const float* src = s + static_cast<int64_t>(r) * lds;
    H* dst = out + static_cast<int64_t>(r) * ldh;
#pragma omp simd
    for (int c = 0; c < cols; ++c) dst[c] = round_to<H>(src[c] * mul);  // vectorised
    if (cols % 2) dst[cols] = H(0.0f);
    for (int c = 0; c < cols; ++c) out_t[static_cast<int64_t>(c) * ldt + r] = dst[c];  // strided
  }
  if (rows % 2)
    for (int c = 0; c < cols; ++c) out_t[static_cast<int64_t>(c) * ldt + rows] = H(0.0f);
}

template <typename H, typename O>
void forward_half(const Problem<float>& P, const HalfOperands<H>& X, O* out, float* lse) {
  const int64_t tasks = P.B * P.Hq * P.nQ;
  // the softmax scales the scores where no bias or modifier needs them scaled first
  const bool fold_scale = !P.modifies() && P.scale > 0;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<float> s_buf(P.tq * P.tk), acc_buf(P.tq * P.Dv);
    Scratch<H> p_buf(P.tq * P.tk);
    float* const s = s_buf.data;
    float* const acc = acc_buf.data;
    H* const p = p_buf.data;
    std::vector<float> m(P.tq), l(P.tq);
    const int ld = static_cast<int>(P.tk), Dv = static_cast<int>(P.Dv);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % P.nQ, bh = task / P.nQ, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t q0 = i * P.tq;
      const int rows = static_cast<int>(std::min(P.tq, P.Nq - q0));
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc, acc + P.tq * P.Dv, 0.0f);
      const H* vbase = X.v + (b * P.Hkv + h / P.G) * X.Nkp * P.Dv;
      for (const auto& [j, full] : visits_of(P, i)) {
        const auto [k0, cols] = tile_span(P, b, q0, rows, j, full);
        if (cols == 0) continue;
        half_scores_tile(P, X, b, h, q0, rows, k0, cols, full, s, ld, nullptr, fold_scale);
        online_softmax_tile(s, ld, rows, cols, m.data(), l.data(), acc, Dv,
                            fold_scale ? P.scale : 1.0f, p, ld);
        half_gemm(rows, Dv, cols + cols % 2, p, ld, vbase + k0 * P.Dv, Dv, acc, Dv, true);
      }
      finish_rows(rows, m.data(), l.data(), acc, Dv, out + (bh * P.Nq + q0) * P.Dv,
                  lse + bh * P.Nq + q0);
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// A thread's scratch for the half-precision backward: the float tiles of BackwardTiles, and the
// half tiles the GEMMs read: dS (rows x cols) and a transposed tile (P^T, then dS^T).
template <typename H>
struct HalfBackwardTiles : BackwardTiles<float> {
  Scratch<H> ds, t;
  int ldt;  // row stride of t: tile_q rounded up to even (the GEMM reduces over pairs of rows)
  explicit HalfBackwardTiles(const Problem<float>& P)
      : BackwardTiles<float>(P), ds(P.tq * P.tk), t(P.tk * (P.tq + P.tq % 2)),
        ldt(static_cast<int>(P.tq + P.tq % 2)) {}
  // brgemm keeps per-thread state (AMX tile configuration) until released.
  ~HalfBackwardTiles() { at::native::cpublas::brgemm_release(true); }
};

// The half-precision backward: the tiles of one row block on the half GEMMs (as backward_block,
// with P and dS rounded to H for their products).
template <typename H>
void backward_half_block(const Problem<float>& P, const HalfOperands<H>& X, const float* out,
                         const float* lse, float* dq, float* dk, float* dv, const Reductions& R,
                         HalfBackwardTiles<H>& W, const RowBlock& blk) {
  const int64_t Dp = P.D, Dv = P.Dv;
  const int ld = static_cast<int>(P.tk), ldt = W.ldt;
  const int64_t bk = blk.b * P.Hkv + blk.hk, row0 = blk.bh * P.Nq + blk.q0, q0 = blk.q0;
  const H* vt = X.vt + bk * Dv * X.Nkp;
  const H* kv = X.kv + bk * X.Nkp * Dp;
  float* dkbase = dk + bk * P.Nk * Dp;
  float* dvbase = dv + bk * P.Nk * Dv;
  const H* gp = X.g + row0 * Dv;
  const H* gv = X.gv + blk.bh * X.Nqp * Dv + q0 * Dv;  // q0 even: pair q0 / 2
  const H* qv = X.qv + blk.bh * X.Nqp * Dp + q0 * Dp;
  const float* lp = lse + row0;
  float* dqp = dq + row0 * Dp;
  float* const s = W.s.data;
  float* const dp = W.dp.data;
  H* const ds = W.ds.data;
  H* const t = W.t.data;
  const int rows = blk.rows, rows_even = rows + rows % 2;
  const bool fold_scale = !P.modifies() && P.scale > 0;  // as in forward_half
  row_deltas(gp, out + row0 * Dv, rows, static_cast<int>(Dv), W.delta.data());
  for (const auto& [j, full] : visits_of(P, blk.i)) {
    const auto [k0, cols] = tile_span(P, blk.b, q0, rows, j, full);
    if (cols == 0) continue;
    const int cols_even = cols + cols % 2;
    half_scores_tile(P, X, blk.b, blk.h, q0, rows, k0, cols, full, s, ld, W.softcap_derivs(),
                     fold_scale);
    for (int r = 0; r < rows; ++r) exp_row(s + r * ld, cols, lp[r], fold_scale ? P.scale : 1.0f);
    // dV += P^T dO ; dP = dO V^T
    round_tile_t(s, ld, rows, cols, 1.0f, t, ldt);
    half_gemm(cols, Dv, rows_even, t, ldt, gv, Dv, dvbase + k0 * Dv, Dv, true);
    half_gemm(rows, cols, Dv, gp, Dv, vt + 2 * k0, X.Nkp, dp, ld, false);
    score_grads_tile(P, blk.b, blk.h, q0, rows, k0, cols, s, dp, ld, W.delta.data(), W.derivs,
                     blk.run, R);
    // dQ += scale dS K ; dK += scale dS^T Q
    round_tile_both(s, ld, rows, cols, P.scale, ds, ld, t, ldt);
    half_gemm(rows, Dp, cols_even, ds, ld, kv + k0 * Dp, Dp, dqp, Dp, true);
    half_gemm(cols, Dp, rows_even, t, ldt, qv, Dp, dkbase + k0 * Dp, Dp, true);
  }
}

// As backward_impl (the same runs and float64 reductions), on the half GEMMs.
template <typename H>
void backward_half(const Problem<float>& P, const HalfOperands<H>& X, const float* out,
                   const float* lse, float* dq, float* dk, float* dv, const Reductions& R,
                   int64_t runs) {
  for_each_backward_block(
      P, runs, [&] { return HalfBackwardTiles<H>(P); },
      [&](HalfBackwardTiles<H>& W, const RowBlock& blk) {
        backward_half_block(P, X, out, lse, dq, dk, dv, R, W, blk);
      });
}

// ---------------------------------------------------------------------------------------------
// Decoding: a few queries (one query tile) against a long key/value cache.
//
// The query rows of all G heads of a key/value group are stacked into one (G Nq) x D block, so
// each K/V tile is read once per group rather than once per query head, and the visited key
// tiles are split into chunks run as separate tasks, so that a call with few (batch, kv head)
// pairs still spreads over the threads. Each chunk leaves its running max, sum and unnormalised
// output; a last pass merges the chunks of every row (log-sum-exp weights). Inputs of another
// type than the compute type T (bfloat16, float16) are converted tile by tile in cache, so K and
// V are read from memory once, in their own width.

// Decoding applies when the call has a single query tile of at most this many rows.
constexpr int64_t kDecodeRows = 16;
// Tasks the key chunks aim at (independent of the thread count, so results do not depend on it).
constexpr int64_t kDecodeTasks = 64;

// A tile of `rows` rows of width `width` (row stride `width` in the source) as T: the source
// itself when it already is T, else converted into buf.
template <typename T, typename In>
const T* as_compute(const In* src, int64_t rows, int64_t width, T* buf) {
  if constexpr (std::is_same_v<T, In>) {
    return src;
  } else {
    const int64_t n = rows * width;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<T>(src[i]);
    return buf;
  }
}

// Up to this many stacked query rows the decoding products run as the loops below rather
// than BLAS calls: with so few rows a GEMM is a matrix-vector product, which the BLAS libraries
// run far below memory speed; the loops read each key and value row once, for all rows.
constexpr int64_t kFewRows = 8;
// Up to this many stacked rows the AVX-512 loops below (where they fit) run instead: for
// float K and V up to kFewRows (with 32 rows MKL's small GEMMs were about 8% faster); for half
// K and V up to 32 rows (Nq = 8 with 4 heads a group), where the alternative converts every
// tile to float first (measured level with it, without the conversion buffers).
template <typename In>
constexpr int64_t direct_rows() {
  return std::is_same_v<In, float> ? kFewRows : 32;
}

// s[r, c] = scale * q[r] . k[c] for rows x cols (row stride ld), q (rows x D), k (cols x D).
template <typename T>
void scores_few_rows(const T* q, const T* k, int64_t rows, int cols, int64_t D, T scale, T* s,
                     int ld) {
  for (int c = 0; c < cols; ++c) {
    const T* kc = k + c * D;
    for (int64_t r = 0; r < rows; ++r) {
      const T* qr = q + r * D;
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t d = 0; d < D; ++d) acc += qr[d] * kc[d];
      s[r * ld + c] = scale * acc;
    }
  }
}

// acc[r] += sum_c p[r, c] v[c] for rows x cols (row stride ld), v (cols x Dv).
template <typename T>
void pv_few_rows(const T* p, int ld, const T* v, int64_t rows, int cols, int64_t Dv, T* acc) {
  for (int c = 0; c < cols; ++c) {
    const T* vc = v + c * Dv;
    for (int64_t r = 0; r < rows; ++r) {
      const T w = p[r * ld + c];
      if (w == T(0)) continue;
      T* a = acc + r * Dv;
#pragma omp simd
      for (int64_t d = 0; d < Dv; ++d) a[d] += w * vc[d];
    }
  }
}

// Batch and head strides of K and V (elements). A KV cache is a slice [:, :, :n] of a larger
// buffer: its rows are dense but its heads are not, and copying it whole for every decoded
// token would cost as much as the attention itself.
struct KvStrides {
  int64_t kb, kh, vb, vh;
  KvStrides(const at::Tensor& k, const at::Tensor& v)
      : kb(k.stride(0)), kh(k.stride(1)), vb(v.stride(0)), vh(v.stride(1)) {}
};

// x itself when each (b, h) slice is a dense (N, D) block, else a contiguous copy.
at::Tensor rows_contiguous(const at::Tensor& x) {
  const bool dense_rows = x.stride(3) == 1 && (x.size(2) <= 1 || x.stride(2) == x.size(3));
  return dense_rows ? x : x.contiguous();
}

#if defined(__AVX512F__)
// The decoding loops above in AVX-512 for float compute, D and Dv multiples of 16 (NB blocks of
// 16 floats, a compile-time count so that a key's row stays in registers). K and V rows are
// converted from their own type in registers, so bfloat16 and float16 caches are read once, in
// their own width, with no converted copy of the tile; two accumulators per dot product halve
// its chain of dependent FMAs, and P V adds two keys per pass over the accumulator rows.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bfloat16 is the top half of a float: exact
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {  // exact
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int NB, typename In>
void scores_few_rows_avx512(const float* q, const In* k, int64_t rows, int cols, float scale,
                            float* s, int ld) {
  constexpr int64_t D = 16 * NB;
  for (int c = 0; c < cols; ++c) {
    __m512 kc[NB];
    for (int j = 0; j < NB; ++j) kc[j] = load16(k + c * D + 16 * j);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * D;
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int j = 0; j + 1 < NB; j += 2) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * j), kc[j], a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + 16 * j + 16), kc[j + 1], a1);
      }
      if (NB % 2) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qr + D - 16), kc[NB - 1], a0);
      s[r * ld + c] = scale * _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
    }
  }
}

template <int NB, typename In>
void pv_few_rows_avx512(const float* p, int ld, const In* v, int64_t rows, int cols,
                        float* acc) {
  constexpr int64_t Dv = 16 * NB;
  int c = 0;
  for (; c + 1 < cols; c += 2) {
    __m512 v0[NB], v1[NB];
    for (int j = 0; j < NB; ++j) {
      v0[j] = load16(v + c * Dv + 16 * j);
      v1[j] = load16(v + (c + 1) * Dv + 16 * j);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const float w0 = p[r * ld + c], w1 = p[r * ld + c + 1];
      if (w0 == 0.0f && w1 == 0.0f) continue;  // masked keys (exp of -inf): nothing to add
      const __m512 b0 = _mm512_set1_ps(w0), b1 = _mm512_set1_ps(w1);
      float* a = acc + r * Dv;
      for (int j = 0; j < NB; ++j) {
        const __m512 x = _mm512_fmadd_ps(b0, v0[j], _mm512_loadu_ps(a + 16 * j));
        _mm512_storeu_ps(a + 16 * j, _mm512_fmadd_ps(b1, v1[j], x));
      }
    }
  }
  if (c < cols) {
    for (int64_t r = 0; r < rows; ++r) {
      const float w = p[r * ld + c];
      if (w == 0.0f) continue;
      const __m512 b = _mm512_set1_ps(w);
      float* a = acc + r * Dv;
      for (int j = 0; j < NB; ++j)
        _mm512_storeu_ps(a + 16 * j, _mm512_fmadd_ps(b, load16(v + c * Dv + 16 * j),
                                                     _mm512_loadu_ps(a + 16 * j)));
    }
  }
}
#endif

// Rows of a block of K or V fetched into L2 one at a time from the loops of another product
// (V's block while the scores run, the next K block while P V runs), so that the reads run under
// the arithmetic rather than between it: one core with loops that wait for each miss read half
// as fast as one whose reads are in flight.
struct RowFetch {
  const char* base;
  int64_t row_bytes;
  void fetch(int64_t row) const {
    for (int64_t at = 0; at < row_bytes; at += 64)
      __builtin_prefetch(base + row * row_bytes + at, 0, 2);
  }
};

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
// Decoding on bfloat16 q, K and V with AVX512-BF16 dot products (vdpbf16ps: 32 products of
// bfloat16 pairs, exact, added into 16 float lanes), where the loops above widen every element
// to float first and spend as much again on one horizontal sum per dot product.
//
// Scores: a row of q against 16 keys leaves 16 vectors of partial sums, and one transposing
// tree of unpacks and lane shuffles sums all 16 at once (45 instructions, not 16 reductions).
//
// P V: pairs of keys. Two value rows interleaved by vpunpck{l,h}wd hold (v[c][d], v[c+1][d])
// pairs, and the probability pair (p[c], p[c+1]), rounded to bfloat16 as the tiled forward's P
// is, multiplies them in one instruction. The interleave works within 128-bit lanes, so each 32
// wide block of an accumulator row holds its columns in `unpack order` (see pair_order) until
// the task ends and in_column_order puts them back.

inline __m512bh as_pairs(__m512i x) {
  __m512bh r;
  std::memcpy(&r, &x, sizeof(r));
  return r;
}

// The horizontal sums of x[0..15], in order, as one vector.
inline __m512 sum16(const __m512* x) {
  __m512 y[8], z[4], w[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: x[2i] partial sums at 0 and 2, x[2i+1] at 1, 3
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]),
                         _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per lane: the lane's sums of x[4i .. 4i+3]
    const __m512d a = _mm512_castps_pd(y[2 * i]), b = _mm512_castps_pd(y[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // lanes (0, 2 | 0, 2) + (1, 3 | 1, 3) of two vectors: pairs of lanes summed, twice
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(z[2 * i], z[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                       _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

template <int NB>  // D = 32 NB
inline __m512 dot_partials_bf16(const __m512bh* qr, const at::BFloat16* kc) {
  __m512 a = _mm512_setzero_ps();
  for (int j = 0; j < NB; ++j)
    a = _mm512_dpbf16_ps(a, qr[j], as_pairs(_mm512_loadu_si512(kc + 32 * j)));
  return a;
}

// s[r, c] = scale * q[r] . k[c] for rows x cols (row stride ld), q (rows x D), k (cols x D).
template <int NB>
void scores_few_rows_bf16(const at::BFloat16* q, const at::BFloat16* k, int64_t rows, int cols,
                          float scale, float* s, int ld, const RowFetch& v_rows) {
  constexpr int64_t D = 32 * NB;
  const __m512 sc = _mm512_set1_ps(scale);
  // keys outer: the rows' passes over 16 keys read them from L1, and the stream of new keys
  // from memory stays steady (rows outer left the memory idle during the later rows)
  int c = 0;
  for (; c + 16 <= cols; c += 16) {
    for (int i = 0; i < 16; ++i) v_rows.fetch(c + i);
    for (int64_t r = 0; r < rows; ++r) {
      __m512bh qr[NB];
      for (int j = 0; j < NB; ++j) qr[j] = as_pairs(_mm512_loadu_si512(q + r * D + 32 * j));
      __m512 part[16];
      for (int i = 0; i < 16; ++i) part[i] = dot_partials_bf16<NB>(qr, k + (c + i) * D);
      _mm512_storeu_ps(s + r * ld + c, _mm512_mul_ps(sc, sum16(part)));
    }
  }
  for (int cc = c; cc < cols; ++cc) v_rows.fetch(cc);
  for (int64_t r = 0; r < rows && c < cols; ++r) {
    __m512bh qr[NB];
    for (int j = 0; j < NB; ++j) qr[j] = as_pairs(_mm512_loadu_si512(q + r * D + 32 * j));
    for (int cc = c; cc < cols; ++cc)
      s[r * ld + cc] = scale * _mm512_reduce_add_ps(dot_partials_bf16<NB>(qr, k + cc * D));
  }
}

// Column d' of a 32-wide accumulator block in unpack order holds column pair_order(d') of v.
constexpr int pair_order(int i) {
  return i < 16 ? 8 * (i / 4) + i % 4 : 8 * ((i - 16) / 4) + 4 + i % 4;
}

// acc[r] += sum_c p[r, c] v[c] over keys [c0, c1) and columns [d0, d0 + 32 NBD) for RG rows
// (p: bfloat16, row stride ldp, a 0 after an odd last column; acc: row stride Dv, unpack
// order), v (keys x Dv), the accumulators in registers throughout. `next`, where given, has
// the rows of the same keys fetched.
template <int RG, int NBD>
inline void pv_block_bf16(const at::BFloat16* p, int ldp, const at::BFloat16* v, int c0, int c1,
                          int64_t Dv, int64_t d0, float* acc, const RowFetch* next) {
  __m512 lo[RG][NBD], hi[RG][NBD];
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < NBD; ++j) {
      lo[r][j] = _mm512_loadu_ps(acc + r * Dv + d0 + 32 * j);
      hi[r][j] = _mm512_loadu_ps(acc + r * Dv + d0 + 32 * j + 16);
    }
  for (int c = c0; c < c1; c += 2) {
    if (next) {
      next->fetch(c);
      next->fetch(c + 1);
    }
    __m512bh vl[NBD], vh[NBD];
    for (int j = 0; j < NBD; ++j) {
      const __m512i a = _mm512_loadu_si512(v + c * Dv + d0 + 32 * j);
      const __m512i b = c + 1 < c1 ? _mm512_loadu_si512(v + (c + 1) * Dv + d0 + 32 * j)
                                   : _mm512_setzero_si512();
      vl[j] = as_pairs(_mm512_unpacklo_epi16(a, b));
      vh[j] = as_pairs(_mm512_unpackhi_epi16(a, b));
    }
    for (int r = 0; r < RG; ++r) {
      int32_t pair;
      std::memcpy(&pair, p + r * ldp + c, sizeof(pair));
      const __m512bh w = as_pairs(_mm512_set1_epi32(pair));
      for (int j = 0; j < NBD; ++j) {
        lo[r][j] = _mm512_dpbf16_ps(lo[r][j], vl[j], w);
        hi[r][j] = _mm512_dpbf16_ps(hi[r][j], vh[j], w);
      }
    }
  }
  for (int r = 0; r < RG; ++r)
    for (int j = 0; j < NBD; ++j) {
      _mm512_storeu_ps(acc + r * Dv + d0 + 32 * j, lo[r][j]);
      _mm512_storeu_ps(acc + r * Dv + d0 + 32 * j + 16, hi[r][j]);
    }
}

// Keys 16 at a time, so that after the first pass every pass reads them from L1; rows four at
// a time (4 x 2 x NBD accumulators and 2 NBD value pairs fit in the 32 vector registers).
template <int NBD>
void pv_few_rows_bf16(const at::BFloat16* p, int ldp, const at::BFloat16* v, int64_t rows,
                      int cols, int64_t Dv, float* acc, const RowFetch& next) {
  for (int c0 = 0; c0 < cols; c0 += 16) {
    const int c1 = std::min(cols, c0 + 16);
    for (int64_t d0 = 0; d0 < Dv; d0 += 32 * NBD) {
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4)
        pv_block_bf16<4, NBD>(p + r * ldp, ldp, v, c0, c1, Dv, d0, acc + r * Dv,
                              r == 0 && d0 == 0 ? &next : nullptr);
      const RowFetch* fetch = r == 0 && d0 == 0 ? &next : nullptr;
      switch (rows - r) {
        case 3: pv_block_bf16<3, NBD>(p + r * ldp, ldp, v, c0, c1, Dv, d0, acc + r * Dv, fetch);
          break;
        case 2: pv_block_bf16<2, NBD>(p + r * ldp, ldp, v, c0, c1, Dv, d0, acc + r * Dv, fetch);
          break;
        case 1: pv_block_bf16<1, NBD>(p + r * ldp, ldp, v, c0, c1, Dv, d0, acc + r * Dv, fetch);
          break;
      }
    }
  }
}

// Accumulator rows (rows x Dv) from unpack order back to column order.
void in_column_order(float* acc, int64_t rows, int64_t Dv) {
  float block[32];
  for (int64_t at = 0; at < rows * Dv; at += 32) {
    for (int i = 0; i < 32; ++i) block[pair_order(i)] = acc[at + i];
    std::memcpy(acc + at, block, sizeof(block));
  }
}
#endif

// The few-rows decoding products for one tile: q (rows x D) float, k and v in their own type;
// returns false (nothing done) where no vector form fits (then the caller converts the tiles
// and runs scores_few_rows / pv_few_rows).
// Head dimensions the vector decoding loops are compiled for (a row of K or V in registers).
constexpr bool vector_head_dims(int64_t D, int64_t Dv) {
  auto fits = [](int64_t n) { return n == 32 || n == 64 || n == 128 || n == 256; };
  return fits(D) && fits(Dv);
}

template <typename T, typename In>
bool few_rows_tile_direct(int64_t D, int64_t Dv) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return vector_head_dims(D, Dv);
#endif
  (void)D;
  (void)Dv;
  return false;
}

template <typename T, typename In>
void scores_few_rows_direct(const T* q, const In* k, int64_t rows, int cols, int64_t D, T scale,
                            T* s, int ld) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    switch (D) {
      case 32: return scores_few_rows_avx512<2>(q, k, rows, cols, scale, s, ld);
      case 64: return scores_few_rows_avx512<4>(q, k, rows, cols, scale, s, ld);
      case 128: return scores_few_rows_avx512<8>(q, k, rows, cols, scale, s, ld);
      case 256: return scores_few_rows_avx512<16>(q, k, rows, cols, scale, s, ld);
    }
  }
#endif
  TORCH_CHECK(false, "qkv cpu kernel: no vector decoding form for D = ", D);
}

template <typename T, typename In>
void pv_few_rows_direct(const T* p, int ld, const In* v, int64_t rows, int cols, int64_t Dv,
                        T* acc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    switch (Dv) {
      case 32: return pv_few_rows_avx512<2>(p, ld, v, rows, cols, acc);
      case 64: return pv_few_rows_avx512<4>(p, ld, v, rows, cols, acc);
      case 128: return pv_few_rows_avx512<8>(p, ld, v, rows, cols, acc);
      case 256: return pv_few_rows_avx512<16>(p, ld, v, rows, cols, acc);
    }
  }
#endif
  TORCH_CHECK(false, "qkv cpu kernel: no vector decoding form for Dv = ", Dv);
}


// Keys per block of the AVX512-BF16 decoding loops: a block of K (and then of V) stays in the L1
// cache while each stacked query row reads it.
constexpr int kPairsBlock = 64;

// The AVX512-BF16 decoding loops (above) take bfloat16 calls with D and Dv in 32 .. 256.
template <typename In>
bool pairs_fit(int64_t D, int64_t Dv) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<In, at::BFloat16>) return vector_head_dims(D, Dv);
#endif
  (void)D;
  (void)Dv;
  return false;
}

template <typename T, typename In>
void scores_pairs(const In* q, const In* k, int64_t rows, int cols, int64_t D, T scale, T* s,
                  int ld, const In* v, int64_t Dv) {
  const RowFetch v_rows{reinterpret_cast<const char*>(v), Dv * static_cast<int64_t>(sizeof(In))};
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<In, at::BFloat16> && std::is_same_v<T, float>) {
    switch (D) {
      case 32: return scores_few_rows_bf16<1>(q, k, rows, cols, scale, s, ld, v_rows);
      case 64: return scores_few_rows_bf16<2>(q, k, rows, cols, scale, s, ld, v_rows);
      case 128: return scores_few_rows_bf16<4>(q, k, rows, cols, scale, s, ld, v_rows);
      case 256: return scores_few_rows_bf16<8>(q, k, rows, cols, scale, s, ld, v_rows);
    }
  }
#endif
  TORCH_CHECK(false, "qkv cpu kernel: no bfloat16 pair decoding for D = ", D);
}

template <typename T, typename In>
void pv_pairs(const at::BFloat16* p, int ldp, const In* v, int64_t rows, int cols, int64_t Dv,
              T* acc, const In* k_next, int64_t D) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<In, at::BFloat16> && std::is_same_v<T, float>) {
    const int nbd = static_cast<int>(std::min<int64_t>(Dv / 32, 2));
    const RowFetch next{reinterpret_cast<const char*>(k_next), D * 2};
    switch (nbd) {
      case 1: return pv_few_rows_bf16<1>(p, ldp, v, rows, cols, Dv, acc, next);
      case 2: return pv_few_rows_bf16<2>(p, ldp, v, rows, cols, Dv, acc, next);
      case 4: return pv_few_rows_bf16<4>(p, ldp, v, rows, cols, Dv, acc, next);
    }
  }
#endif
  TORCH_CHECK(false, "qkv cpu kernel: no bfloat16 pair decoding for Dv = ", Dv);
}

template <typename T>
void pairs_in_column_order(T* acc, int64_t rows, int64_t Dv) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, float>) return in_column_order(acc, rows, Dv);
#endif
  TORCH_CHECK(false, "qkv cpu kernel: no bfloat16 pair decoding");
}

// The decoding products of more stacked rows than the loops take: GEMMs, on brgemm in float32
// as the tiled products are (K transposed per tile).
template <typename T>
void stacked_scores(const T* q, const T* k, int64_t rows, int cols, int64_t D, T scale, T* s,
                    int ld) {
  const int m = static_cast<int>(rows), d = static_cast<int>(D);
  if constexpr (std::is_same_v<T, float>) {
    at::native::cpublas::brgemm(m, cols, d, d, cols, ld, false, q, transposed_tile(k, cols, D), s,
                                /*is_vnni=*/false);
    return scale_rows(s, ld, m, cols, scale);
  }
  gemm<T>(true, false, cols, m, d, scale, k, d, q, d, T(0), s, ld);
}

template <typename T>
void stacked_pv(const T* p, int ld, const T* v, int64_t rows, int cols, int64_t Dv, T* acc) {
  const int m = static_cast<int>(rows), dv = static_cast<int>(Dv);
  if constexpr (std::is_same_v<T, float>)
    return at::native::cpublas::brgemm(m, dv, cols, ld, dv, dv, true, p, v, acc,
                                       /*is_vnni=*/false);
  gemm<T>(false, false, dv, m, cols, T(1), v, dv, p, ld, T(1), acc, dv);
}

template <typename T, typename In>
void forward_decode(const Problem<T>& P, const In* q, const In* k, const In* v,
                    const KvStrides& kv, T* out, T* lse) {
  std::vector<std::pair<int64_t, bool>> visits = visits_of(P, 0);
  const int64_t groups = P.B * P.Hkv, n_visits = static_cast<int64_t>(visits.size());
  const int64_t want = std::max<int64_t>(1, (kDecodeTasks + groups - 1) / groups);
  const int64_t per_chunk = std::max<int64_t>(2, (n_visits + want - 1) / want);
  const int64_t chunks = std::max<int64_t>(1, (n_visits + per_chunk - 1) / per_chunk);
  const int64_t rows = P.G * P.Nq, D = P.D, Dv = P.Dv;
  constexpr T ninf = -std::numeric_limits<T>::infinity();
  // per (group, chunk): running max and sum (rows), unnormalised output (rows x Dv)
  std::vector<T> part_m(groups * chunks * rows, ninf), part_l(groups * chunks * rows, T(0));
  std::vector<T> part_acc(groups * chunks * rows * Dv, T(0));
  const bool pairs = pairs_fit<In>(D, Dv);
  const bool direct =
      !pairs && rows <= direct_rows<In>() && few_rows_tile_direct<T, In>(D, Dv);
  const int ldp = static_cast<int>((P.tk + 2) & ~int64_t(1));  // even: whole pairs per row
  at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s_buf(rows * P.tk), qbuf(pairs ? 0 : rows * D),
        kbuf(direct || pairs ? 0 : P.tk * D),
        vbuf(direct || pairs ? 0 : P.tk * Dv);
    Scratch<at::BFloat16> p_pairs(pairs ? rows * ldp : 0);
    T* const s = s_buf.data;
    const int ld = static_cast<int>(P.tk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t grp = task / chunks, c = task % chunks, b = grp / P.Hkv, hk = grp % P.Hkv;
      T* m = part_m.data() + task * rows;
      T* l = part_l.data() + task * rows;
      T* acc = part_acc.data() + task * rows * Dv;
      // the G heads of the group are consecutive: one (G Nq) x D block of q
      const In* q_in = q + (b * P.Hq + hk * P.G) * P.Nq * D;
      const T* qg = pairs ? nullptr : as_compute<T>(q_in, rows, D, qbuf.data);
      const In* kbase = k + b * kv.kb + hk * kv.kh;
      const In* vbase = v + b * kv.vb + hk * kv.vh;
      const int64_t last = std::min(n_visits, (c + 1) * per_chunk);
      for (int64_t t = c * per_chunk; t < last; ++t) {
        const auto [j, full] = visits[t];
        const auto [k0, cols] = tile_span(P, b, 0, static_cast<int>(P.Nq), j, full);
        if (cols == 0) continue;
        const In* kin = kbase + k0 * D;
        const In* vin = vbase + k0 * Dv;
        const T *kt = nullptr, *vt = nullptr;  // the tiles as T, where the products need them
        if (pairs) {  // block by block; P rounded to bfloat16 pairs as the tiled forward's
          for (int c0 = 0; c0 < cols; c0 += kPairsBlock) {
            const int n = std::min(kPairsBlock, cols - c0);
            scores_pairs(q_in, kin + c0 * D, rows, n, D, P.scale, s, ld, vin + c0 * Dv, Dv);
            for (int64_t g = 0; g < P.G; ++g)
              finish_scores<T>(P, b, hk * P.G + g, 0, static_cast<int>(P.Nq), k0 + c0, n, full,
                               s + g * P.Nq * ld, ld, nullptr);
            online_softmax_tile(s, ld, rows, n, m, l, acc, Dv, T(1), p_pairs.data, ldp);
            // the next block's K and V are fetched during this block's P V
            pv_pairs(p_pairs.data, ldp, vin + c0 * Dv, rows, n, Dv, acc, kin + (c0 + n) * D, D);
          }
          continue;
        }
        if (direct) {
          scores_few_rows_direct(qg, kin, rows, cols, D, P.scale, s, ld);
        } else {
          kt = as_compute<T>(kin, cols, D, kbuf.data);
          vt = as_compute<T>(vin, cols, Dv, vbuf.data);
          if (rows <= kFewRows)
            scores_few_rows(qg, kt, rows, cols, D, P.scale, s, ld);
          else
            stacked_scores(qg, kt, rows, cols, D, P.scale, s, ld);
        }
        for (int64_t g = 0; g < P.G; ++g)
          finish_scores<T>(P, b, hk * P.G + g, 0, static_cast<int>(P.Nq), k0, cols, full,
                           s + g * P.Nq * ld, ld, nullptr);
        online_softmax_tile(s, ld, rows, cols, m, l, acc, Dv);
        if (direct)
          pv_few_rows_direct(s, ld, vin, rows, cols, Dv, acc);
        else if (rows <= kFewRows)
          pv_few_rows(s, ld, vt, rows, cols, Dv, acc);
        else
          stacked_pv(s, ld, vt, rows, cols, Dv, acc);
      }
      if (pairs) pairs_in_column_order(acc, rows, Dv);
    }
    if constexpr (std::is_same_v<T, float>) at::native::cpublas::brgemm_release(false);
  });
  // merge the chunks of every row: weights exp(m_c - M), M the largest chunk max; a NaN chunk
  // (an attended NaN or +inf score, see online_softmax_tile) makes the row NaN
  at::parallel_for(0, groups * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> o(Dv);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t grp = idx / rows, r = idx % rows;
      T M = ninf;
      bool nan_row = false;
      for (int64_t c = 0; c < chunks; ++c) {
        const T mc = part_m[(grp * chunks + c) * rows + r];
        nan_row |= std::isnan(mc);
        M = std::max(M, mc);
      }
      T L = 0;
      std::fill(o.begin(), o.end(), T(0));
      if (!nan_row && M != ninf) {
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t at = (grp * chunks + c) * rows + r;
          if (part_m[at] == ninf) continue;
          const T w = fast_exp(part_m[at] - M);
          L += part_l[at] * w;
          const T* a = part_acc.data() + at * Dv;
          for (int64_t d = 0; d < Dv; ++d) o[d] += a[d] * w;
        }
      }
      // row r of the group is query row r % Nq of head hk G + r / Nq: out is (B, Hq, Nq, Dv)
      // and the group's heads are consecutive, so the group's rows are consecutive too
      const int64_t row = grp * rows + r;
      if (nan_row) {
        std::fill(out + row * Dv, out + (row + 1) * Dv, std::numeric_limits<T>::quiet_NaN());
        lse[row] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const bool seen = L > 0;
      const T inv = seen ? T(1) / L : T(0);
      for (int64_t d = 0; d < Dv; ++d) out[row * Dv + d] = o[d] * inv;
      lse[row] = seen ? M + std::log(L) : std::numeric_limits<T>::infinity();
    }
  });
}

// Gradient buffers of one backward call (dq, dk, dv shaped as q, k, v in the compute type T,
// and the float64 per-run Reductions) handed to kernel(dq, dk, dv, reductions, runs): the kernel
// runs its tasks (b, hk) in `runs` contiguous runs and accumulates run c's reductions into slice
// c of the buffers, which are then added in order.
template <typename T, typename Kernel>
std::vector<at::Tensor> backward_typed(const Problem<T>& P, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& bias, bool bias_grad,
                                       at::TensorList mod_tables, const at::Tensor& table_grad,
                                       Kernel kernel) {
  const int64_t tasks = P.B * P.Hkv;
  bool reduces = bias_grad;
  for (size_t m = 0; m < mod_tables.size(); ++m)
    reduces |= P.mod_kind[m] == kRelative && table_grad.data_ptr<bool>()[m];
  // Without a reduction every task writes its own gradients: one run per task. With one, a run
  // per thread; under torch.use_deterministic_algorithms(True) a fixed number of runs, so that
  // the sums are bitwise the same whatever the thread count.
  int64_t runs = std::max<int64_t>(1, tasks);
  if (reduces) {
    const int64_t wanted = at::globalContext().deterministicAlgorithms()
                               ? kDeterministicRuns
                               : static_cast<int64_t>(at::get_num_threads());
    runs = std::max<int64_t>(1, std::min(tasks, wanted));
  }
  const auto opts = q.options().dtype(c10::CppTypeToScalarType<T>::value);
  const auto f64 = q.options().dtype(at::kDouble);
  at::Tensor dq = at::zeros(q.sizes(), opts), dk = at::zeros(k.sizes(), opts),
             dv = at::zeros(v.sizes(), opts);
  Reductions R;
  at::Tensor dbias_buf;
  if (bias_grad) {
    // bias is (B, Hq, Nq, Nk) expanded from its own shape: broadcast dims have stride 0, so the
    // same strides index a contiguous buffer of the original shape.
    std::vector<int64_t> shape;
    for (int d = 0; d < 4; ++d) shape.push_back(bias.stride(d) == 0 ? 1 : bias.size(d));
    int64_t run = 1;
    for (int d = 3; d >= 0; --d) {
      R.dbias_strides[d] = shape[d] == 1 ? 0 : run;
      run *= shape[d];
    }
    R.dbias_numel = run;
    std::vector<int64_t> buf_shape{runs};
    buf_shape.insert(buf_shape.end(), shape.begin(), shape.end());
    dbias_buf = at::zeros(buf_shape, f64);
    R.dbias = dbias_buf.data_ptr<double>();
  }
  std::vector<at::Tensor> table_bufs;
  for (size_t m = 0; m < mod_tables.size(); ++m) {
    const bool want = P.mod_kind[m] == kRelative && table_grad.data_ptr<bool>()[m];
    std::vector<int64_t> shape{runs};
    for (auto s : mod_tables[m].sizes()) shape.push_back(s);
    table_bufs.push_back(want ? at::zeros(shape, f64) : at::Tensor());
    R.tables.push_back(want ? table_bufs.back().data_ptr<double>() : nullptr);
    R.table_numel.push_back(mod_tables[m].numel());
  }
  kernel(dq.data_ptr<T>(), dk.data_ptr<T>(), dv.data_ptr<T>(), R, runs);
  const at::Tensor none = at::empty({0}, opts);
  std::vector<at::Tensor> result{dq, dk, dv, bias_grad ? sum_in_order(dbias_buf) : none};
  for (auto& t : table_bufs) result.push_back(t.defined() ? sum_in_order(t) : none);
  return result;
}

template <typename T>
std::vector<at::Tensor> backward_typed(const Problem<T>& P, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& gout, const at::Tensor& bias,
                                       bool bias_grad, at::TensorList mod_tables,
                                       const at::Tensor& table_grad) {
  return backward_typed(P, q, k, v, bias, bias_grad, mod_tables, table_grad,
                        [&](T* dq, T* dk, T* dv, const Reductions& R, int64_t runs) {
                          backward_impl(P, out.data_ptr<T>(), lse.data_ptr<T>(),
                                        gout.data_ptr<T>(), dq, dk, dv, R, runs);
                        });
}

// The half path's entries: q, k, v (and gout) in H, everything else as the float32 path.
// Pads D and Dv to even (zero columns change no product), repacks the B operands, runs, and
// returns float32 results cut back to D and Dv.
template <typename H>
struct HalfCall {
  at::Tensor q, kt, v, g, gv, vt, kv, qv;  // keep the repacked operands alive
  HalfOperands<H> X;
  HalfCall(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, int64_t tile_q,
           int64_t tile_kv) {
    TORCH_CHECK(tile_q % 2 == 0 && tile_kv % 2 == 0,
                "qkv cpu kernel: the half-precision path needs even tile sizes, got (", tile_q,
                ", ", tile_kv, ")");
    q = pad_even(q_, 3).contiguous();
    const at::Tensor k = pad_even(k_, 3), vv = pad_even(v_, 3);
    kt = vnni_of_transpose(pad_even(k, 2));  // (B, Hkv, Dp / 2, Nkp, 2)
    v = vnni(pad_even(vv, 2));               // (B, Hkv, Nkp / 2, Dvp, 2)
    X.q = q.data_ptr<H>();
    X.kt = kt.data_ptr<H>();
    X.v = v.data_ptr<H>();
    X.Nqp = q.size(2) + q.size(2) % 2;
    X.Nkp = k.size(2) + k.size(2) % 2;
  }
  void add_backward(const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& gout) {
    const at::Tensor k = pad_even(pad_even(k_, 3), 2), vv = pad_even(pad_even(v_, 3), 2);
    g = pad_even(gout, 3).contiguous();
    gv = vnni(pad_even(g, 2));       // (B, Hq, Nqp / 2, Dvp, 2)
    vt = vnni_of_transpose(vv);      // (B, Hkv, Dvp / 2, Nkp, 2)
    kv = vnni(k);                    // (B, Hkv, Nkp / 2, Dp, 2)
    qv = vnni(pad_even(q, 2));       // (B, Hq, Nqp / 2, Dp, 2)
    X.g = g.data_ptr<H>();
    X.gv = gv.data_ptr<H>();
    X.vt = vt.data_ptr<H>();
    X.kv = kv.data_ptr<H>();
    X.qv = qv.data_ptr<H>();
  }
};

template <typename H>
std::vector<at::Tensor> forward_half_typed(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    const at::Tensor& status, int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo,
    const at::Tensor& row_hi, const at::Tensor& doc_q, const at::Tensor& doc_k,
    const at::Tensor& dense, const at::Tensor& bias, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables,
    bool half_out) {
  HalfCall<H> call(q, k, v, tile_q, tile_kv);
  auto P = make_problem<float>(call.q, pad_even(k, 3), pad_even(v, 3), scale, status, tile_q,
                               tile_kv, row_lo, row_hi, doc_q, doc_k, dense, bias, mod_kind,
                               mod_value, mod_int, mod_tables);
  const auto opts = q.options().dtype(at::kFloat);
  at::Tensor out = at::empty({P.B, P.Hq, P.Nq, P.Dv}, half_out ? q.options() : opts);
  at::Tensor lse = at::empty({P.B, P.Hq, P.Nq}, opts);
  if (half_out)
    forward_half(P, call.X, out.data_ptr<H>(), lse.data_ptr<float>());
  else
    forward_half(P, call.X, out.data_ptr<float>(), lse.data_ptr<float>());
  return {out.narrow(3, 0, v.size(3)).contiguous(), lse};
}

template <typename H>
std::vector<at::Tensor> backward_half_typed(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& gout, double scale, const at::Tensor& status,
    int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo, const at::Tensor& row_hi,
    const at::Tensor& doc_q, const at::Tensor& doc_k, const at::Tensor& dense,
    const at::Tensor& bias, bool bias_grad, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables,
    const at::Tensor& table_grad) {
  TORCH_CHECK(gout.scalar_type() == q.scalar_type() && out.scalar_type() == at::kFloat &&
                  lse.scalar_type() == at::kFloat,
              "qkv cpu kernel: the half path takes gout in the input type, out and lse float32");
  HalfCall<H> call(q, k, v, tile_q, tile_kv);
  call.add_backward(k, v, gout);
  const at::Tensor kp = pad_even(k, 3), vp = pad_even(v, 3);
  auto P = make_problem<float>(call.q, kp, vp, scale, status, tile_q, tile_kv, row_lo, row_hi,
                               doc_q, doc_k, dense, bias, mod_kind, mod_value, mod_int,
                               mod_tables);
  const at::Tensor outp = pad_even(out, 3).contiguous();
  auto grads = backward_typed(
      P, call.q, kp, vp, bias, bias_grad, mod_tables, table_grad,
      [&](float* dq, float* dk, float* dv, const Reductions& R, int64_t runs) {
        backward_half(P, call.X, outp.data_ptr<float>(), lse.data_ptr<float>(), dq, dk, dv, R,
                      runs);
      });
  grads[0] = grads[0].narrow(3, 0, q.size(3));
  grads[1] = grads[1].narrow(3, 0, k.size(3));
  grads[2] = grads[2].narrow(3, 0, v.size(3));
  return grads;
}

bool is_half(const at::Tensor& t) {
  return t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf;
}

// Decoding entry: q, k, v in their own type (float, double, bfloat16, float16), computed in
// float (double for double); out and lse in the compute type.
std::vector<at::Tensor> decode_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    const at::Tensor& status, int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo,
    const at::Tensor& row_hi, const at::Tensor& doc_q, const at::Tensor& doc_k,
    const at::Tensor& dense, const at::Tensor& bias, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables) {
  const bool dbl = q.scalar_type() == at::kDouble;
  const auto opts = q.options().dtype(dbl ? at::kDouble : at::kFloat);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, opts);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, opts);
  if (dbl) {
    auto P = make_problem<double>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                                  doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
    forward_decode<double, double>(P, q.data_ptr<double>(), k.data_ptr<double>(),
                                   v.data_ptr<double>(), KvStrides(k, v), out.data_ptr<double>(),
                                   lse.data_ptr<double>());
    return {out, lse};
  }
  auto P = make_problem<float>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                               doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
  float* o = out.data_ptr<float>();
  float* ls = lse.data_ptr<float>();
  if (q.scalar_type() == at::kBFloat16) {
    forward_decode<float, at::BFloat16>(P, q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(),
                                        v.data_ptr<at::BFloat16>(), KvStrides(k, v), o, ls);
  } else if (q.scalar_type() == at::kHalf) {
    forward_decode<float, at::Half>(P, q.data_ptr<at::Half>(), k.data_ptr<at::Half>(),
                                    v.data_ptr<at::Half>(), KvStrides(k, v), o, ls);
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "qkv cpu kernel: unsupported dtype ",
                q.scalar_type());
    forward_decode<float, float>(P, q.data_ptr<float>(), k.data_ptr<float>(),
                                 v.data_ptr<float>(), KvStrides(k, v), o, ls);
  }
  return {out, lse};
}

std::vector<at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in, double scale,
    const at::Tensor& status, int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo,
    const at::Tensor& row_hi, const at::Tensor& doc_q, const at::Tensor& doc_k,
    const at::Tensor& dense, const at::Tensor& bias, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables,
    bool half_out) {
  // decoding in every dtype: the half GEMM path would repack all of K and V for a few rows
  if (status.size(0) == 1 && q.size(2) <= kDecodeRows) {
    return decode_forward(q, rows_contiguous(k_in), rows_contiguous(v_in), scale, status, tile_q,
                          tile_kv, row_lo, row_hi, doc_q, doc_k, dense, bias, mod_kind, mod_value,
                          mod_int, mod_tables);
  }
  // the tiled routes index (B, H, N, D) densely
  const at::Tensor k = k_in.contiguous(), v = v_in.contiguous();
  if (is_half(q)) {
    auto run = q.scalar_type() == at::kBFloat16 ? forward_half_typed<at::BFloat16>
                                                : forward_half_typed<at::Half>;
    return run(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q, doc_k, dense,
               bias, mod_kind, mod_value, mod_int, mod_tables, half_out);
  }
  const auto opts = q.options();
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, opts);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, opts);
  if (q.scalar_type() == at::kDouble) {
    auto P = make_problem<double>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                                  doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
    forward_impl(P, out.data_ptr<double>(), lse.data_ptr<double>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "qkv cpu kernel: float32 or float64 expected");
    auto P = make_problem<float>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                                 doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
    forward_impl(P, out.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& gout, double scale, const at::Tensor& status,
    int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo, const at::Tensor& row_hi,
    const at::Tensor& doc_q, const at::Tensor& doc_k, const at::Tensor& dense,
    const at::Tensor& bias, bool bias_grad, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables,
    const at::Tensor& table_grad) {
  if (is_half(q)) {
    auto run = q.scalar_type() == at::kBFloat16 ? backward_half_typed<at::BFloat16>
                                                : backward_half_typed<at::Half>;
    return run(q, k, v, out, lse, gout, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
               doc_k, dense, bias, bias_grad, mod_kind, mod_value, mod_int, mod_tables,
               table_grad);
  }
  if (q.scalar_type() == at::kDouble) {
    auto P = make_problem<double>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                                  doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
    return backward_typed(P, q, k, v, out, lse, gout, bias, bias_grad, mod_tables, table_grad);
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat, "qkv cpu kernel: float32 or float64 expected");
  auto P = make_problem<float>(q, k, v, scale, status, tile_q, tile_kv, row_lo, row_hi, doc_q,
                               doc_k, dense, bias, mod_kind, mod_value, mod_int, mod_tables);
  return backward_typed(P, q, k, v, out, lse, gout, bias, bias_grad, mod_tables, table_grad);
}

// Whether bfloat16 decoding runs on AVX512-BF16 dot products (else it widens to float).
bool bfloat16_dot_decoding() { return pairs_fit<at::BFloat16>(32, 32); }

}  // namespace

TORCH_LIBRARY(qkv_cpu, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, float scale, Tensor status, int tile_q, "
      "int tile_kv, Tensor row_lo, Tensor row_hi, Tensor doc_q, Tensor doc_k, Tensor dense, "
      "Tensor bias, Tensor mod_kind, Tensor mod_value, Tensor mod_int, Tensor[] mod_tables, "
      "bool half_out=False) -> Tensor[]",
      &attention_forward);
  m.def(
      "backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor gout, float scale, "
      "Tensor status, int tile_q, int tile_kv, Tensor row_lo, Tensor row_hi, Tensor doc_q, "
      "Tensor doc_k, Tensor dense, Tensor bias, bool bias_grad, Tensor mod_kind, "
      "Tensor mod_value, Tensor mod_int, Tensor[] mod_tables, Tensor table_grad) -> Tensor[]",
      &attention_backward);
  m.def("half_gemm_status(str dtype) -> str", &half_gemm_status);
  m.def("bfloat16_dot_decoding() -> bool", &bfloat16_dot_decoding);
}
