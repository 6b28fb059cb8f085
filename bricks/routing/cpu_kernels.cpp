// One decode token through an activation-sparse SwiGLU FFN on the CPU, reading only the kept weight rows (TEAL).
// Built and loaded by cpu_kernels.py, which says why it exists; SparseFFN's docstring says what it computes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace {

// Columns each thread accumulates at a time: 8 KB of fp32 sums, which stay in the core's L1 cache while the
// kept rows stream past.
constexpr int64_t TILE = 2048;
// The kept rows lie far apart, and the hardware prefetcher does not start a new row's stream by itself: each
// row would begin with a wait for memory. Touching the first two cache lines of the row AHEAD rows on starts
// it early; on the machine this was written on, 1-16 rows ahead and 1-4 lines did alike, several times faster
// than no prefetch, and prefetching whole rows was slower (bench/README.md).
constexpr int64_t AHEAD = 4;
// Fewest columns worth handing to another thread.
constexpr int64_t GRAIN = 256;

// Magnitude used for ranking; NaN ranks first, as in torch.topk, so that a NaN input is kept and shows.
inline float magnitude(float v) {
  return std::isnan(v) ? std::numeric_limits<float>::infinity() : std::abs(v);
}

// Indices of the kept entries of v[0, n), in increasing order (the weight rows in memory order): the `keep`
// largest magnitudes when keep >= 0, else those above `threshold`. The top-k finds the keep-th largest magnitude
// on a copy of the magnitudes (no index indirection in the partition) and collects the indices in one pass, in
// order, so there is nothing to sort.
std::vector<int64_t> kept(const float* v, int64_t n, int64_t keep, float threshold) {
  std::vector<int64_t> idx;
  if (keep < 0 || keep >= n) {
    idx.reserve(keep < 0 ? n : keep);
    for (int64_t i = 0; i < n; ++i) {
      if (keep >= n || magnitude(v[i]) > threshold) idx.push_back(i);
    }
    return idx;
  }
  idx.reserve(keep);
  if (keep == 0) return idx;
  std::vector<float> m(n);
  for (int64_t i = 0; i < n; ++i) m[i] = magnitude(v[i]);
  std::vector<float> order(m);
  std::nth_element(order.begin(), order.begin() + (keep - 1), order.end(), std::greater<float>());
  const float kth = order[keep - 1];
  // Entries above the keep-th magnitude are kept; ties with it fill the remaining places, first come first kept.
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += m[i] > kth;
  int64_t ties = keep - above;
  for (int64_t i = 0; i < n; ++i) {
    if (m[i] > kth || (m[i] == kth && ties-- > 0)) idx.push_back(i);
  }
  return idx;
}

// out[c] = sum over j of v[idx[j]] * w[idx[j], c] for c in [0, width): the columns split over the threads, each
// thread's columns in tiles; fp32 sums whatever the weights' dtype.
template <typename T>
void rows_sum(const T* w, int64_t width, const std::vector<int64_t>& idx, const float* v, float* out, bool parallel) {
  const int64_t n = static_cast<int64_t>(idx.size());
  auto columns = [&](int64_t begin, int64_t end) {
    float acc[TILE];
    for (int64_t c0 = begin; c0 < end; c0 += TILE) {
      const int64_t len = std::min(TILE, end - c0);
      std::fill(acc, acc + len, 0.0f);
      for (int64_t j = 0; j < n; ++j) {
        if (j + AHEAD < n) {  // start the stream of a row ahead: the hardware prefetcher follows it from there
          const char* next = reinterpret_cast<const char*>(w + idx[j + AHEAD] * width + c0);
          __builtin_prefetch(next, 0, 3);
          __builtin_prefetch(next + 64, 0, 3);
        }
        const T* row = w + idx[j] * width + c0;
        const float s = v[idx[j]];
        for (int64_t k = 0; k < len; ++k) acc[k] += s * static_cast<float>(row[k]);
      }
      std::copy(acc, acc + len, out + c0);
    }
  };
  if (parallel) {
    at::parallel_for(0, width, GRAIN, columns);
  } else {
    columns(0, width);
  }
}

template <typename T>
at::Tensor token(const at::Tensor& x, const at::Tensor& w_in_t, const at::Tensor& w_down_t, int64_t keep_in,
                 int64_t keep_act, double t_in, double t_act, bool parallel, at::Tensor& counts) {
  const int64_t hidden = x.size(0), width = w_in_t.size(1), d_ff = width / 2;
  std::vector<float> xf(hidden), h(width), a(d_ff), y(hidden);
  const T* xp = x.data_ptr<T>();
  for (int64_t i = 0; i < hidden; ++i) xf[i] = static_cast<float>(xp[i]);

  const std::vector<int64_t> in = kept(xf.data(), hidden, keep_in, static_cast<float>(t_in));
  rows_sum(w_in_t.data_ptr<T>(), width, in, xf.data(), h.data(), parallel);
  for (int64_t i = 0; i < d_ff; ++i) {  // SwiGLU: silu(gate) * up, gate first as in SparseFFN's w_in_t
    const float g = h[i];
    a[i] = g / (1.0f + std::exp(-g)) * h[d_ff + i];
  }
  const std::vector<int64_t> act = kept(a.data(), d_ff, keep_act, static_cast<float>(t_act));
  rows_sum(w_down_t.data_ptr<T>(), hidden, act, a.data(), y.data(), parallel);

  int64_t* c = counts.data_ptr<int64_t>();
  c[0] += 1;
  c[1] += static_cast<int64_t>(in.size());
  c[2] += static_cast<int64_t>(act.size());
  at::Tensor out = at::empty({hidden}, x.options());
  T* op = out.data_ptr<T>();
  for (int64_t i = 0; i < hidden; ++i) op[i] = static_cast<T>(y[i]);
  return out;
}

// y [hidden] of one token x [hidden]: keep_in / keep_act >= 0 keep that many entries by magnitude (top-k), < 0
// keep those above t_in / t_act (calibrated thresholds). `parallel`: the columns over torch's threads, else on
// the calling thread (no change of the thread count, which costs the other operations of a decode step).
// counts [3] (int64) gains the token and the rows read.
at::Tensor teal_token(const at::Tensor& x, const at::Tensor& w_in_t, const at::Tensor& w_down_t, int64_t keep_in,
                      int64_t keep_act, double t_in, double t_act, bool parallel, at::Tensor counts) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "teal_token: x must be one contiguous token [hidden]");
  TORCH_CHECK(w_in_t.dim() == 2 && w_in_t.is_contiguous() && w_in_t.size(0) == x.size(0) && w_in_t.size(1) % 2 == 0,
              "teal_token: w_in_t must be a contiguous [hidden, 2 * d_ff] gate|up weight");
  TORCH_CHECK(w_down_t.dim() == 2 && w_down_t.is_contiguous() && w_down_t.size(0) * 2 == w_in_t.size(1) &&
                  w_down_t.size(1) == x.size(0),
              "teal_token: w_down_t must be a contiguous [d_ff, hidden] down weight");
  TORCH_CHECK(x.scalar_type() == w_in_t.scalar_type() && x.scalar_type() == w_down_t.scalar_type(),
              "teal_token: x and the weights must share one dtype");
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.numel() == 3 && counts.is_contiguous(),
              "teal_token: counts must be 3 contiguous int64");
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "teal_token", [&] {
    out = token<scalar_t>(x, w_in_t, w_down_t, keep_in, keep_act, t_in, t_act, parallel, counts);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(bricks, m) {
  m.def("teal_token(Tensor x, Tensor w_in_t, Tensor w_down_t, int keep_in, int keep_act, float t_in, float t_act, "
        "bool parallel, Tensor(a!) counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(bricks, CPU, m) {
  m.impl("teal_token", &teal_token);
}
