// Fused tiled attention on the CPU: scores, mask, score modifiers, online softmax and P V per
// tile, in cache, parallel over (batch, head, query tile); backward recomputes the tiles
// (FlashAttention-2, Algorithms 1 and 2). Compiled on first use by qkv/backends/cpu/build.py.
//
// Layout: q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv), all contiguous, in the
// compute type (float or double; half inputs arrive as float). Query head h reads key/value
// head h / G (grouped heads without copies). The tile grid is `status` (nQ, nK) int8:
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
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
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
void exp_row(T* __restrict s, int n, T shift) {
  // A masked (-inf) score is 0 even in a NaN row (shift NaN): its key gets no NaN gradient.
  constexpr T ninf = -std::numeric_limits<T>::infinity();
#pragma omp simd
  for (int c = 0; c < n; ++c) s[c] = s[c] == ninf ? T(0) : fast_exp(s[c] - shift);
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
  bool modifies() const { return bias != nullptr || !mod_kind.empty(); }
};

// Scores of query rows [q0, q0 + rows) of head (b, h) against keys [k0, k0 + cols), into s
// (row stride ld), with bias and modifiers; `derivs[m]` receives d out / d in of each softcap.
template <typename T>
void scores_tile(const Problem<T>& P, int64_t b, int64_t h, int64_t q0, int rows, int64_t k0,
                 int cols, bool full, T* s, int ld, const std::vector<T*>* derivs) {
  const int64_t hk = h / P.G;
  const T* qp = P.q + ((b * P.Hq + h) * P.Nq + q0) * P.D;
  const T* kp = P.k + ((b * P.Hkv + hk) * P.Nk + k0) * P.D;
  const int D = static_cast<int>(P.D);
  gemm<T>(true, false, cols, rows, D, P.scale, kp, D, qp, D, T(0), s, ld);
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
  P.q = q.data_ptr<T>(); P.k = k.data_ptr<T>(); P.v = v.data_ptr<T>();
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

template <typename T>
void forward_impl(const Problem<T>& P, T* out, T* lse) {
  const int64_t tasks = P.B * P.Hq * P.nQ;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s_buf(P.tq * P.tk), acc_buf(P.tq * P.Dv);
    T* const s = s_buf.data;
    T* const acc = acc_buf.data;
    std::vector<T> m(P.tq), l(P.tq);
    const int ld = static_cast<int>(P.tk), Dv = static_cast<int>(P.Dv);
    constexpr T ninf = -std::numeric_limits<T>::infinity();
    constexpr T inf = std::numeric_limits<T>::infinity();
    constexpr T nan = std::numeric_limits<T>::quiet_NaN();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task % P.nQ, bh = task / P.nQ, b = bh / P.Hq, h = bh % P.Hq;
      const int64_t q0 = i * P.tq;
      const int rows = static_cast<int>(std::min(P.tq, P.Nq - q0));
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(acc, acc + P.tq * P.Dv, T(0));
      const T* vbase = P.v + (b * P.Hkv + h / P.G) * P.Nk * P.Dv;
      for (const auto& [j, full] : visits_of(P, i)) {
        const int64_t k0 = j * P.tk;
        const int cols = static_cast<int>(std::min(P.tk, P.Nk - k0));
        scores_tile<T>(P, b, h, q0, rows, k0, cols, full, s, ld, nullptr);
        for (int r = 0; r < rows; ++r) {
          T* row = s + static_cast<int64_t>(r) * ld;
          const T tile_max = max_row(row, cols);
          // An attended NaN or +inf score makes the row NaN (as exp(inf - inf) does in the
          // formula); once NaN, the row stays NaN and its tiles add nothing.
          if (std::isnan(m[r]) || std::isnan(tile_max) || tile_max == inf) {
            m[r] = nan;
            l[r] = nan;
            std::fill(row, row + cols, T(0));
            continue;
          }
          const T new_max = std::max(m[r], tile_max);
          if (new_max == ninf) {  // nothing attended yet: this tile adds nothing
            std::fill(row, row + cols, T(0));
            continue;
          }
          const T rescale = m[r] == ninf ? T(0) : fast_exp(m[r] - new_max);
          l[r] = l[r] * rescale + exp_sum_row(row, cols, new_max);
          m[r] = new_max;
          if (rescale != T(1)) {
            T* a = acc + static_cast<int64_t>(r) * Dv;
            for (int c = 0; c < Dv; ++c) a[c] *= rescale;
          }
        }
        gemm<T>(false, false, Dv, rows, cols, T(1), vbase + k0 * P.Dv, Dv, s, ld, T(1), acc, Dv);
      }
      T* o = out + (bh * P.Nq + q0) * P.Dv;
      T* ls = lse + bh * P.Nq + q0;
      for (int r = 0; r < rows; ++r) {
        if (std::isnan(l[r])) {
          std::fill(o + r * Dv, o + (r + 1) * Dv, nan);
          ls[r] = nan;
          continue;
        }
        const bool seen = l[r] > 0;
        const T inv = seen ? T(1) / l[r] : T(0);
        for (int c = 0; c < Dv; ++c) o[r * Dv + c] = acc[r * Dv + c] * inv;
        ls[r] = seen ? m[r] + std::log(l[r]) : std::numeric_limits<T>::infinity();
      }
    }
  });
}

// Backward runs the tasks (b, hk) in `chunks` contiguous runs, each run by one thread in order;
// a bias or relative table gradient is accumulated per run (in float64) and the runs are added
// in order afterwards, so the result depends on the number of runs, never on the threads.
template <typename T>
void backward_impl(const Problem<T>& P, const T* out, const T* lse, const T* gout, T* dq, T* dk,
                   T* dv, double* dbias_buf, int64_t dbias_numel, const int64_t* dbias_strides,
                   std::vector<double*>& dtable_bufs, const std::vector<int64_t>& table_numel,
                   int64_t chunks) {
  const int64_t tasks = P.B * P.Hkv;
  const int D = static_cast<int>(P.D), Dv = static_cast<int>(P.Dv), ld = static_cast<int>(P.tk);
  int n_soft = 0;
  for (int kind : P.mod_kind) n_soft += kind == kSoftcap;
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    Scratch<T> s_buf(P.tq * P.tk), dp_buf(P.tq * P.tk);
    T* const s = s_buf.data;
    T* const dp = dp_buf.data;
    std::vector<T> delta(P.tq);
    std::vector<Scratch<T>> deriv_store;
    std::vector<T*> derivs;
    for (int n = 0; n < n_soft; ++n) {
      deriv_store.emplace_back(P.tq * P.tk);
      derivs.push_back(deriv_store.back().data);
    }
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t task_begin = chunk * tasks / chunks, task_end = (chunk + 1) * tasks / chunks;
      for (int64_t task = task_begin; task < task_end; ++task) {
        const int64_t b = task / P.Hkv, hk = task % P.Hkv;
        const T* kbase = P.k + (b * P.Hkv + hk) * P.Nk * P.D;
        const T* vbase = P.v + (b * P.Hkv + hk) * P.Nk * P.Dv;
        T* dkbase = dk + (b * P.Hkv + hk) * P.Nk * P.D;
        T* dvbase = dv + (b * P.Hkv + hk) * P.Nk * P.Dv;
        for (int64_t g = 0; g < P.G; ++g) {
          const int64_t h = hk * P.G + g, bh = b * P.Hq + h;
          for (int64_t i = 0; i < P.nQ; ++i) {
            const int64_t q0 = i * P.tq;
            const int rows = static_cast<int>(std::min(P.tq, P.Nq - q0));
            const T* qp = P.q + (bh * P.Nq + q0) * P.D;
            const T* op = out + (bh * P.Nq + q0) * P.Dv;
            const T* gp = gout + (bh * P.Nq + q0) * P.Dv;
            const T* lp = lse + bh * P.Nq + q0;
            T* dqp = dq + (bh * P.Nq + q0) * P.D;
            for (int r = 0; r < rows; ++r) {
              T acc = 0;
              for (int c = 0; c < Dv; ++c) acc += gp[r * Dv + c] * op[r * Dv + c];
              delta[r] = acc;
            }
            for (const auto& [j, full] : visits_of(P, i)) {
              const int64_t k0 = j * P.tk;
              const int cols = static_cast<int>(std::min(P.tk, P.Nk - k0));
              scores_tile<T>(P, b, h, q0, rows, k0, cols, full, s, ld, n_soft ? &derivs : nullptr);
              for (int r = 0; r < rows; ++r) exp_row(s + r * ld, cols, lp[r]);
              // dV += P^T dO ; dP = dO V^T
              gemm<T>(false, true, Dv, cols, rows, T(1), gp, Dv, s, ld, T(1), dvbase + k0 * P.Dv,
                      Dv);
              gemm<T>(true, false, cols, rows, Dv, T(1), vbase + k0 * P.Dv, Dv, gp, Dv, T(0), dp,
                      ld);
              for (int r = 0; r < rows; ++r) {
                T* pr = s + r * ld;
                const T* dpr = dp + r * ld;
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
                    T* pr = s + r * ld;
                    const T* d = derivs[soft] + r * ld;
                    for (int c = 0; c < cols; ++c) pr[c] *= d[c];
                  }
                } else if (kind == kRelative && dtable_bufs[m]) {
                  const int64_t M = P.mod_maxd[m];
                  double* tab = dtable_bufs[m] + chunk * table_numel[m] + h * (2 * M + 1);
                  for (int r = 0; r < rows; ++r) {
                    const T* pr = s + r * ld;
                    const int64_t base = k0 - (q0 + r) - P.mod_offset[m];
                    const int c_lo = static_cast<int>(std::clamp<int64_t>(-M - base, 0, cols));
                    const int c_hi = static_cast<int>(std::clamp<int64_t>(M - base + 1, c_lo, cols));
                    double edge_lo = 0, edge_hi = 0;
                    for (int c = 0; c < c_lo; ++c) edge_lo += pr[c];
                    for (int c = c_hi; c < cols; ++c) edge_hi += pr[c];
                    tab[0] += edge_lo;
                    tab[2 * M] += edge_hi;
                    double* run = tab + (base + M + c_lo);  // one bucket per column in this run
  #pragma omp simd
                    for (int c = c_lo; c < c_hi; ++c) run[c - c_lo] += pr[c];
                  }
                }
              }
              if (dbias_buf) {
                double* db = dbias_buf + chunk * dbias_numel;
                for (int r = 0; r < rows; ++r) {
                  const T* pr = s + r * ld;
                  double* row = db + b * dbias_strides[0] + h * dbias_strides[1] +
                           (q0 + r) * dbias_strides[2] + k0 * dbias_strides[3];
                  for (int c = 0; c < cols; ++c) row[c * dbias_strides[3]] += pr[c];
                }
              }
              // dQ += scale dS K ; dK += scale dS^T Q
              gemm<T>(false, false, D, rows, cols, P.scale, kbase + k0 * P.D, D, s, ld, T(1), dqp,
                      D);
              gemm<T>(false, true, D, cols, rows, P.scale, qp, D, s, ld, T(1), dkbase + k0 * P.D,
                      D);
            }
          }
        }
      }
    }
  });
}

// Sum of buf (chunks, ...) over its first dim, in order (bitwise the same on every run).
at::Tensor sum_in_order(const at::Tensor& buf) {
  at::Tensor total = buf.select(0, 0).clone();
  for (int64_t c = 1; c < buf.size(0); ++c) total.add_(buf.select(0, c));
  return total;
}

std::vector<at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    const at::Tensor& status, int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo,
    const at::Tensor& row_hi, const at::Tensor& doc_q, const at::Tensor& doc_k,
    const at::Tensor& dense, const at::Tensor& bias, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables) {
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

template <typename T>
std::vector<at::Tensor> backward_typed(const Problem<T>& P, const at::Tensor& q,
                                       const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& out, const at::Tensor& lse,
                                       const at::Tensor& gout, const at::Tensor& bias,
                                       bool bias_grad, at::TensorList mod_tables,
                                       const at::Tensor& table_grad) {
  const int64_t tasks = P.B * P.Hkv;
  bool reduces = bias_grad;
  for (size_t m = 0; m < mod_tables.size(); ++m)
    reduces |= P.mod_kind[m] == kRelative && table_grad.data_ptr<bool>()[m];
  // Without a reduction every task writes its own gradients: one run per task. With one, a run
  // per thread; under torch.use_deterministic_algorithms(True) a fixed number of runs, so that
  // the sums are bitwise the same whatever the thread count.
  int64_t chunks = tasks;
  if (reduces) {
    const int64_t runs = at::globalContext().deterministicAlgorithms()
                             ? kDeterministicRuns
                             : static_cast<int64_t>(at::get_num_threads());
    chunks = std::max<int64_t>(1, std::min(tasks, runs));
  }
  const auto f64 = q.options().dtype(at::kDouble);
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  at::Tensor dbias_buf;
  int64_t strides[4] = {0, 0, 0, 0};
  int64_t numel = 0;
  if (bias_grad) {
    // bias is (B, Hq, Nq, Nk) expanded from its own shape: broadcast dims have stride 0, so the
    // same strides index a contiguous buffer of the original shape.
    std::vector<int64_t> shape;
    for (int d = 0; d < 4; ++d) shape.push_back(bias.stride(d) == 0 ? 1 : bias.size(d));
    int64_t run = 1;
    for (int d = 3; d >= 0; --d) {
      strides[d] = shape[d] == 1 ? 0 : run;
      run *= shape[d];
    }
    numel = run;
    std::vector<int64_t> buf_shape{chunks};
    buf_shape.insert(buf_shape.end(), shape.begin(), shape.end());
    dbias_buf = at::zeros(buf_shape, f64);
  }
  std::vector<at::Tensor> table_bufs;
  std::vector<double*> table_ptrs;
  std::vector<int64_t> table_numel;
  for (size_t m = 0; m < mod_tables.size(); ++m) {
    const bool want = P.mod_kind[m] == kRelative && table_grad.data_ptr<bool>()[m];
    std::vector<int64_t> shape{chunks};
    for (auto s : mod_tables[m].sizes()) shape.push_back(s);
    table_bufs.push_back(want ? at::zeros(shape, f64) : at::Tensor());
    table_ptrs.push_back(want ? table_bufs.back().data_ptr<double>() : nullptr);
    table_numel.push_back(mod_tables[m].numel());
  }
  backward_impl(P, out.data_ptr<T>(), lse.data_ptr<T>(), gout.data_ptr<T>(), dq.data_ptr<T>(),
                dk.data_ptr<T>(), dv.data_ptr<T>(),
                bias_grad ? dbias_buf.data_ptr<double>() : nullptr, numel, strides, table_ptrs,
                table_numel, chunks);
  const at::Tensor none = at::empty({0}, q.options());
  std::vector<at::Tensor> result{dq, dk, dv, bias_grad ? sum_in_order(dbias_buf) : none};
  for (auto& t : table_bufs) result.push_back(t.defined() ? sum_in_order(t) : none);
  return result;
}

std::vector<at::Tensor> attention_backward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& gout, double scale, const at::Tensor& status,
    int64_t tile_q, int64_t tile_kv, const at::Tensor& row_lo, const at::Tensor& row_hi,
    const at::Tensor& doc_q, const at::Tensor& doc_k, const at::Tensor& dense,
    const at::Tensor& bias, bool bias_grad, const at::Tensor& mod_kind,
    const at::Tensor& mod_value, const at::Tensor& mod_int, at::TensorList mod_tables,
    const at::Tensor& table_grad) {
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

}  // namespace

TORCH_LIBRARY(qkv_cpu, m) {
  m.def(
      "forward(Tensor q, Tensor k, Tensor v, float scale, Tensor status, int tile_q, "
      "int tile_kv, Tensor row_lo, Tensor row_hi, Tensor doc_q, Tensor doc_k, Tensor dense, "
      "Tensor bias, Tensor mod_kind, Tensor mod_value, Tensor mod_int, Tensor[] mod_tables) "
      "-> Tensor[]",
      &attention_forward);
  m.def(
      "backward(Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor gout, float scale, "
      "Tensor status, int tile_q, int tile_kv, Tensor row_lo, Tensor row_hi, Tensor doc_q, "
      "Tensor doc_k, Tensor dense, Tensor bias, bool bias_grad, Tensor mod_kind, "
      "Tensor mod_value, Tensor mod_int, Tensor[] mod_tables, Tensor table_grad) -> Tensor[]",
      &attention_backward);
}
