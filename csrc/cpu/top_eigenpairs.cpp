#include "top_eigenpairs.h"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "../common/counter_normal.h"
#include "vector_clones.h"

namespace decaf {
namespace {

constexpr double kEps = DBL_EPSILON;

// Householder reduction of the symmetric H (row-major, full storage) to the tridiagonal
// T = Q^T H Q (diagonal diag [K], off-diagonal off [K-1]). Reflector k < K-2 acts on indices
// k+1..K-1 as I - tau[k] v v^T with v = (1, H[k][k+2..K-1]) (stored in row k of H). Its O(K^3)
// row updates vectorize.
DECAF_VECTOR_CLONES void tridiagonalize(double* H, int64_t K, double* diag, double* off, double* tau, double* w) {
  for (int64_t k = 0; k + 2 < K; ++k) {
    const int64_t n2 = K - 1 - k;
    double* v = H + k * K + k + 1;  // row k right of the diagonal (= column k below it)
    double tail = 0.0;
    for (int64_t i = 1; i < n2; ++i) tail += v[i] * v[i];
    const double alpha = v[0];
    if (tail == 0.0) {  // nothing to annihilate
      tau[k] = 0.0;
      off[k] = alpha;
      continue;
    }
    const double beta = -std::copysign(std::sqrt(alpha * alpha + tail), alpha);
    const double t = (beta - alpha) / beta, scale = 1.0 / (alpha - beta);
    tau[k] = t;
    off[k] = beta;
    v[0] = 1.0;
    for (int64_t i = 1; i < n2; ++i) v[i] *= scale;
    // Trailing block A <- A - v w^T - w v^T with p = t A v, w = p - (t/2)(p^T v) v.
    double* A = H + (k + 1) * K + k + 1;
    std::fill(w, w + n2, 0.0);
    for (int64_t j = 0; j < n2; ++j) {
      const double s = t * v[j];
      const double* row = A + j * K;
      for (int64_t i = 0; i < n2; ++i) w[i] += s * row[i];
    }
    double pv = 0.0;
    for (int64_t i = 0; i < n2; ++i) pv += w[i] * v[i];
    const double c = -0.5 * t * pv;
    for (int64_t i = 0; i < n2; ++i) w[i] += c * v[i];
    for (int64_t i = 0; i < n2; ++i) {
      double* row = A + i * K;
      const double vi = v[i], wi = w[i];
      for (int64_t j = 0; j < n2; ++j) row[j] -= vi * w[j] + wi * v[j];
    }
  }
  for (int64_t i = 0; i < K; ++i) diag[i] = H[i * K + i];
  if (K >= 2) off[K - 2] = H[(K - 2) * K + K - 1];
}

// For each of the points x [n]: the number of eigenvalues of T below it (Sturm count: the negative
// pivots t_i of T - x I = L D L^T, pivots below pivmin in magnitude counted as -pivmin) and
// S = d/dx log|det(T - x I)| = sum_i t_i'/t_i (Newton's step for det is -1/S). One division per
// pivot. The points go in blocks of kW recurrences run in lockstep in local arrays (registers), so
// that their divisions overlap; a short last block repeats its last point.
template <int64_t kW>
void counts_and_slopes_in_blocks(const double* diag, const double* off2, int64_t K, const double* x, int64_t n,
                                 double pivmin, double* count_out, double* S_out) {
  for (int64_t s0 = 0; s0 < n; s0 += kW) {
    double xs[kW], t[kW], dt[kW], S[kW], count[kW];
#pragma GCC unroll 8
    for (int64_t s = 0; s < kW; ++s) {
      xs[s] = x[std::min(s0 + s, n - 1)];
      const double v = diag[0] - xs[s];
      t[s] = std::abs(v) < pivmin ? -pivmin : v;
      dt[s] = -1.0;
      S[s] = 0.0;
      count[s] = t[s] < 0.0 ? 1.0 : 0.0;
    }
    for (int64_t i = 1; i < K; ++i) {
      const double d = diag[i], e2 = off2[i - 1];
#pragma GCC unroll 8
      for (int64_t s = 0; s < kW; ++s) {
        const double r = 1.0 / t[s], qv = e2 * r;
        S[s] += dt[s] * r;
        dt[s] = qv * r * dt[s] - 1.0;
        const double v = d - xs[s] - qv;
        t[s] = std::abs(v) < pivmin ? -pivmin : v;
        count[s] += t[s] < 0.0 ? 1.0 : 0.0;
      }
    }
    for (int64_t s = 0; s < kW && s0 + s < n; ++s) {
      S_out[s0 + s] = S[s] + dt[s] / t[s];
      count_out[s0 + s] = count[s];
    }
  }
}

// counts_and_slopes_in_blocks with blocks no wider than the points need (2, 4 or 8).
void counts_and_slopes(const double* diag, const double* off2, int64_t K, const double* x, int64_t n, double pivmin,
                       double* count, double* S) {
  if (n <= 2)
    counts_and_slopes_in_blocks<2>(diag, off2, K, x, n, pivmin, count, S);
  else if (n <= 4)
    counts_and_slopes_in_blocks<4>(diag, off2, K, x, n, pivmin, count, S);
  else
    counts_and_slopes_in_blocks<8>(diag, off2, K, x, n, pivmin, count, S);
}

// LU factorization with partial pivoting of T - shift I (LAPACK dgttrf), pivots below `floor` in
// magnitude raised to it, and solves with it (dgtts2). After factor(), d holds the reciprocals of the
// pivots, so that the back substitution multiplies (no division in its dependency chain).
struct ShiftedLU {
  int64_t K;
  double *dl, *d, *du, *du2, *swap;

  void factor(const double* diag, const double* off, double shift, double floor) {
    for (int64_t i = 0; i < K; ++i) d[i] = diag[i] - shift;
    for (int64_t i = 0; i + 1 < K; ++i) dl[i] = du[i] = off[i];
    for (int64_t i = 0; i + 1 < K; ++i) {
      if (i + 2 < K) du2[i] = 0.0;
      if (std::abs(d[i]) >= std::abs(dl[i])) {
        swap[i] = 0.0;
        if (d[i] != 0.0) {
          dl[i] /= d[i];
          d[i + 1] -= dl[i] * du[i];
        }
      } else {
        swap[i] = 1.0;
        const double f = d[i] / dl[i];
        d[i] = dl[i];
        dl[i] = f;
        const double up = du[i];
        du[i] = d[i + 1];
        d[i + 1] = up - f * d[i + 1];
        if (i + 2 < K) {
          du2[i] = du[i + 1];
          du[i + 1] = -f * du[i + 1];
        }
      }
    }
    for (int64_t i = 0; i < K; ++i) d[i] = 1.0 / (std::abs(d[i]) < floor ? (d[i] < 0.0 ? -floor : floor) : d[i]);
  }

  void solve(double* b) const {
    for (int64_t i = 0; i + 1 < K; ++i) {
      if (swap[i] != 0.0) {
        const double t = b[i];
        b[i] = b[i + 1];
        b[i + 1] = t - dl[i] * b[i];
      } else {
        b[i + 1] -= dl[i] * b[i];
      }
    }
    b[K - 1] *= d[K - 1];
    if (K >= 2) b[K - 2] = (b[K - 2] - du[K - 2] * b[K - 1]) * d[K - 2];
    for (int64_t i = K - 3; i >= 0; --i) b[i] = (b[i] - du[i] * b[i + 1] - du2[i] * b[i + 2]) * d[i];
  }
};

double dot(const double* x, const double* y, int64_t K) {
  double s = 0.0;
  for (int64_t i = 0; i < K; ++i) s += x[i] * y[i];
  return s;
}

}  // namespace

bool top_eigenpairs(double* H, int64_t K, int64_t q, double* values, double* X, std::vector<double>& scratch) {
  scratch.resize((size_t)(10 * K + q * K + 8 * q));
  double* diag = scratch.data();
  double* off = diag + K;
  double* off2 = off + K;
  double* tau = off2 + K;
  double* w = tau + K;
  ShiftedLU lu{K, w + K, w + 2 * K, w + 3 * K, w + 4 * K, w + 5 * K};
  double* Z = w + 6 * K;  // [q, K]: eigenvectors of T, one per row
  tridiagonalize(H, K, diag, off, tau, w);

  // Work on T / ||T|| (Gershgorin bound), so that pivot floors and growth are scale-free.
  double norm = 0.0;
  for (int64_t i = 0; i < K; ++i) {
    const double radius = (i > 0 ? std::abs(off[i - 1]) : 0.0) + (i + 1 < K ? std::abs(off[i]) : 0.0);
    norm = std::max(norm, std::abs(diag[i]) + radius);
  }
  const double scale = norm > 0.0 ? norm : 1.0;  // H = 0: every eigenvalue is exactly 0
  for (int64_t i = 0; i < K; ++i) diag[i] /= scale;
  double max_off2 = 0.0;
  for (int64_t i = 0; i + 1 < K; ++i) {
    off[i] /= scale;
    off2[i] = off[i] * off[i];
    max_off2 = std::max(max_off2, off2[i]);
  }
  const double pivmin = DBL_MIN * std::max(1.0, max_off2);
  const double slack = 2.0 * K * kEps + 2.0 * pivmin;
  const double res_tol = 64.0 * K * kEps;

  // The eigenvalues of ascending index e = K-1-l, all l at once, by safeguarded Newton steps on
  // det(T - x I): each evaluated point narrows the bracket, whose Sturm counts keep
  // clo[l] <= e < chi[l]; once the bracket holds that one eigenvalue alone, a Newton step that stays
  // inside it replaces the midpoint. A search unfinished after 96 rounds returns false.
  double* lo = Z + q * K;
  double* hi = lo + q;
  double* at = hi + q;  // current point of each search
  double* count = at + q;
  double* S = count + q;
  double* clo = S + q;
  double* chi = clo + q;
  double* done = chi + q;
  for (int64_t l = 0; l < q; ++l) {
    lo[l] = -1.0 - slack;  // |eigenvalues of T / ||T||| <= 1
    hi[l] = 1.0 + slack;
    clo[l] = 0.0;
    chi[l] = (double)K;
    at[l] = 0.5 * (lo[l] + hi[l]);
    done[l] = 0.0;
  }
  for (int iter = 0; iter < 96; ++iter) {
    counts_and_slopes(diag, off2, K, at, q, pivmin, count, S);
    bool all_done = true;
    for (int64_t l = 0; l < q; ++l) {
      if (done[l] != 0.0) continue;
      const double e = (double)(K - 1 - l);
      if (count[l] <= e) {
        lo[l] = at[l];
        clo[l] = count[l];
      } else {
        hi[l] = at[l];
        chi[l] = count[l];
      }
      const double step = -1.0 / S[l], next = at[l] + step;
      const bool alone = chi[l] - clo[l] == 1.0;
      if (alone && std::abs(step) <= 4.0 * kEps && next >= lo[l] && next <= hi[l]) {
        at[l] = next;
        done[l] = 1.0;
      } else if (hi[l] - lo[l] <= 2.0 * kEps) {
        at[l] = 0.5 * (lo[l] + hi[l]);
        done[l] = 1.0;
      } else {
        at[l] = alone && next > lo[l] && next < hi[l] ? next : 0.5 * (lo[l] + hi[l]);
        all_done = false;
      }
    }
    if (all_done) break;
  }
  for (int64_t l = 0; l < q; ++l)
    if (done[l] == 0.0) return false;
  for (int64_t l = 0; l < q; ++l) values[l] = at[l];
  for (int64_t l = 0; l < q; ++l) {
    const double lambda = values[l];
    values[l] = lambda * norm;
    // Inverse iteration from a fixed pseudo-random start (uniform entries), orthogonal to the vectors
    // found before.
    double* z = Z + l * K;
    for (int64_t i = 0; i < K; ++i)
      z[i] = (double)(splitmix64((uint64_t)(l * K + i)) >> 11) * (2.0 / 9007199254740992.0) - 1.0;  // [-1, 1)
    lu.factor(diag, off, lambda, kEps);
    bool converged = false;
    for (int iter = 0; iter < 8 && !converged; ++iter) {
      lu.solve(z);
      for (int pass = 0; pass < 2; ++pass)
        for (int64_t p = 0; p < l; ++p) {
          const double c = dot(Z + p * K, z, K);
          for (int64_t i = 0; i < K; ++i) z[i] -= c * Z[p * K + i];
        }
      const double nz = std::sqrt(dot(z, z, K));
      if (!(nz > 0.0) || !std::isfinite(nz)) return false;
      for (int64_t i = 0; i < K; ++i) z[i] /= nz;
      double res = 0.0;
      for (int64_t i = 0; i < K; ++i) {
        double v = (diag[i] - lambda) * z[i];
        if (i > 0) v += off[i - 1] * z[i - 1];
        if (i + 1 < K) v += off[i] * z[i + 1];
        res += v * v;
      }
      converged = std::sqrt(res) <= res_tol;
    }
    if (!converged) return false;
  }
  // X = Q Z^T: Z^T into X [K, q], then the reflectors in reverse order, each applied to the q
  // columns at once (s [q] = tau X^T v, X -= v s^T: loops over the q columns vectorize).
  for (int64_t l = 0; l < q; ++l)
    for (int64_t i = 0; i < K; ++i) X[i * q + l] = Z[l * K + i];
  double* s = w;  // [q] (w is free after the tridiagonalization; q <= K)
  for (int64_t k = K - 3; k >= 0; --k) {
    if (tau[k] == 0.0) continue;
    const double* v = H + k * K + k + 1;  // v[0] = 1
    double* rows = X + (k + 1) * q;       // rows k+1.. of X
    const int64_t n2 = K - 1 - k;
    for (int64_t l = 0; l < q; ++l) s[l] = rows[l];
    for (int64_t i = 1; i < n2; ++i)
      for (int64_t l = 0; l < q; ++l) s[l] += v[i] * rows[i * q + l];
    for (int64_t l = 0; l < q; ++l) s[l] *= tau[k];
    for (int64_t l = 0; l < q; ++l) rows[l] -= s[l];
    for (int64_t i = 1; i < n2; ++i)
      for (int64_t l = 0; l < q; ++l) rows[i * q + l] -= s[l] * v[i];
  }
  return true;
}

}  // namespace decaf
