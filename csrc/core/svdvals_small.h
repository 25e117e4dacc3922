// Singular values of one small dense matrix, computed by a thread group (csrc/core/group.h).
//
// Algorithm (values only; docs/architecture.md summarises it):
//   1. load the matrix, divided by the power of two 2^k with max |a_ij| / 2^k in [1, 2) (exact, and valid for
//      subnormal maxima), into a column-major workspace with rows >= cols (sigma(A) = sigma(A^T)), so sums of
//      squares neither overflow nor underflow;
//   2. Householder bidiagonalization, A = Q B P^T, B upper bidiagonal with diagonal d and superdiagonal e
//      (~4mn^2 - 4n^3/3 flops, backward stable: no squaring of the condition number as in Gram + eig);
//   3. every singular value of B on its own, on the Golub-Kahan matrix
//      TGK = tridiag(0; d0, e0, d1, e1, ..., d_{n-1}; 0), whose eigenvalues are +-sigma_i: one pass over the
//      pivots of TGK - x gives a Sturm count (how many sigma_i are below x, a bracket that always holds the
//      wanted value) and a Newton step; bisection until the value is isolated, then safeguarded Newton
//      (quadratic), 6-9 passes per value with the shared grid instead of bisection's 28 (float). Each thread
//      owns its own sigma_i, so this phase is as parallel as the group; every search has a pass cap (no loop
//      that could hang on NaN) and is accurate to a few eps * sigma_max absolutely, which covers
//      rank-deficient and graded spectra where Gram-based methods lose ~sqrt(eps) * sigma_max. The Rank epilogue needs sigma_max and
//      a single Sturm count at the tolerance.
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
// then d[cols], e[cols], sigma[cols], w[rows], grid_below[kMaxGrid] (see bidiagonal_svdvals).
constexpr int kMaxGrid = 32;
RP_HD int64_t workspace_lda(int64_t rows) { return rows | 1; }  // odd: column walks hit distinct smem banks
RP_HD int64_t workspace_size(const MatrixRef& a) {
  return workspace_lda(a.rows) * a.cols + 3 * a.cols + a.rows + kMaxGrid;
}

// What happened while loading: the scale applied, or that the matrix is zero / not finite.
enum class LoadStatus { Ok, Zero, NonFinite };

// f(fast, slow) for every cell of a fast_n x slow_n grid, the fast index varying between consecutive visits
// of the group: thread t visits cells t, t + size, ... The (fast, slow) pair is advanced by the constant
// (size % fast_n, size / fast_n) with a carry, so that only the first cell costs an index division (a 64-bit
// division is a software routine of ~40-80 instructions on the GPU).
template <typename G, typename F>
RP_HD void for_each_index2(const G& g, int64_t fast_n, int64_t slow_n, F f) {
  if (fast_n <= 0) return;
  const int64_t step_fast = g.size() % fast_n, step_slow = g.size() / fast_n;
  int64_t i = g.rank() % fast_n, j = g.rank() / fast_n;
  while (j < slow_n) {
    f(i, j);
    i += step_fast;
    j += step_slow;
    if (i >= fast_n) {
      i -= fast_n;
      ++j;
    }
  }
}

// One CPU thread: nested loops.
template <typename F>
inline void for_each_index2(const SerialGroup&, int64_t fast_n, int64_t slow_n, F f) {
  for (int64_t j = 0; j < slow_n; ++j)
    for (int64_t i = 0; i < fast_n; ++i) f(i, j);
}

// The scale 2^k with max |a_ij| / 2^k in [1, 2), and its inverse as two factors: multiplying by powers of two
// is exact, and 2^-k alone would overflow for the subnormal maxima of fp32 (2^-k up to 2^149 > FLT_MAX) while
// 1 / amax overflows for any amax below 1 / FLT_MAX.
template <typename T>
struct PowerOfTwoScale {
  T scale, inv_hi, inv_lo;
};
template <typename T>
RP_HD PowerOfTwoScale<T> power_of_two_scale(T amax) {
  using std::frexp;
  using std::ldexp;
  int k = 0;
  frexp(amax, &k);  // amax = f * 2^k, f in [0.5, 1)
  --k;
  const int half = -k / 2;
  return {ldexp(T(1), k), ldexp(T(1), half), ldexp(T(1), -k - half)};
}

// Loads the matrix into the column-major workspace `a` (rows >= cols), divided by the power of two `scale`
// that brings max |a_ij| into [1, 2). Consecutive threads read consecutive rows, which orient() made the
// smaller stride (coalesced).
template <typename T, typename scalar_t, typename G>
RP_HD LoadStatus load_scaled(const G& g, const scalar_t* base, const MatrixRef& ref, T* a, int64_t lda, T& scale) {
  T amax = T(0);
  bool finite = true;
  for_each_index2(g, ref.rows, ref.cols, [&](int64_t i, int64_t j) {
    const T v = static_cast<T>(base[i * ref.row_stride + j * ref.col_stride]);
    a[i + j * lda] = v;
    finite &= (v - v == T(0));  // false for NaN and +-Inf
    const T av = v < T(0) ? -v : v;
    amax = av > amax ? av : amax;
  });
  // Any NaN or Inf forces the group's maximum to +inf (a maximum alone would drop a NaN).
  amax = g.max(finite ? amax : std::numeric_limits<T>::infinity());  // barrier: the whole matrix is loaded
  if (!(amax < std::numeric_limits<T>::infinity())) return LoadStatus::NonFinite;
  if (amax == T(0)) return LoadStatus::Zero;
  const PowerOfTwoScale<T> p = power_of_two_scale(amax);
  scale = p.scale;
  for_each_index2(g, ref.rows, ref.cols, [&](int64_t i, int64_t j) {
    a[i + j * lda] = a[i + j * lda] * p.inv_hi * p.inv_lo;
  });
  g.sync();
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

// x . y and y += alpha x for one CPU thread on explicit 32-byte vectors. GCC's SLP vectorizer turns the four
// partial sums of dot() into shuffles and scalar adds (measured: ~3x slower QR at 576 x 40), and its own loops
// end in up to kLanes - 1 scalar iterations; the columns here are short (n - k for k = 0..n-1), so a tail
// shorter than a vector is done as one vector ending at the last element, whose lanes already done are masked.
template <typename T>
struct Simd {
  static constexpr int kLanes = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
  typedef decltype(V{} < V{}) M;
  static V load(const T* p) {
    V v;
    __builtin_memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(T* p, V v) { __builtin_memcpy(p, &v, sizeof(V)); }
  // All bits set in the last `count` lanes (0 < count < kLanes): a window on a constant table.
  static M last_lanes(int64_t count) {
    alignas(32) static const T kTable[16] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0),
                                             T(1), T(1), T(1), T(1), T(1), T(1), T(1), T(1)};
    return load(kTable + (8 - kLanes) + count) > T(0);
  }
  static V select(M mask, V a, V b) { return V((M(a) & mask) | (M(b) & ~mask)); }
};

template <typename T>
inline T dot_simd(const T* x, const T* y, int64_t len) {
  using S = Simd<T>;
  constexpr int kLanes = S::kLanes;
  typename S::V s0{}, s1{};
  int64_t i = 0;
  for (; i + 2 * kLanes <= len; i += 2 * kLanes) {
    s0 += S::load(x + i) * S::load(y + i);
    s1 += S::load(x + i + kLanes) * S::load(y + i + kLanes);
  }
  if (i + kLanes <= len) {
    s0 += S::load(x + i) * S::load(y + i);
    i += kLanes;
  }
  if (i < len && len >= kLanes) {
    s1 += S::select(S::last_lanes(len - i), S::load(x + len - kLanes) * S::load(y + len - kLanes), typename S::V{});
    i = len;
  }
  s0 += s1;
  T total = T(0);
  for (int l = 0; l < kLanes; ++l) total += s0[l];
  for (; i < len; ++i) total += x[i] * y[i];
  return total;
}

template <typename T>
inline void axpy_simd(T* y, const T* x, T alpha, int64_t len) {
  using S = Simd<T>;
  constexpr int kLanes = S::kLanes;
  if (len < kLanes) {
    for (int64_t i = 0; i < len; ++i) y[i] += alpha * x[i];
    return;
  }
  // The last vector, computed from the original values before the loop stores over its first lanes (a load
  // overlapping a recent store would also stall on store forwarding); its overlap lanes get the same values.
  const typename S::V tail = S::load(y + len - kLanes) + alpha * S::load(x + len - kLanes);
  for (int64_t i = 0; i + kLanes <= len; i += kLanes) S::store(y + i, S::load(y + i) + alpha * S::load(x + i));
  S::store(y + len - kLanes, tail);
}

// x . y and y += alpha x for the column updates of the bidiagonalization: one thread's serial loops on the GPU,
// the explicit vectors above on the CPU.
template <typename T, typename G>
RP_HD T column_dot(const G&, const T* x, const T* y, int64_t len) {
  return dot(x, y, len);
}
template <typename T>
inline T column_dot(const SerialGroup&, const T* x, const T* y, int64_t len) {
  return dot_simd(x, y, len);
}
template <typename T, typename G>
RP_HD void column_axpy(const G&, T* y, const T* x, T alpha, int64_t len) {
  for (int64_t i = 0; i < len; ++i) y[i] += alpha * x[i];
}
template <typename T>
inline void column_axpy(const SerialGroup&, T* y, const T* x, T alpha, int64_t len) {
  axpy_simd(y, x, alpha, len);
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

// The same products for one CPU thread, on explicit vectors down the contiguous columns: w = c (A u) for the
// rows k+1.. in vector blocks accumulated in registers, then one axpy per column. w holds rows + kMaxGrid
// values, so its last block may run past m (the extra lanes read the workspace that follows a column and are
// never used).
template <typename T>
inline void apply_right_reflector(const SerialGroup&, T* a, int64_t lda, int64_t m, int64_t n, int64_t k, T u0, T c,
                                  T* w) {
  using S = Simd<T>;
  const int64_t len = m - k - 1;
  T* wk = w + k + 1;
  const T* col = a + k + 1;  // column j of the trailing rows is col + j * lda
  for (int64_t i = 0; i < len; i += S::kLanes) {
    typename S::V acc = u0 * S::load(col + (k + 1) * lda + i);
    for (int64_t j = k + 2; j < n; ++j) acc += a[k + j * lda] * S::load(col + j * lda + i);
    S::store(wk + i, c * acc);
  }
  for (int64_t j = k + 1; j < n; ++j) axpy_simd(a + k + 1 + j * lda, wk, -(j == k + 1 ? u0 : a[k + j * lda]), len);
}

// Householder bidiagonalization of the column-major m x n workspace (m >= n). Writes |d| and |e|
// (e[n-1] = 0); the singular values of the bidiagonal equal those of the matrix. Overwrites `a`;
// w is scratch for m values.
template <typename T, typename G>
RP_HD void bidiagonalize(const G& g, T* a, int64_t lda, int64_t m, int64_t n, T* d, T* e, T* w) {
  using std::sqrt;
  // The matrix is scaled so that max |a_ij| is in [1, 2), hence ||A|| >= 1. A remaining column (row) whose squared norm
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
        const T w = c * (v0 * aj[k] + column_dot(g, ak + k + 1, aj + k + 1, m - k - 1));
        aj[k] -= w * v0;
        column_axpy(g, aj + k + 1, ak + k + 1, -w, m - k - 1);
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

// Singular values of the bidiagonal (d, e), each found on its own by a safeguarded Newton iteration on the
// Golub-Kahan matrix TGK = tridiag(0; d0, e0, d1, e1, ..., d_{n-1}; 0), whose eigenvalues are +-sigma_i.
// One pass over the 2n pivots of TGK - x = L D L^T (tgk_probe) gives at once
//   - the Sturm count: how many sigma_i lie below x, which keeps a bracket [lo, hi] around the wanted value;
//   - p'(x) / p(x) for the characteristic polynomial p(x) = det(TGK - x) = prod (x^2 - sigma_i^2), i.e. a
//     Newton step in y = x^2 (where a zero singular value is a simple root of prod (y - sigma_i^2)).
// The search bisects until the bracket holds the wanted value alone, then takes Newton steps, falling back to
// bisection whenever a step leaves the bracket or fails to halve the previous step. It stops when the bracket
// is at most 2 tol wide, tol = eps * bound: once Newton has converged, one probe just beyond its iterate
// closes the bracket, so the counts alone decide which root was found. About 6-9 passes per value (quadratic
// convergence once isolated) instead of the 28 (float) / 58 (double) of plain bisection; clusters that never
// isolate end as bisection, and every search is capped at kSearchSteps passes, so NaN cannot make it loop.
template <typename T>
struct TgkSetup {
  T bound;   // every sigma_i is below it (Gershgorin on TGK), bound <= 2 sigma_max
  T pivmin;  // pivots smaller than this in magnitude are replaced by -pivmin
  T tol;     // absolute accuracy of the values
};

// Pass cap of one search: enough for bisection alone, alternating with rejected Newton steps.
template <typename T>
constexpr int kSearchSteps = 2 * (std::numeric_limits<T>::digits + 2);

// b2 = squares of TGK's off-diagonal (d0, e0, d1, ..., d_{n-1}): 2n - 1 values. Every thread computes the setup.
template <typename T>
RP_HD TgkSetup<T> tgk_setup(const T* d, const T* e, int64_t n) {
  T maxsq = T(1), bound = T(0);
  for (int64_t k = 0; k < n; ++k) {
    const T left = k > 0 ? e[k - 1] : T(0), right = k + 1 < n ? e[k] : T(0);
    const T row = d[k] + (left > right ? left : right);
    bound = row > bound ? row : bound;
    maxsq = d[k] * d[k] > maxsq ? d[k] * d[k] : maxsq;
    maxsq = e[k] * e[k] > maxsq ? e[k] * e[k] : maxsq;
  }
  bound *= T(1) + T(8) * std::numeric_limits<T>::epsilon();
  return {bound, std::numeric_limits<T>::min() * maxsq, std::numeric_limits<T>::epsilon() * bound};
}

// Number of singular values below x > 0 (returned as T), and slope = p'(x) / p(x) = sum_k q_k' / q_k over the
// pivots q_k of TGK - x (q_0 = -x, q_k = -x - b2[k-1] / q_{k-1}, q' = dq/dx). One division per pivot.
// `clamp` replaces pivots below pivmin in magnitude by -pivmin. Without it a pivot that is exactly 0 makes the
// next one -inf, which counts as a pivot of +tiny would; only a zero pivot followed by a zero off-diagonal gives
// NaN, and NaN then reaches the last pivot: such a probe is repeated with the clamp (tgk_probe).
template <typename T>
RP_HD T tgk_pivots(const T* b2, int64_t n, T x, T pivmin, bool clamp, T& slope, T& last) {
  T q = -x;
  if (clamp && (q < T(0) ? -q : q) < pivmin) q = -pivmin;
  T r = T(1) / q, u = -r, sum = u;
  int64_t negative = q < T(0);
  for (int64_t k = 0; k < 2 * n - 1; ++k) {
    const T s = b2[k] * r;
    q = -x - s;
    if (clamp && (q < T(0) ? -q : q) < pivmin) q = -pivmin;
    r = T(1) / q;
    u = (s * u - T(1)) * r;
    sum += u;
    negative += q < T(0);
  }
  slope = sum;
  last = q;
  return static_cast<T>(negative - n);
}

template <typename T>
RP_HD T tgk_probe(const T* b2, int64_t n, T x, T pivmin, T& slope) {
  T last;
  const T below = tgk_pivots(b2, n, x, pivmin, false, slope, last);
  return last == last ? below : tgk_pivots(b2, n, x, pivmin, true, slope, last);
}

// The first probes of every search are shared: a grid of up to kMaxGrid points, point 0 at tol (values below it
// are reported as 0: rank-deficient matrices have many, and bisection would spend ~22 passes on each), the
// others evenly spaced in (tol, bound). Each search starts from the grid cell that holds its value, so most
// values are isolated before their first own probe.

template <typename T>
RP_HD T grid_point(const TgkSetup<T>& st, int j, int count) {
  return j == 0 ? st.tol : st.tol + (st.bound - st.tol) * static_cast<T>(j) / static_cast<T>(count);
}

// State of the search for one singular value; `target` is its ascending index. The caller probes at x and
// passes the result to update() until done.
template <typename T>
struct SigmaSearch {
  T target, lo, hi, below_lo, below_hi, x, last_step, value;
  bool done;

  // grid_below[j]: the number of values below grid_point(st, j, grid_count).
  RP_HD void start(T wanted, const TgkSetup<T>& st, T n, const T* grid_below, int grid_count) {
    target = wanted;
    lo = st.tol;
    below_lo = grid_below[0];
    hi = st.bound;
    below_hi = n;
    for (int j = 1; j < grid_count; ++j) {
      const T xj = grid_point(st, j, grid_count);
      if (grid_below[j] > target) {
        hi = xj;
        below_hi = grid_below[j];
        break;
      }
      lo = xj;
      below_lo = grid_below[j];
    }
    x = T(0.5) * (lo + hi);
    last_step = hi - lo;
    done = target < grid_below[0];
    value = done ? T(0) : T(-1);  // -1: no Newton iterate yet
  }

  RP_HD void finish() {
    // The bracket is at most 2 tol wide: its midpoint is within tol, the last Newton iterate usually better.
    if (!(value >= lo && value <= hi)) value = T(0.5) * (lo + hi);
    done = true;
  }

  RP_HD void update(T below, T slope, const TgkSetup<T>& st) {
    using std::sqrt;
    if (below > target) {
      hi = x;
      below_hi = below;
    } else {
      lo = x;
      below_lo = below;
    }
    if (hi - lo <= T(2) * st.tol) return finish();
    const T mid = T(0.5) * (lo + hi);
    T next = mid;
    if (below_hi - below_lo == T(1)) {
      // Newton in y = x^2: y' = y - 2x / slope. |y'| rather than max(y', 0): near a zero singular value the
      // step lands just below 0, and sqrt(|y'|) is then as close to 0 as y' is.
      const T y = x * x - T(2) * x / slope;
      value = sqrt(y < T(0) ? -y : y);
      const T step = value > x ? value - x : x - value;
      if (step <= st.tol) {
        // Converged to a root next to x, one end of the bracket: a probe tol beyond it, inside the bracket,
        // closes the bracket to 2 tol if that root is the wanted one (and otherwise moves the bracket on:
        // only the Sturm counts decide, never the Newton step alone).
        next = x == hi ? value - st.tol : value + st.tol;
      } else if (step <= T(0.5) * last_step) {
        next = value;
      }
      if (!(next > lo && next < hi)) next = mid;  // also NaN
    }
    last_step = next > x ? next - x : x - next;
    x = next;
  }

  RP_HD T result() const { return done ? value : T(0.5) * (lo + hi); }  // midpoint if the pass cap ended it
};

// The singular value of ascending index `target`, by one thread.
template <typename T>
RP_HD T tgk_sigma(const T* b2, int64_t n, int64_t target, const TgkSetup<T>& st, const T* grid_below, int grid_count) {
  SigmaSearch<T> search;
  search.start(static_cast<T>(target), st, static_cast<T>(n), grid_below, grid_count);
  for (int step = 0; step < kSearchSteps<T> && !search.done; ++step) {
    T slope;
    const T below = tgk_probe(b2, n, search.x, st.pivmin, slope);
    search.update(below, slope, st);
  }
  return search.result();
}

// Squares of TGK's off-diagonal into b2 (2n - 1 values), split among the group; barrier.
template <typename T, typename G>
RP_HD void tgk_squares(const G& g, const T* d, const T* e, int64_t n, T* b2) {
  for (int64_t k = g.rank(); k < 2 * n - 1; k += g.size()) {
    const T b = (k & 1) ? e[k >> 1] : d[k >> 1];
    b2[k] = b * b;
  }
  g.sync();
}

// sigma[i] (descending) of the bidiagonal. On the GPU: the grid's points one per lane, a barrier, then one lane
// per value (block path: 64-256 lanes for up to 64-256 values; warp path: n of 32 lanes), each running its own
// search (the searches diverge only in their number of passes). grid_below: kMaxGrid values of scratch.
template <typename T, typename G>
RP_HD void bidiagonal_svdvals(const G& g, const T* b2, const TgkSetup<T>& st, int64_t n, T* grid_below, T* sigma) {
  const int grid_count = g.size() < kMaxGrid ? g.size() : kMaxGrid;
  for (int j = g.rank(); j < grid_count; j += g.size()) {
    T slope;
    grid_below[j] = tgk_probe(b2, n, grid_point(st, j, grid_count), st.pivmin, slope);
  }
  g.sync();
  for (int64_t i = g.rank(); i < n; i += g.size()) sigma[i] = tgk_sigma(b2, n, n - 1 - i, st, grid_below, grid_count);
}

// kLanes * kChains probes at once on GCC/Clang vector types (kLanes lanes, kChains independent vectors
// interleaved, so that the division latency of one chain hides behind the others): the arithmetic of
// tgk_probe, lane by lane.
template <int kLanes, int kChains, typename T>
inline void tgk_probe_lockstep(const T* b2, int64_t n, T pivmin, const T* x, T* below, T* slope) {
  typedef T V __attribute__((vector_size(kLanes * sizeof(T))));
  // Comparison masks (all bits set where true); selections are bitwise so that any x86-64 level does them.
  typedef decltype(V{} < V{}) M;
  const V zero = V{}, one = zero + T(1);
  V xv[kChains], r[kChains], u[kChains], sum[kChains], q[kChains], negative[kChains];
  for (int c = 0; c < kChains; ++c) {
    __builtin_memcpy(&xv[c], x + c * kLanes, sizeof(V));
    q[c] = -xv[c];
    r[c] = one / q[c];
    u[c] = -r[c];
    sum[c] = u[c];
    negative[c] = one - T(n);  // the first pivot, -x, is negative
  }
  for (int64_t k = 0; k < 2 * n - 1; ++k) {
    const T b = b2[k];
    for (int c = 0; c < kChains; ++c) {
      const V s = b * r[c];
      q[c] = -xv[c] - s;
      r[c] = one / q[c];
      u[c] = (s * u[c] - one) * r[c];
      sum[c] += u[c];
      negative[c] += V(M(one) & (q[c] < zero));
    }
  }
  for (int c = 0; c < kChains; ++c) {
    for (int l = 0; l < kLanes; ++l) {
      const int i = c * kLanes + l;
      below[i] = negative[c][l];
      slope[i] = sum[c][l];
      if (q[c][l] != q[c][l]) below[i] = tgk_probe(b2, n, x[i], pivmin, slope[i]);  // NaN: see tgk_pivots
    }
  }
}

// The serial (CPU) group: the grid in one lockstep probe, then kLanes * kChains searches at a time, probes in
// lockstep and the bookkeeping (SigmaSearch::update, the same as above) scalar per slot. A slot whose search
// is done takes the next value, so the vectors stay full until the last values.
template <int kLanes, int kChains, typename T>
inline void bidiagonal_svdvals_lockstep(const T* b2, const TgkSetup<T>& st, int64_t n, T* grid_below, T* sigma) {
  constexpr int kSlots = kLanes * kChains;
  static_assert(kSlots <= kMaxGrid, "the grid has one point per slot");
  T x[kSlots], below[kSlots], slope[kSlots];
  for (int j = 0; j < kSlots; ++j) x[j] = grid_point(st, j, kSlots);
  tgk_probe_lockstep<kLanes, kChains>(b2, n, st.pivmin, x, grid_below, slope);
  SigmaSearch<T> search[kSlots];
  int64_t owner[kSlots];  // the value index a slot works on, -1 when idle
  int passes[kSlots];
  int64_t next_value = 0;
  // Gives slot l the next value that needs a search (values below st.tol are done at once).
  auto refill = [&](int l) {
    owner[l] = -1;
    while (next_value < n) {
      const int64_t i = next_value++;
      search[l].start(static_cast<T>(n - 1 - i), st, static_cast<T>(n), grid_below, kSlots);
      if (!search[l].done) {
        owner[l] = i;
        passes[l] = 0;
        x[l] = search[l].x;
        return;
      }
      sigma[i] = search[l].result();
    }
  };
  for (int l = 0; l < kSlots; ++l) refill(l);  // idle slots keep probing at their last x, harmlessly
  for (;;) {
    bool active = false;
    for (int l = 0; l < kSlots; ++l) active |= owner[l] >= 0;
    if (!active) break;
    tgk_probe_lockstep<kLanes, kChains>(b2, n, st.pivmin, x, below, slope);
    for (int l = 0; l < kSlots; ++l) {
      if (owner[l] < 0) continue;
      search[l].update(below[l], slope[l], st);
      x[l] = search[l].x;
      if (search[l].done || ++passes[l] >= kSearchSteps<T>) {
        sigma[owner[l]] = search[l].result();
        refill(l);
      }
    }
  }
}

template <typename T>
inline void bidiagonal_svdvals(const SerialGroup&, const T* b2, const TgkSetup<T>& st, int64_t n, T* grid_below,
                               T* sigma) {
  // One 32-byte register per vector (wider ones spill: 5x slower in float64, measured); two chains, i.e.
  // 8-16 slots, for up to 16 values, four chains beyond (measured best at 14 x 14 and 56 x 56).
  constexpr int kLanes = 32 / sizeof(T);
  if (n <= 16)
    bidiagonal_svdvals_lockstep<kLanes, 2>(b2, st, n, grid_below, sigma);
  else
    bidiagonal_svdvals_lockstep<kLanes, 4>(b2, st, n, grid_below, sigma);
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
  // The matrix is consumed: its space holds the squared off-diagonal of TGK.
  T* b2 = a;
  tgk_squares(g, d, e, n, b2);
  const TgkSetup<T> st = tgk_setup(d, e, n);
  T* grid_below = w + ref.rows;
  if (epilogue == SvdvalsEpilogue::Rank) {
    // sigma_max (no grid), then a single Sturm count at the tolerance; every thread computes the same (no
    // broadcast needed).
    T slope;
    const T below_tol = tgk_probe(b2, n, st.tol, st.pivmin, slope);
    const T sigma_max = tgk_sigma(b2, n, n - 1, st, &below_tol, 1);
    const T tol = static_cast<T>(rtol < 0 ? static_cast<double>(ref.rows) * std::numeric_limits<T>::epsilon() : rtol) *
                  sigma_max;
    const T below = tgk_probe(b2, n, tol > st.pivmin ? tol : st.pivmin, st.pivmin, slope);
    if (g.rank() == 0) out[0] = static_cast<out_t>(static_cast<T>(n) - below);
    return;
  }
  bidiagonal_svdvals(g, b2, st, n, grid_below, sigma);
  g.sync();  // every sigma is in place
  if (epilogue == SvdvalsEpilogue::Values) {
    // Each value is accurate to tol on its own, so two within tol of each other may come out swapped: one
    // thread restores the order (an insertion sort, linear on nearly sorted input).
    if (g.rank() == 0) {
      for (int64_t i = 1; i < n; ++i) {
        const T v = sigma[i];
        int64_t j = i;
        for (; j > 0 && sigma[j - 1] < v; --j) sigma[j] = sigma[j - 1];
        sigma[j] = v;
      }
    }
    g.sync();
    for (int64_t i = g.rank(); i < n; i += g.size()) out[i] = static_cast<out_t>(sigma[i] * scale);
    return;
  }
  T part = T(0);
  for (int64_t i = g.rank(); i < n; i += g.size()) part += sigma[i];
  const T total = g.sum(part);
  if (g.rank() == 0) out[0] = static_cast<out_t>(total * scale);
}

}  // namespace rankprune
