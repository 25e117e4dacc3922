// Singular values of small matrices on one CPU thread, one matrix per SIMD lane.
//
// The per-matrix code of core/svdvals_small.h (SerialGroup) vectorizes along a matrix's columns. Below about
// 32 x 32 those columns are shorter than a few vectors, so its time goes to horizontal sums, masked tails and
// the scalar bookkeeping of the singular-value searches. Here kLanes matrices (8 in float, 4 in double) are
// interleaved element by element, a[i + j * rows][lane], and every step of the same algorithm is one vector
// operation across the matrices: loading with the power-of-two scale, Householder bidiagonalization (a lane
// whose reflector is the identity gets c = 0), the TGK setup and the grid, and the safeguarded Newton searches
// of SigmaSearch, whose branches become per-lane selections. Several values are searched at once as
// independent chains (kChains vectors), so that the latency of one chain's divisions hides behind the others.
// The arithmetic of each lane is that of svdvals_one, so the accuracy is the same; what differs is the number
// of passes a search runs: a chain waits for its slowest lane (capped at kSearchSteps).
#pragma once

#include <cmath>
#include <cstring>
#include <vector>

#include "core/svdvals_small.h"

namespace rankprune {

template <typename T>
struct LaneVec {
  static constexpr int kLanes = 32 / sizeof(T);
  typedef T V __attribute__((vector_size(32)));
  typedef decltype(V{} < V{}) M;  // all bits set where true

  static V splat(T x) { return V{} + x; }
  static V select(M m, V a, V b) { return V((M(a) & m) | (M(b) & ~m)); }
  static V abs(V x) { return select(x < V{}, -x, x); }
  static V max(V a, V b) { return select(a > b, a, b); }
  static V ones_where(M m) { return V(M(splat(T(1))) & m); }
  static bool any(M m) {
    for (int l = 0; l < kLanes; ++l)
      if (m[l]) return true;
    return false;
  }
  static V sqrt(V x) {
    V r;
    for (int l = 0; l < kLanes; ++l) r[l] = std::sqrt(x[l]);
    return r;
  }
};

// The pivots of TGK - x for kChains vectors of probes at once (see tgk_pivots): the Sturm count and
// p'(x) / p(x) per lane, and whether the last pivot is NaN.
template <int kChains, bool kClamp, typename T>
inline void lanes_pivots(const typename LaneVec<T>::V* b2, int64_t n, typename LaneVec<T>::V pivmin,
                         const typename LaneVec<T>::V* x, typename LaneVec<T>::V* below,
                         typename LaneVec<T>::V* slope, typename LaneVec<T>::M* nan_last) {
  using L = LaneVec<T>;
  using V = typename L::V;
  const V zero = V{}, one = L::splat(T(1));
  V r[kChains], u[kChains], sum[kChains], q[kChains], negative[kChains];
  for (int c = 0; c < kChains; ++c) {
    q[c] = -x[c];
    if (kClamp) q[c] = L::select(L::abs(q[c]) < pivmin, -pivmin, q[c]);
    r[c] = one / q[c];
    u[c] = -r[c];
    sum[c] = u[c];
    negative[c] = L::ones_where(q[c] < zero) - static_cast<T>(n);
  }
  for (int64_t k = 0; k < 2 * n - 1; ++k) {
    const V b = b2[k];
    for (int c = 0; c < kChains; ++c) {
      const V s = b * r[c];
      q[c] = -x[c] - s;
      if (kClamp) q[c] = L::select(L::abs(q[c]) < pivmin, -pivmin, q[c]);
      r[c] = one / q[c];
      u[c] = (s * u[c] - one) * r[c];
      sum[c] += u[c];
      negative[c] += L::ones_where(q[c] < zero);
    }
  }
  for (int c = 0; c < kChains; ++c) {
    below[c] = negative[c];
    slope[c] = sum[c];
    nan_last[c] = q[c] != q[c];
  }
}

// tgk_probe across the lanes: a lane whose last pivot is NaN (a zero pivot followed by a zero off-diagonal)
// takes the probe with the pivots clamped at -pivmin.
template <int kChains, typename T>
inline void lanes_probe(const typename LaneVec<T>::V* b2, int64_t n, typename LaneVec<T>::V pivmin,
                        const typename LaneVec<T>::V* x, typename LaneVec<T>::V* below,
                        typename LaneVec<T>::V* slope) {
  using L = LaneVec<T>;
  typename L::M nan_last[kChains];
  lanes_pivots<kChains, false, T>(b2, n, pivmin, x, below, slope, nan_last);
  bool any_nan = false;
  for (int c = 0; c < kChains; ++c) any_nan |= L::any(nan_last[c]);
  if (!any_nan) return;
  typename L::V clamped_below[kChains], clamped_slope[kChains];
  typename L::M unused[kChains];
  lanes_pivots<kChains, true, T>(b2, n, pivmin, x, clamped_below, clamped_slope, unused);
  for (int c = 0; c < kChains; ++c) {
    below[c] = L::select(nan_last[c], clamped_below[c], below[c]);
    slope[c] = L::select(nan_last[c], clamped_slope[c], slope[c]);
  }
}

// SigmaSearch across the lanes: lane l searches the value of ascending index `target` of its own matrix.
template <typename T>
struct LaneSearch {
  using L = LaneVec<T>;
  using V = typename L::V;
  using M = typename L::M;
  V target, lo, hi, below_lo, below_hi, x, last_step, value;
  M done;

  void start(T wanted, const V& tol, const V& bound, T n, const V* grid_x, const V* grid_below, int grid_count) {
    target = L::splat(wanted);
    lo = tol;
    below_lo = grid_below[0];
    hi = bound;
    below_hi = L::splat(n);
    M settled = V{} != V{};
    for (int j = 1; j < grid_count; ++j) {
      const M above = (grid_below[j] > target) & ~settled;
      const M below = ~(grid_below[j] > target) & ~settled;
      hi = L::select(above, grid_x[j], hi);
      below_hi = L::select(above, grid_below[j], below_hi);
      lo = L::select(below, grid_x[j], lo);
      below_lo = L::select(below, grid_below[j], below_lo);
      settled |= above;
    }
    x = T(0.5) * (lo + hi);
    last_step = hi - lo;
    done = target < grid_below[0];
    value = L::select(done, V{}, L::splat(T(-1)));
  }

  // One probe's result for every lane still searching (see SigmaSearch::update).
  void update(const V& below, const V& slope, const V& tol) {
    const M active = ~done;
    const M up = below > target;
    hi = L::select(active & up, x, hi);
    below_hi = L::select(active & up, below, below_hi);
    lo = L::select(active & ~up, x, lo);
    below_lo = L::select(active & ~up, below, below_lo);
    const V mid = T(0.5) * (lo + hi);
    const M finished = active & (hi - lo <= T(2) * tol);
    value = L::select(finished & ~((value >= lo) & (value <= hi)), mid, value);
    done |= finished;
    const M searching = active & ~finished;
    const M isolated = searching & (below_hi - below_lo == T(1));
    const V y = x * x - T(2) * x / slope;
    const V newton = L::sqrt(L::abs(y));
    value = L::select(isolated, newton, value);
    const V step = L::abs(newton - x);
    const M converged = isolated & (step <= tol);
    const M accepted = isolated & ~converged & (step <= T(0.5) * last_step);
    V next = L::select(converged, L::select(x == hi, newton - tol, newton + tol), mid);
    next = L::select(accepted, newton, next);
    next = L::select((next > lo) & (next < hi), next, mid);  // also NaN
    last_step = L::select(searching, L::abs(next - x), last_step);
    x = L::select(searching, next, x);
  }

  V result() const { return L::select(done, value, T(0.5) * (lo + hi)); }
};

// The Householder reflector I - c u u^T that maps (alpha, x) with |(alpha, x)|^2 = s onto (beta, 0), per lane
// (see bidiagonalize): u = (u0, x), u0 = alpha - beta; norm = |beta|. A lane whose s is below `negligible`
// gets the identity (c = 0) and norm 0.
template <typename T>
struct LaneReflector {
  typename LaneVec<T>::V norm, u0, c;
};
template <typename T>
inline LaneReflector<T> lane_reflector(typename LaneVec<T>::V s, typename LaneVec<T>::V alpha,
                                       typename LaneVec<T>::V negligible) {
  using L = LaneVec<T>;
  using V = typename L::V;
  const V root = L::sqrt(s);
  const V beta = L::select(s > negligible, L::select(alpha >= V{}, -root, root), V{});
  const V c = L::select(beta != V{}, T(1) / (beta * (beta - alpha)), V{});
  return {L::abs(beta), alpha - beta, c};
}

// The matrices at `bases` (kLanes pointers, repeats allowed), all shaped as `ref`, through svdvals_one's
// algorithm with the Values or Nuclear epilogue; lane l writes out + l * out_stride. `work` holds
// lanes_workspace_size(ref) vectors.
template <typename T>
inline int64_t lanes_workspace_size(const MatrixRef& ref) {
  return ref.rows * ref.cols + 5 * ref.cols + ref.rows + kMaxGrid;  // a, d, e, w, sigma, b2, grid counts
}

template <typename T, typename scalar_t, typename out_t>
inline void svdvals_lanes(const scalar_t* const* bases, const MatrixRef& ref, typename LaneVec<T>::V* work,
                          SvdvalsEpilogue epilogue, out_t* out, int64_t out_stride) {
  using L = LaneVec<T>;
  using V = typename L::V;
  using M = typename L::M;
  constexpr int kLanes = L::kLanes;
  constexpr int kChains = 4;
  const int64_t m = ref.rows, n = ref.cols, lda = m;
  V* a = work;
  V* d = a + lda * n;
  V* e = d + n;
  V* w = e + n;
  V* sigma = w + m;  // 2n: sigma, then the squared off-diagonal b2 (2n - 1)
  V* b2 = sigma + n;
  V* grid_below = b2 + 2 * n;  // kMaxGrid, then nothing

  // Load, with each lane's status; a lane that is zero or not finite computes on the identity instead and
  // gets its fill value at the end.
  V amax{};
  M finite = ~(V{} != V{});
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      V v;
      for (int l = 0; l < kLanes; ++l) v[l] = static_cast<T>(bases[l][i * ref.row_stride + j * ref.col_stride]);
      a[i + j * lda] = v;
      finite &= (v - v == V{});
      amax = L::max(amax, L::abs(v));
    }
  }
  const M zero_lane = finite & (amax == V{});
  const M bad = ~finite | zero_lane;
  V scale = L::splat(T(1)), inv_hi = scale, inv_lo = scale;
  for (int l = 0; l < kLanes; ++l) {
    if (bad[l]) continue;
    const PowerOfTwoScale<T> p = power_of_two_scale(amax[l]);
    scale[l] = p.scale;
    inv_hi[l] = p.inv_hi;
    inv_lo[l] = p.inv_lo;
  }
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < m; ++i) {
      const V identity = L::splat(i == j ? T(1) : T(0));
      a[i + j * lda] = L::select(bad, identity, a[i + j * lda] * inv_hi * inv_lo);
    }

  // Householder bidiagonalization (see bidiagonalize), every lane at once.
  const V negligible = L::splat(std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon());
  for (int64_t k = 0; k < n; ++k) {
    V* ak = a + k * lda;
    V s{};
    for (int64_t i = k; i < m; ++i) s += ak[i] * ak[i];
    const LaneReflector<T> left = lane_reflector<T>(s, ak[k], negligible);
    d[k] = left.norm;
    const V v0 = left.u0, c = left.c;
    for (int64_t j = k + 1; j < n; ++j) {
      V* aj = a + j * lda;
      V dot = v0 * aj[k];
      for (int64_t i = k + 1; i < m; ++i) dot += ak[i] * aj[i];
      const V wj = c * dot;
      aj[k] -= wj * v0;
      for (int64_t i = k + 1; i < m; ++i) aj[i] -= wj * ak[i];
    }
    if (k + 1 >= n) {
      e[k] = V{};
      break;
    }
    // Right reflector zeroing a[k, k+2:]: w = c2 (A u) over the rows below k, then one update per column.
    V s2{};
    for (int64_t j = k + 1; j < n; ++j) s2 += a[k + j * lda] * a[k + j * lda];
    const LaneReflector<T> right = lane_reflector<T>(s2, a[k + (k + 1) * lda], negligible);
    e[k] = right.norm;
    const V u0 = right.u0, c2 = right.c;
    for (int64_t i = k + 1; i < m; ++i) w[i] = u0 * a[i + (k + 1) * lda];
    for (int64_t j = k + 2; j < n; ++j) {
      const V ukj = a[k + j * lda];
      const V* col = a + j * lda;
      for (int64_t i = k + 1; i < m; ++i) w[i] += ukj * col[i];
    }
    for (int64_t i = k + 1; i < m; ++i) w[i] *= c2;
    for (int64_t j = k + 1; j < n; ++j) {
      const V ukj = j == k + 1 ? u0 : a[k + j * lda];
      V* col = a + j * lda;
      for (int64_t i = k + 1; i < m; ++i) col[i] -= w[i] * ukj;
    }
  }

  // TGK: squared off-diagonal, bound, pivmin and tol per lane (see tgk_setup).
  for (int64_t k = 0; k < 2 * n - 1; ++k) {
    const V b = (k & 1) ? e[k >> 1] : d[k >> 1];
    b2[k] = b * b;
  }
  V maxsq = L::splat(T(1)), bound{};
  for (int64_t k = 0; k < n; ++k) {
    const V left = k > 0 ? e[k - 1] : V{}, right = k + 1 < n ? e[k] : V{};
    bound = L::max(bound, d[k] + L::max(left, right));
    maxsq = L::max(maxsq, L::max(d[k] * d[k], e[k] * e[k]));
  }
  bound *= T(1) + T(8) * std::numeric_limits<T>::epsilon();
  const V pivmin = std::numeric_limits<T>::min() * maxsq;
  const V tol = std::numeric_limits<T>::epsilon() * bound;

  // The shared grid (see bidiagonal_svdvals), kChains probes at a time.
  const int grid_count = n <= 16 ? 16 : kMaxGrid;
  V grid_x[kMaxGrid], grid_slope[kMaxGrid];
  for (int j = 0; j < grid_count; ++j)
    grid_x[j] = j == 0 ? tol : tol + (bound - tol) * static_cast<T>(j) / static_cast<T>(grid_count);
  for (int j = 0; j < grid_count; j += kChains)
    lanes_probe<kChains, T>(b2, n, pivmin, grid_x + j, grid_below + j, grid_slope + j);

  // kChains values at a time, a chain taking the next value once all its lanes are done.
  LaneSearch<T> search[kChains];
  int64_t owner[kChains];
  int passes[kChains];
  int64_t next_value = 0;
  V x[kChains], below[kChains], slope[kChains];
  auto refill = [&](int c) {
    owner[c] = -1;
    if (next_value >= n) return;
    owner[c] = next_value++;
    passes[c] = 0;
    search[c].start(static_cast<T>(n - 1 - owner[c]), tol, bound, static_cast<T>(n), grid_x, grid_below,
                    grid_count);
    x[c] = search[c].x;
  };
  auto finished = [&](int c) {
    for (int l = 0; l < kLanes; ++l)
      if (!search[c].done[l]) return false;
    return true;
  };
  for (int c = 0; c < kChains; ++c) refill(c);
  for (;;) {
    for (int c = 0; c < kChains; ++c) {
      while (owner[c] >= 0 && (finished(c) || passes[c] >= kSearchSteps<T>)) {
        sigma[owner[c]] = search[c].result();
        refill(c);
      }
    }
    bool active = false;
    for (int c = 0; c < kChains; ++c) active |= owner[c] >= 0;
    if (!active) break;
    lanes_probe<kChains, T>(b2, n, pivmin, x, below, slope);  // idle chains probe at their last x, harmlessly
    for (int c = 0; c < kChains; ++c) {
      if (owner[c] < 0) continue;
      search[c].update(below[c], slope[c], tol);
      x[c] = search[c].x;
      ++passes[c];
    }
  }

  // Epilogue per lane: descending order restored (values within tol may come out swapped), scaled back.
  for (int l = 0; l < kLanes; ++l) {
    out_t* o = out + l * out_stride;
    if (bad[l]) {
      const out_t fill = zero_lane[l] ? out_t(0) : out_t(std::numeric_limits<T>::quiet_NaN());
      if (epilogue == SvdvalsEpilogue::Values)
        for (int64_t i = 0; i < n; ++i) o[i] = fill;
      else
        o[0] = fill;
      continue;
    }
    if (epilogue == SvdvalsEpilogue::Values) {
      for (int64_t i = 0; i < n; ++i) {
        const out_t v = static_cast<out_t>(sigma[i][l] * scale[l]);
        int64_t j = i;
        for (; j > 0 && o[j - 1] < v; --j) o[j] = o[j - 1];
        o[j] = v;
      }
    } else {
      T total = T(0);
      for (int64_t i = 0; i < n; ++i) total += sigma[i][l];
      o[0] = static_cast<out_t>(total * scale[l]);
    }
  }
}

}  // namespace rankprune
