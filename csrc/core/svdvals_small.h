// Singular values of one small dense matrix, computed by a thread group (csrc/core/group.h).
//
// Algorithm (values only; see docs/architecture.md for why):
//   1. load the matrix scaled by 1/max|a_ij| into a column-major workspace with rows >= cols
//      (sigma(A) = sigma(A^T)), so sums of squares neither overflow nor underflow;
//   2. Householder bidiagonalization, A = Q B P^T, B upper bidiagonal with diagonal d and superdiagonal e
//      (~4mn^2 - 4n^3/3 flops, backward stable: no squaring of the condition number as in Gram + eig);
//   3. every singular value of B by bisection on the Golub-Kahan matrix
//      TGK = tridiag(0; d0, e0, d1, e1, ..., d_{n-1}; 0), whose eigenvalues are +-sigma_i: a Sturm count
//      of TGK - x tells how many sigma_i are below x. Each thread bisects its own sigma_i, so this phase is
//      as parallel as the group, takes a fixed number of steps (no convergence loop that could hang on
//      NaN) and is accurate to about eps * sigma_max absolutely, which covers rank-deficient and graded
//      spectra where Gram-based methods lose ~sqrt(eps) * sigma_max.
#pragma once

#include <algorithm>
#include <limits>

#include "core/group.h"

namespace rankprune {

// Compute type for a storage type: float for half/bfloat16/float, double for double.
template <typename scalar_t>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

// Bisection steps: each halves the interval [0, bound], bound <= 2 * sigma_max (Gershgorin on TGK), so the
// absolute error ends below 2^(1 - steps) * sigma_max: 28 steps give 7e-9 * sigma_max in float32, under the
// eps * sigma_max that the bidiagonalization itself leaves.
template <typename T>
struct BisectionSteps;
template <>
struct BisectionSteps<float> {
  static constexpr int value = 28;
};
template <>
struct BisectionSteps<double> {
  static constexpr int value = 58;
};

// A logical rows x cols matrix (rows >= cols) at `base` with element (i, j) at base[i * row_stride + j * col_stride].
struct MatrixRef {
  int64_t rows, cols, row_stride, col_stride;
};

// Orientation of an m x n matrix with strides (sm, sn) so that rows >= cols; for square matrices the
// orientation whose row index walks memory with the smaller stride, so that loads coalesce.
RP_HD MatrixRef orient(int64_t m, int64_t n, int64_t sm, int64_t sn) {
  const int64_t asm_ = sm < 0 ? -sm : sm, asn = sn < 0 ? -sn : sn;
  const bool transpose = (m < n) || (m == n && asn < asm_);
  return transpose ? MatrixRef{n, m, sn, sm} : MatrixRef{m, n, sm, sn};
}

// Sizes of the per-matrix workspace in units of T: the column-major matrix (leading dimension lda),
// then d[cols], e[cols], sigma[cols], w[rows].
RP_HD int64_t workspace_lda(int64_t rows) { return rows | 1; }  // odd: column walks hit distinct smem banks
RP_HD int64_t workspace_size(const MatrixRef& a) { return workspace_lda(a.rows) * a.cols + 3 * a.cols + a.rows; }

// What happened while loading: the scale applied, or that the matrix is zero / not finite.
enum class LoadStatus { Ok, Zero, NonFinite };

template <typename T, typename scalar_t, typename G>
RP_HD LoadStatus load_scaled(const G& g, const scalar_t* base, const MatrixRef& ref, T* a, int64_t lda, T& scale) {
  const int64_t total = ref.rows * ref.cols;
  T amax = T(0);
  for (int64_t idx = g.rank(); idx < total; idx += g.size()) {
    const int64_t i = idx % ref.rows, j = idx / ref.rows;
    const T v = static_cast<T>(base[i * ref.row_stride + j * ref.col_stride]);
    a[i + j * lda] = v;
    // Any NaN or Inf forces the maximum to +inf (fmax alone would drop a NaN).
    const T av = (v == v && v - v == T(0)) ? (v < T(0) ? -v : v) : std::numeric_limits<T>::infinity();
    amax = av > amax ? av : amax;
  }
  amax = g.max(amax);  // barrier: the whole matrix is loaded
  if (!(amax < std::numeric_limits<T>::infinity())) return LoadStatus::NonFinite;
  if (amax == T(0)) return LoadStatus::Zero;
  scale = amax;
  const T inv = T(1) / amax;
  for (int64_t idx = g.rank(); idx < total; idx += g.size()) {
    const int64_t i = idx % ref.rows, j = idx / ref.rows;
    a[i + j * lda] *= inv;
  }
  g.sync();
  return LoadStatus::Ok;
}

// The same for one CPU thread, column by column: no index division per element (it was a quarter of the
// time of a 576 x 40 Householder QR, measured).
template <typename T, typename scalar_t>
inline LoadStatus load_scaled(const SerialGroup&, const scalar_t* base, const MatrixRef& ref, T* a, int64_t lda,
                              T& scale) {
  T amax = T(0);
  bool finite = true;
  for (int64_t j = 0; j < ref.cols; ++j) {
    const scalar_t* col = base + j * ref.col_stride;
    T* aj = a + j * lda;
    for (int64_t i = 0; i < ref.rows; ++i) {
      const T v = static_cast<T>(col[i * ref.row_stride]);
      aj[i] = v;
      finite &= (v - v == T(0));  // false for NaN and +-Inf
      const T av = v < T(0) ? -v : v;
      amax = av > amax ? av : amax;
    }
  }
  if (!finite) return LoadStatus::NonFinite;
  if (amax == T(0)) return LoadStatus::Zero;
  scale = amax;
  const T inv = T(1) / amax;
  for (int64_t j = 0; j < ref.cols; ++j)
    for (int64_t i = 0; i < ref.rows; ++i) a[i + j * lda] *= inv;
  return LoadStatus::Ok;
}

// x . y with four partial sums (instruction-level parallelism on both CPU and GPU).
template <typename T>
RP_HD T dot(const T* x, const T* y, int64_t len) {
  T s0 = T(0), s1 = T(0), s2 = T(0), s3 = T(0);
  int64_t i = 0;
  for (; i + 4 <= len; i += 4) {
    s0 += x[i] * y[i];
    s1 += x[i + 1] * y[i + 1];
    s2 += x[i + 2] * y[i + 2];
    s3 += x[i + 3] * y[i + 3];
  }
  for (; i < len; ++i) s0 += x[i] * y[i];
  return (s0 + s1) + (s2 + s3);
}

// Rows i > k of `a` times the reflector I - c u u^T from the right, u = (u0, a[k, k+2:]) on columns k+1..n-1.
// Each thread owns whole rows (consecutive threads touch consecutive addresses of a column).
template <typename T, typename G>
RP_HD void apply_right_reflector(const G& g, T* a, int64_t lda, int64_t m, int64_t n, int64_t k, T u0, T c, T*) {
  for (int64_t i = k + 1 + g.rank(); i < m; i += g.size()) {
    T w = u0 * a[i + (k + 1) * lda];
    for (int64_t j = k + 2; j < n; ++j) w += a[k + j * lda] * a[i + j * lda];
    w *= c;
    a[i + (k + 1) * lda] -= w * u0;
    for (int64_t j = k + 2; j < n; ++j) a[i + j * lda] -= w * a[k + j * lda];
  }
}

// The same products for one CPU thread, loops interchanged so that the inner loops run down contiguous
// columns (they vectorize); w (m values) holds the row products.
template <typename T>
inline void apply_right_reflector(const SerialGroup&, T* a, int64_t lda, int64_t m, int64_t n, int64_t k, T u0, T c,
                                  T* w) {
  for (int64_t i = k + 1; i < m; ++i) w[i] = u0 * a[i + (k + 1) * lda];
  for (int64_t j = k + 2; j < n; ++j) {
    const T uj = a[k + j * lda];
    const T* aj = a + j * lda;
    for (int64_t i = k + 1; i < m; ++i) w[i] += uj * aj[i];
  }
  for (int64_t i = k + 1; i < m; ++i) w[i] *= c;
  for (int64_t j = k + 1; j < n; ++j) {
    const T uj = j == k + 1 ? u0 : a[k + j * lda];
    T* aj = a + j * lda;
    for (int64_t i = k + 1; i < m; ++i) aj[i] -= w[i] * uj;
  }
}

// Householder bidiagonalization of the column-major m x n workspace (m >= n). Writes |d| and |e|
// (e[n-1] = 0); the singular values of the bidiagonal equal those of the matrix. Overwrites `a`;
// w is scratch for m values.
template <typename T, typename G>
RP_HD void bidiagonalize(const G& g, T* a, int64_t lda, int64_t m, int64_t n, T* d, T* e, T* w) {
  using std::sqrt;
  // The matrix is scaled so that max |a_ij| = 1, hence ||A|| >= 1. A remaining column (row) whose squared norm
  // is below eps^2 is treated as zero, a perturbation below eps * ||A||. Without this floor, a reflector built
  // from rounding residue (sparse post-ReLU maps leave many) divides by a sum of squares that has underflowed:
  // the reflector is no longer orthogonal, or c overflows to inf.
  const T negligible = std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon();
  for (int64_t k = 0; k < n; ++k) {
    // Left reflector H = I - c v v^T zeroing a[k+1:, k]; v = (alpha - beta, a[k+1:, k]).
    T part = T(0);
    for (int64_t i = k + g.rank(); i < m; i += g.size()) part += a[i + k * lda] * a[i + k * lda];
    const T s = g.sum(part);
    const T alpha = a[k + k * lda];
    const T beta = s > negligible ? (alpha >= T(0) ? -sqrt(s) : sqrt(s)) : T(0);
    if (g.rank() == 0) d[k] = beta < T(0) ? -beta : beta;
    if (beta != T(0)) {
      const T v0 = alpha - beta, c = T(1) / (beta * (beta - alpha));
      // Each thread owns whole columns j > k: dot with v, then the rank-1 update of that column.
      for (int64_t j = k + 1 + g.rank(); j < n; j += g.size()) {
        T* aj = a + j * lda;
        const T* ak = a + k * lda;
        const T w = c * (v0 * aj[k] + dot(ak + k + 1, aj + k + 1, m - k - 1));
        aj[k] -= w * v0;
        for (int64_t i = k + 1; i < m; ++i) aj[i] -= w * ak[i];
      }
    }
    g.sync();
    if (k + 1 >= n) {
      if (g.rank() == 0) e[k] = T(0);
      break;
    }
    // Right reflector zeroing a[k, k+2:]; u = (alpha - beta, a[k, k+2:]).
    part = T(0);
    for (int64_t j = k + 1 + g.rank(); j < n; j += g.size()) part += a[k + j * lda] * a[k + j * lda];
    const T s2 = g.sum(part);
    const T alpha2 = a[k + (k + 1) * lda];
    const T beta2 = s2 > negligible ? (alpha2 >= T(0) ? -sqrt(s2) : sqrt(s2)) : T(0);
    if (g.rank() == 0) e[k] = beta2 < T(0) ? -beta2 : beta2;
    if (beta2 != T(0)) {
      apply_right_reflector(g, a, lda, m, n, k, alpha2 - beta2, T(1) / (beta2 * (beta2 - alpha2)), w);
    }
    g.sync();
  }
  g.sync();  // d and e are complete
}

// Number of singular values of the bidiagonal (d, e) strictly below x > 0: the Sturm count of
// TGK - x minus n (TGK has n eigenvalues -sigma_i < x).
template <typename T>
RP_HD int64_t count_below(const T* d, const T* e, int64_t n, T x, T pivmin) {
  int64_t neg = 0;
  T q = -x;
  neg += q < T(0);
  for (int64_t k = 0; k < n; ++k) {
    // off-diagonals alternate d[k], e[k]; the last one is d[n-1]
    q = -x - (d[k] * d[k]) / q;
    if ((q < T(0) ? -q : q) < pivmin) q = -pivmin;
    neg += q < T(0);
    if (k + 1 < n) {
      q = -x - (e[k] * e[k]) / q;
      if ((q < T(0) ? -q : q) < pivmin) q = -pivmin;
      neg += q < T(0);
    }
  }
  return neg - n;
}

// Interval [0, bound] holding every singular value of the bidiagonal, and the pivot floor of the Sturm count.
template <typename T>
RP_HD void bisection_setup(const T* d, const T* e, int64_t n, T& bound, T& pivmin) {
  T maxsq = T(1);
  bound = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T left = k > 0 ? e[k - 1] : T(0);
    bound = d[k] + left > bound ? d[k] + left : bound;
    bound = d[k] + e[k] > bound ? d[k] + e[k] : bound;
    maxsq = d[k] * d[k] > maxsq ? d[k] * d[k] : maxsq;
    maxsq = e[k] * e[k] > maxsq ? e[k] * e[k] : maxsq;
  }
  bound *= T(1) + T(8) * std::numeric_limits<T>::epsilon();
  pivmin = std::numeric_limits<T>::min() * maxsq;
}

// sigma[i] (descending) of the bidiagonal (d, e) for the indices this thread owns.
template <typename T, typename G>
RP_HD void bidiagonal_svdvals(const G& g, const T* d, const T* e, int64_t n, T* sigma) {
  T bound, pivmin;
  bisection_setup(d, e, n, bound, pivmin);
  for (int64_t i = g.rank(); i < n; i += g.size()) {
    const int64_t target = n - 1 - i;  // ascending index of sigma[i]
    T lo = T(0), hi = bound;
    for (int step = 0; step < BisectionSteps<T>::value; ++step) {
      const T mid = T(0.5) * (lo + hi);
      if (count_below(d, e, n, mid, pivmin) > target)
        hi = mid;
      else
        lo = mid;
    }
    // lo stays exactly 0 for a zero singular value.
    sigma[i] = lo == T(0) ? T(0) : T(0.5) * (lo + hi);
  }
}

// The serial (CPU) group bisects values in lockstep: the same operations per value as above, written on
// GCC/Clang vector types (kLanes lanes, up to kChains independent vectors interleaved) so that they run as
// SIMD and the division latency of one chain hides behind the others.
template <int kLanes, typename T>
inline void bisect_lockstep(const T* d, const T* e, int64_t n, T* sigma) {
  constexpr int kChains = 4;
  typedef T V __attribute__((vector_size(kLanes * sizeof(T))));
  // Comparison masks (all bits set where true); selections are bitwise so that any x86-64 level does them.
  typedef decltype(V{} < V{}) M;
  T bound, pivmin;
  bisection_setup(d, e, n, bound, pivmin);
  V lane_index;
  for (int l = 0; l < kLanes; ++l) lane_index[l] = T(l);
  const V zero = V{}, one = zero + T(1), neg_pivmin = zero - pivmin;
  for (int64_t i0 = 0; i0 < n; i0 += kLanes * kChains) {
    // Bisection for value i (descending) moves hi down while more than n - 1 - i values lie below mid.
    const int chains = static_cast<int>(std::min<int64_t>(kChains, (n - i0 + kLanes - 1) / kLanes));
    V target[kChains], lo[kChains], hi[kChains], mid[kChains], q[kChains], below[kChains];
    for (int c = 0; c < kChains; ++c) {
      target[c] = T(n - 1 - i0 - c * kLanes) - lane_index;
      lo[c] = zero;
      hi[c] = zero + bound;
    }
    for (int step = 0; step < BisectionSteps<T>::value; ++step) {
      for (int c = 0; c < kChains; ++c) {
        mid[c] = T(0.5) * (lo[c] + hi[c]);
        q[c] = -mid[c];
        below[c] = one - T(n);  // the first pivot, -mid, is negative
      }
      for (int64_t k = 0; k < 2 * n - 1; ++k) {
        const T b = (k & 1) ? e[k >> 1] : d[k >> 1];
        const T b2 = b * b;
        for (int c = 0; c < kChains; ++c) {
          if (c >= chains) break;
          V t = -mid[c] - b2 / q[c];
          const M tiny = (t < pivmin) & (t > -pivmin);
          t = V((M(neg_pivmin) & tiny) | (M(t) & ~tiny));
          q[c] = t;
          below[c] += V(M(one) & (t < T(0)));
        }
      }
      for (int c = 0; c < chains; ++c) {
        const M go_down = below[c] > target[c];
        hi[c] = V((M(mid[c]) & go_down) | (M(hi[c]) & ~go_down));
        lo[c] = V((M(lo[c]) & go_down) | (M(mid[c]) & ~go_down));
      }
    }
    for (int c = 0; c < chains; ++c) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t i = i0 + c * kLanes + l;
        if (i < n) sigma[i] = lo[c][l] == T(0) ? T(0) : T(0.5) * (lo[c][l] + hi[c][l]);
      }
    }
  }
}

template <typename T>
inline void bidiagonal_svdvals(const SerialGroup&, const T* d, const T* e, int64_t n, T* sigma) {
  // Narrow vectors for small matrices so that several chains still interleave.
  if (n <= 16)
    bisect_lockstep<4>(d, e, n, sigma);
  else
    bisect_lockstep<8>(d, e, n, sigma);
}

// What a kernel makes of one matrix's singular values.
enum class SvdvalsEpilogue { Values, Nuclear, Rank };

// The whole per-matrix computation. `work` holds workspace_size(ref) values of T. Writes, by epilogue:
// Values: out[0 .. cols) = sigma descending (type out_t); Nuclear: out[0] = sum; Rank: out[0] = the number
// of sigma > rtol * sigma_max (rtol < 0 means max(m, n) * eps of T). Non-finite input gives NaN outputs.
template <typename T, typename scalar_t, typename out_t, typename G>
RP_HD void svdvals_one(const G& g, const scalar_t* base, const MatrixRef& ref, T* work, SvdvalsEpilogue epilogue,
                       double rtol, out_t* out) {
  const int64_t lda = workspace_lda(ref.rows), n = ref.cols;
  T* a = work;
  T* d = a + lda * n;
  T* e = d + n;
  T* sigma = e + n;
  T* w = sigma + n;
  T scale = T(1);
  const LoadStatus status = load_scaled(g, base, ref, a, lda, scale);
  if (status != LoadStatus::Ok) {
    const out_t fill = status == LoadStatus::Zero ? out_t(0) : out_t(std::numeric_limits<T>::quiet_NaN());
    if (epilogue == SvdvalsEpilogue::Values) {
      for (int64_t i = g.rank(); i < n; i += g.size()) out[i] = fill;
    } else if (g.rank() == 0) {
      out[0] = fill;
    }
    return;
  }
  bidiagonalize(g, a, lda, ref.rows, n, d, e, w);
  bidiagonal_svdvals(g, d, e, n, sigma);
  if (epilogue == SvdvalsEpilogue::Values) {
    for (int64_t i = g.rank(); i < n; i += g.size()) out[i] = static_cast<out_t>(sigma[i] * scale);
    return;
  }
  g.sync();  // every sigma is in place
  T part = T(0);
  if (epilogue == SvdvalsEpilogue::Nuclear) {
    for (int64_t i = g.rank(); i < n; i += g.size()) part += sigma[i];
    const T total = g.sum(part);
    if (g.rank() == 0) out[0] = static_cast<out_t>(total * scale);
  } else {
    const T tol = static_cast<T>(rtol < 0 ? static_cast<double>(ref.rows) * std::numeric_limits<T>::epsilon() : rtol) *
                  sigma[0];
    for (int64_t i = g.rank(); i < n; i += g.size()) part += sigma[i] > tol ? T(1) : T(0);
    const T count = g.sum(part);
    if (g.rank() == 0) out[0] = static_cast<out_t>(count);
  }
}

}  // namespace rankprune
