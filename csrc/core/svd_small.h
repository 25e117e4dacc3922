// Thin SVD with vectors and Householder QR of one matrix, computed by a thread group (csrc/core/group.h).
//
// SVD algorithm (arithmetic in double for every input dtype, see svd_compute_t): one-sided (Hestenes) Jacobi on the column-major workspace W (rows >= cols), accumulating
// the rotations in V; at convergence W = U diag(sigma), sigma = column norms. Chosen over bidiagonalization
// + inverse iteration (core/svdvals_small.h's front end) because
//   - it is backward stable with orthogonality of U and V set by the convergence tolerance alone
//     (cosine of every column pair <= tol), including clusters and tiny singular values, where inverse
//     iteration needs reorthogonalization heuristics;
//   - its work splits into n/2 independent column pairs per round (round-robin ordering), one pair per
//     warp on the GPU, with a single barrier per round; the extra flops (about 6 m n^2 per sweep, 6-10
//     sweeps) are affordable for the sizes it serves (small matrices, and the cols x cols R factor of tall
//     ones, see csrc/ops/svd.cpp).
// Columns whose squared norm falls below eps^2 ||A||_F^2 (zero or underflowing) take no part in rotations;
// their U columns are completed to an orthonormal basis at the end (classical Gram-Schmidt, twice, from the
// unit vector least covered by the other columns). The number of sweeps is capped (NaN/Inf never reach the
// sweeps: load_scaled reports them and the outputs are NaN).
//
// Householder QR (orthonormalize, and the preconditioning of tall matrices): LAPACK geqr2 + org2r
// arithmetic; Q is orthonormal to working precision whatever the rank of the input (a zero column gives
// tau = 0 and a unit column of Q), which Gram-based CholeskyQR cannot offer for rank-deficient sketches.
#pragma once

#include <limits>

#include "core/svdvals_small.h"

namespace rankprune {

// A group split into `count` subgroups of type S working on independent tasks; this thread belongs to
// subgroup `index`. CPU: one SerialGroup (index 0 of 1). GPU: the warps of a block.
template <typename S>
struct Teams {
  S sub;
  int index, count;
};

// The SVD works in double whatever the input: in float32 the ~n * sweeps rotations that every column of
// W and V goes through accumulate rounding to U^T U - I ~ 1e-5 and ||A - U S V^T|| / ||A|| ~ 1e-5 at
// 64 x 64 (2.5e-5 at 128 x 128, measured), above the float32 targets; in double both end at the float32
// rounding of the outputs (~4e-8). On the GPU FP64 runs at half the FP32 rate on H100/A100.
using svd_compute_t = double;

// f(i, j) for every cell of a rows x cols grid (row-major: j varies fastest), split among the group's threads.
template <typename G, typename F>
RP_HD void for_each_cell(const G& g, int64_t rows, int64_t cols, F f) {
  for_each_index2(g, cols, rows, [&](int64_t j, int64_t i) { f(i, j); });
}

// Jacobi settings: a pair rotates while |a_p . a_q| > tol ||a_p|| ||a_q||, tol = kJacobiTolFactor *
// sqrt(rows) * eps (LAPACK gesvj uses sqrt(rows) * eps; the factor keeps rounding noise of the dot
// products from forcing extra sweeps). The cap is LAPACK gesvj's.
constexpr double kJacobiTolFactor = 4.0;
constexpr int kJacobiMaxSweeps = 30;

// Per-matrix workspace of the SVD: in T, W [rows * cols], V [cols * cols], sigma, coef, state [cols each],
// cover [rows]; in int, perm [cols] and one pick slot.
RP_HD int64_t svd_workspace_size(int64_t rows, int64_t cols) { return rows * cols + cols * cols + 3 * cols + rows; }
RP_HD int64_t svd_workspace_ints(int64_t cols) { return cols + 1; }

// ||x||^2, ||y||^2 and x . y over a subgroup.
template <typename T, typename S>
RP_HD void pair_gram(const S& s, const T* x, const T* y, int64_t len, T& xx, T& yy, T& xy) {
  T a = T(0), b = T(0), c = T(0);
  for (int64_t i = s.rank(); i < len; i += s.size()) {
    a += x[i] * x[i];
    b += y[i] * y[i];
    c += x[i] * y[i];
  }
  xx = s.sum(a);
  yy = s.sum(b);
  xy = s.sum(c);
}

// The same for one CPU thread: three vectorized passes.
template <typename T>
inline void pair_gram(const SerialGroup&, const T* x, const T* y, int64_t len, T& xx, T& yy, T& xy) {
  xx = dot_simd(x, x, len);
  yy = dot_simd(y, y, len);
  xy = dot_simd(x, y, len);
}

// x[begin:end] . y[begin:end] over the whole group (a barrier), split among its threads.
template <typename T, typename G>
RP_HD T group_dot(const G& g, const T* x, const T* y, int64_t begin, int64_t end) {
  T part = T(0);
  for (int64_t i = begin + g.rank(); i < end; i += g.size()) part += x[i] * y[i];
  return g.sum(part);
}

template <typename T>
inline T group_dot(const SerialGroup&, const T* x, const T* y, int64_t begin, int64_t end) {
  return end > begin ? dot_simd(x + begin, y + begin, end - begin) : T(0);
}

// (x, y) <- (c x - s y, s x + c y) over a subgroup.
template <typename T, typename S>
RP_HD void rotate_columns(const S& sg, T* x, T* y, int64_t len, T c, T s) {
  for (int64_t i = sg.rank(); i < len; i += sg.size()) {
    const T xi = x[i], yi = y[i];
    x[i] = c * xi - s * yi;
    y[i] = s * xi + c * yi;
  }
}

// One Jacobi rotation of columns p, q of W (and V) that makes them orthogonal; false when they already are
// (or one of them is negligible).
template <typename T, typename S>
RP_HD bool jacobi_rotate(const S& sg, T* wp, T* wq, int64_t rows, T* vp, T* vq, int64_t cols, T tol, T tiny) {
  using std::sqrt;
  T pp, qq, pq;
  pair_gram(sg, wp, wq, rows, pp, qq, pq);
  if (pp <= tiny || qq <= tiny) return false;
  const T apq = pq < T(0) ? -pq : pq;
  if (!(apq > tol * sqrt(pp) * sqrt(qq))) return false;
  // Rutishauser: t = tan(theta) is the smaller root of t^2 + 2 zeta t - 1 = 0.
  const T zeta = (qq - pp) / (T(2) * pq);
  const T az = zeta < T(0) ? -zeta : zeta;
  const T big = T(1) / std::numeric_limits<T>::epsilon();
  T t = az > big ? T(0.5) / az : T(1) / (az + sqrt(T(1) + az * az));
  if (zeta < T(0)) t = -t;
  const T c = T(1) / sqrt(T(1) + t * t), s = c * t;
  rotate_columns(sg, wp, wq, rows, c, s);
  rotate_columns(sg, vp, vq, cols, c, s);
  return true;
}

// Round-robin ("circle") pairing of N = cols rounded up to even players: in round r, pair 0 is (r, N-1),
// pair i > 0 is ((r + i) mod (N-1), (r - i) mod (N-1)). Every pair of columns meets once per sweep and the
// pairs of a round are disjoint, so the subgroups rotate them concurrently. Returns false for a bye.
RP_HD bool round_robin_pair(int64_t cols, int64_t r, int64_t i, int64_t& p, int64_t& q) {
  const int64_t N = cols + (cols & 1);
  if (i == 0) {
    p = r;
    q = N - 1;
  } else {
    p = (r + i) % (N - 1);
    q = (r - i + (N - 1)) % (N - 1);
  }
  if (p > q) {
    const int64_t tmp = p;
    p = q;
    q = tmp;
  }
  return q < cols;
}

// Jacobi sweeps until a sweep rotates nothing (or the cap); returns the number of sweeps run.
template <typename T, typename G, typename S>
RP_HD int jacobi_sweeps(const G& g, const Teams<S>& tm, T* w, int64_t rows, int64_t cols, T* v, T tol, T tiny) {
  const int64_t N = cols + (cols & 1);
  int sweep = 0;
  while (sweep < kJacobiMaxSweeps) {
    ++sweep;
    T rotated = T(0);
    for (int64_t r = 0; r + 1 < N; ++r) {
      for (int64_t i = tm.index; i < N / 2; i += tm.count) {
        int64_t p, q;
        if (!round_robin_pair(cols, r, i, p, q)) continue;
        if (jacobi_rotate(tm.sub, w + p * rows, w + q * rows, rows, v + p * cols, v + q * cols, cols, tol, tiny))
          rotated = T(1);
      }
      g.sync();
    }
    if (g.max(rotated) == T(0)) break;
  }
  return sweep;
}

// Writes the outputs of a matrix without usable numbers: zero (U, V = leading unit vectors, sigma = 0) or
// non-finite (all NaN). left: rows x cols, right: cols x cols, both row-major with row stride cols.
template <typename T, typename out_t, typename G>
RP_HD void svd_fill(const G& g, bool zero, int64_t rows, int64_t cols, out_t* left, out_t* sigma, out_t* right) {
  const out_t nan = static_cast<out_t>(std::numeric_limits<T>::quiet_NaN());
  for_each_cell(g, rows, cols, [&](int64_t i, int64_t j) { left[i * cols + j] = zero ? out_t(i == j ? 1 : 0) : nan; });
  for_each_cell(g, cols, cols, [&](int64_t i, int64_t j) { right[i * cols + j] = zero ? out_t(i == j ? 1 : 0) : nan; });
  for (int64_t j = g.rank(); j < cols; j += g.size()) sigma[j] = zero ? out_t(0) : nan;
}

// Replaces the negligible columns of W (state 0; the others are unit vectors, state 1) by unit vectors
// orthogonal to every other column, in the order of perm.
template <typename T, typename G, typename S>
RP_HD void complete_basis(const G& g, const Teams<S>& tm, T* w, int64_t rows, int64_t cols, T* coef, T* state,
                          T* cover, const int* perm, int* pick) {
  using std::sqrt;
  // cover[i] = squared norm of row i over the unit columns: e_i's distance^2 to their span is 1 - cover[i].
  for (int64_t i = g.rank(); i < rows; i += g.size()) {
    T c = T(0);
    for (int64_t j = 0; j < cols; ++j) c += state[j] != T(0) ? w[i + j * rows] * w[i + j * rows] : T(0);
    cover[i] = c;
  }
  g.sync();
  for (int64_t pos = 0; pos < cols; ++pos) {
    const int64_t j = perm[pos];
    if (state[j] != T(0)) continue;  // uniform across the group (state is shared)
    if (g.rank() == 0) {
      int64_t best = 0;
      for (int64_t i = 1; i < rows; ++i) best = cover[i] < cover[best] ? i : best;
      *pick = static_cast<int>(best);
    }
    g.sync();
    T* u = w + j * rows;
    for (int64_t i = g.rank(); i < rows; i += g.size()) u[i] = i == *pick ? T(1) : T(0);
    g.sync();
    for (int pass = 0; pass < 2; ++pass) {  // classical Gram-Schmidt, twice ("twice is enough")
      for (int64_t c = tm.index; c < cols; c += tm.count) {
        if (state[c] == T(0)) continue;
        const T d = group_dot(tm.sub, w + c * rows, u, 0, rows);
        if (tm.sub.rank() == 0) coef[c] = d;
      }
      g.sync();
      for (int64_t i = g.rank(); i < rows; i += g.size()) {
        T x = u[i];
        for (int64_t c = 0; c < cols; ++c) x -= state[c] != T(0) ? coef[c] * w[i + c * rows] : T(0);
        u[i] = x;
      }
      g.sync();
    }
    const T inv = T(1) / sqrt(group_dot(g, u, u, 0, rows));
    for (int64_t i = g.rank(); i < rows; i += g.size()) {
      u[i] *= inv;
      cover[i] += u[i] * u[i];
    }
    if (g.rank() == 0) state[j] = T(1);
    g.sync();
  }
}

// Thin SVD of one rows x cols matrix (rows >= cols) at base (layout ref). `work` holds
// svd_workspace_size(rows, cols) values of T, `iwork` svd_workspace_ints(cols) ints. Writes
// left [rows x cols] = U, sigma [cols] descending, right [cols x cols] = V (row-major, row stride cols),
// so that the matrix equals left diag(sigma) right^T. Returns the number of sweeps (0 without any).
template <typename T, typename scalar_t, typename out_t, typename G, typename S>
RP_HD int svd_one(const G& g, const Teams<S>& tm, const scalar_t* base, const MatrixRef& ref, T* work, int* iwork,
                  out_t* left, out_t* sigma_out, out_t* right) {
  using std::sqrt;
  const int64_t rows = ref.rows, cols = ref.cols;
  T* w = work;
  T* v = w + rows * cols;
  T* sigma = v + cols * cols;
  T* coef = sigma + cols;
  T* state = coef + cols;
  T* cover = state + cols;
  int* perm = iwork;
  int* pick = perm + cols;
  T scale = T(1);
  const LoadStatus status = load_scaled(g, base, ref, w, rows, scale);
  if (status != LoadStatus::Ok) {
    svd_fill<T>(g, status == LoadStatus::Zero, rows, cols, left, sigma_out, right);
    return 0;
  }
  for_each_cell(g, cols, cols, [&](int64_t i, int64_t j) { v[i * cols + j] = i == j ? T(1) : T(0); });
  const T eps = std::numeric_limits<T>::epsilon();
  const T tiny = eps * eps * group_dot(g, w, w, 0, rows * cols);  // barrier: V is initialized
  // The rotations are exact to T's precision, so the tolerance only needs to match what out_t can hold.
  const T tol_t = static_cast<T>(kJacobiTolFactor) * sqrt(static_cast<T>(rows)) * eps;
  const T tol_out = static_cast<T>(std::numeric_limits<out_t>::epsilon());
  const T tol = tol_t > tol_out ? tol_t : tol_out;
  const int sweeps = jacobi_sweeps(g, tm, w, rows, cols, v, tol, tiny);

  // sigma = column norms; unit columns where not negligible.
  for (int64_t j = tm.index; j < cols; j += tm.count) {
    T* wj = w + j * rows;
    const T s = group_dot(tm.sub, wj, wj, 0, rows);
    const bool keep = s > tiny;
    const T inv = keep ? T(1) / sqrt(s) : T(0);
    for (int64_t i = tm.sub.rank(); i < rows; i += tm.sub.size()) wj[i] *= inv;
    if (tm.sub.rank() == 0) {
      sigma[j] = sqrt(s);
      state[j] = keep ? T(1) : T(0);
    }
  }
  g.sync();
  // Descending order: column j goes to position #{i : sigma_i > sigma_j, or equal with i < j}.
  T negligible = T(0);
  for (int64_t j = g.rank(); j < cols; j += g.size()) {
    int64_t pos = 0;
    for (int64_t i = 0; i < cols; ++i) pos += (sigma[i] > sigma[j] || (sigma[i] == sigma[j] && i < j)) ? 1 : 0;
    perm[pos] = static_cast<int>(j);
    negligible = state[j] == T(0) ? T(1) : negligible;
  }
  if (g.max(negligible) != T(0)) complete_basis(g, tm, w, rows, cols, coef, state, cover, perm, pick);
  for_each_cell(g, rows, cols,
                [&](int64_t i, int64_t c) { left[i * cols + c] = static_cast<out_t>(w[i + perm[c] * rows]); });
  for_each_cell(g, cols, cols,
                [&](int64_t i, int64_t c) { right[i * cols + c] = static_cast<out_t>(v[i + perm[c] * cols]); });
  for (int64_t c = g.rank(); c < cols; c += g.size()) sigma_out[c] = static_cast<out_t>(sigma[perm[c]] * scale);
  return sweeps;
}

// ---- Householder QR ------------------------------------------------------------------------------------

// Per-matrix workspace of the QR: the column-major matrix [m * k], then tau [k].
RP_HD int64_t qr_workspace_size(int64_t m, int64_t k) { return m * k + k; }

// v^T x over rows i >= j of a subgroup, with the reflector v = (1, a[j+1:, j]) stored below the diagonal.
template <typename T, typename S>
RP_HD T reflector_dot(const S& s, const T* v, const T* x, int64_t j, int64_t m) {
  T part = T(0);
  for (int64_t i = j + s.rank(); i < m; i += s.size()) part += (i == j ? T(1) : v[i]) * x[i];
  return s.sum(part);
}

template <typename T>
inline T reflector_dot(const SerialGroup& s, const T* v, const T* x, int64_t j, int64_t m) {
  return x[j] + group_dot(s, v, x, j + 1, m);
}

// x[j:] -= w v over rows i >= j (the same rows this thread read in reflector_dot).
template <typename T, typename S>
RP_HD void reflector_update(const S& s, const T* v, T* x, int64_t j, int64_t m, T w) {
  for (int64_t i = j + s.rank(); i < m; i += s.size()) x[i] -= w * (i == j ? T(1) : v[i]);
}

template <typename T>
inline void reflector_update(const SerialGroup&, const T* v, T* x, int64_t j, int64_t m, T w) {
  x[j] -= w;
  for (int64_t i = j + 1; i < m; ++i) x[i] -= w * v[i];
}

// Q (and optionally R) of one m x k matrix (m >= k) at base (layout ref, rows = m). `work` holds
// qr_workspace_size(m, k) values of T. Writes q [m x k] and, when r is not null, r [k x k] upper
// triangular (row-major, row stride k) with the matrix = q r. Non-finite input gives NaN outputs.
template <typename T, typename scalar_t, typename out_t, typename G, typename S>
RP_HD void householder_qr_one(const G& g, const Teams<S>& tm, const scalar_t* base, const MatrixRef& ref, T* work,
                              out_t* q, out_t* r) {
  using std::sqrt;
  const int64_t m = ref.rows, k = ref.cols;
  T* a = work;
  T* tau = a + m * k;
  T scale = T(1);
  const LoadStatus status = load_scaled(g, base, ref, a, m, scale);
  if (status == LoadStatus::NonFinite) {
    const out_t nan = static_cast<out_t>(std::numeric_limits<T>::quiet_NaN());
    for_each_cell(g, m, k, [&](int64_t i, int64_t c) { q[i * k + c] = nan; });
    if (r != nullptr) for_each_cell(g, k, k, [&](int64_t i, int64_t c) { r[i * k + c] = nan; });
    return;
  }
  // Factorization (geqr2): H_j = I - tau_j v v^T zeroes a[j+1:, j].
  for (int64_t j = 0; j < k; ++j) {
    T* aj = a + j * m;
    const T alpha = aj[j];  // read before the barrier in group_dot: rank 0 overwrites it below
    const T s = group_dot(g, aj, aj, j + 1, m);
    T t = T(0), beta = alpha, inv = T(0);
    if (s > T(0)) {
      const T nrm = sqrt(alpha * alpha + s);
      beta = alpha >= T(0) ? -nrm : nrm;
      t = (beta - alpha) / beta;
      inv = T(1) / (alpha - beta);
    }
    for (int64_t i = j + 1 + g.rank(); i < m; i += g.size()) aj[i] *= inv;
    if (g.rank() == 0) {
      aj[j] = beta;
      tau[j] = t;
    }
    g.sync();
    if (t != T(0)) {
      for (int64_t c = j + 1 + tm.index; c < k; c += tm.count) {
        T* ac = a + c * m;
        reflector_update(tm.sub, aj, ac, j, m, t * reflector_dot(tm.sub, aj, ac, j, m));
      }
    }
    g.sync();
  }
  if (r != nullptr) {
    for_each_cell(g, k, k, [&](int64_t i, int64_t c) {
      r[i * k + c] = static_cast<out_t>(i <= c ? a[i + c * m] * scale : T(0));
    });
    g.sync();  // R is read before Q overwrites it
  }
  // Thin Q in place (org2r): backward accumulation of the reflectors.
  for (int64_t j = k - 1; j >= 0; --j) {
    const T* aj = a + j * m;
    const T t = tau[j];
    if (t != T(0)) {
      for (int64_t c = j + 1 + tm.index; c < k; c += tm.count) {
        T* ac = a + c * m;
        reflector_update(tm.sub, aj, ac, j, m, t * reflector_dot(tm.sub, aj, ac, j, m));
      }
    }
    g.sync();
    T* qj = a + j * m;
    for (int64_t i = g.rank(); i < m; i += g.size()) qj[i] = i < j ? T(0) : (i == j ? T(1) - t : -t * qj[i]);
    g.sync();
  }
  for_each_cell(g, m, k, [&](int64_t i, int64_t c) { q[i * k + c] = static_cast<out_t>(a[i + c * m]); });
}

}  // namespace rankprune
