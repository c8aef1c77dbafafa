// knn_graph, CUDA kernel: cuBLAS Gram tiles + one thread block per row that selects the
// C best candidates (C rounds of a block-wide lexicographic arg-min over the row, no
// sort, no marking), recomputes their exact fp64 distances from the scaled input (one warp per
// candidate) and keeps the k best. Same algorithm and tie rule as the CPU kernel (knn_graph.h).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>

#include "knn_graph.h"

namespace exgramed {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename acc_t>
struct DistIdx {
  acc_t d;
  int64_t j;
};

template <typename acc_t>
__device__ __forceinline__ bool lex_less(acc_t da, int64_t ja, acc_t db, int64_t jb) {
  return da < db || (da == db && ja < jb);
}

template <typename acc_t>
__device__ __forceinline__ void warp_argmin(acc_t& d, int64_t& j) {
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t od = __shfl_down_sync(0xffffffffu, d, off);
    const int64_t oj = __shfl_down_sync(0xffffffffu, j, off);
    if (lex_less(od, oj, d, j)) {
      d = od;
      j = oj;
    }
  }
}

// Block-wide lexicographic arg-min; every thread gets the result.
template <typename acc_t>
__device__ DistIdx<acc_t> block_argmin(acc_t d, int64_t j, DistIdx<acc_t>* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_argmin(d, j);
  if (lane == 0) scratch[warp] = {d, j};
  __syncthreads();
  if (warp == 0) {
    d = lane < kWarps ? scratch[lane].d : std::numeric_limits<acc_t>::infinity();
    j = lane < kWarps ? scratch[lane].j : INT64_MAX;
    warp_argmin(d, j);
    if (lane == 0) scratch[kWarps] = {d, j};
  }
  __syncthreads();
  const DistIdx<acc_t> r = scratch[kWarps];
  __syncthreads();
  return r;
}

// xs: knn_scaled_input's float64 [G, N, d]; norms: its float64 row norms.
template <typename acc_t>
__global__ void knn_select_kernel(const double* __restrict__ xs, const double* __restrict__ norms,
                                  const acc_t* __restrict__ gram, const acc_t* __restrict__ sq, int64_t N,
                                  int64_t d, int64_t k, int64_t C, bool l2, int64_t row0, int64_t nrows,
                                  int64_t* __restrict__ out) {
  const int64_t g = blockIdx.y;
  const int64_t r = blockIdx.x;
  const int64_t i = row0 + r;
  const acc_t* grow = gram + (g * nrows + r) * N;
  const acc_t* sqg = sq + g * N;
  const double* xg = xs + g * N * d;
  const double* ng = norms + g * N;

  extern __shared__ unsigned char smem_raw[];
  int64_t* cand = reinterpret_cast<int64_t*>(smem_raw);
  double* exact = reinterpret_cast<double*>(cand + C);
  __shared__ DistIdx<acc_t> scratch[kWarps + 1];

  // Phase 1: the C smallest approximate distances, in (distance, index) order.
  acc_t prev_d = -std::numeric_limits<acc_t>::infinity();
  int64_t prev_j = -1;
  for (int64_t c = 0; c < C; ++c) {
    acc_t best_d = std::numeric_limits<acc_t>::infinity();
    int64_t best_j = INT64_MAX;
    for (int64_t j = threadIdx.x; j < N; j += kThreads) {
      if (j == i) continue;
      const acc_t dist = l2 ? sqg[i] + sqg[j] - acc_t(2) * grow[j] : acc_t(1) - grow[j];
      if (lex_less(prev_d, prev_j, dist, j) && lex_less(dist, j, best_d, best_j)) {
        best_d = dist;
        best_j = j;
      }
    }
    const DistIdx<acc_t> m = block_argmin(best_d, best_j, scratch);
    if (threadIdx.x == 0) cand[c] = m.j;
    prev_d = m.d;
    prev_j = m.j;
  }
  __syncthreads();

  // Phase 2: exact fp64 distances of the candidates, one warp per candidate.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const double* xi = xg + i * d;
  for (int64_t c = warp; c < C; c += kWarps) {
    const int64_t j = cand[c];
    const double* xj = xg + j * d;
    double acc = 0.0;
    for (int64_t t = lane; t < d; t += 32) {
      const double a = xi[t], b = xj[t];
      acc += l2 ? (a - b) * (a - b) : a * b;
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      if (!l2) acc = (ng[i] == 0.0 || ng[j] == 0.0) ? 1.0 : 1.0 - acc / (ng[i] * ng[j]);
      exact[c] = acc;
    }
  }
  __syncthreads();

  // Phase 3: order the C candidates by (exact distance, index); keep k.
  if (threadIdx.x == 0) {
    for (int64_t a = 1; a < C; ++a) {
      const double dv = exact[a];
      const int64_t jv = cand[a];
      int64_t p = a;
      while (p > 0 && (dv < exact[p - 1] || (dv == exact[p - 1] && jv < cand[p - 1]))) {
        exact[p] = exact[p - 1];
        cand[p] = cand[p - 1];
        --p;
      }
      exact[p] = dv;
      cand[p] = jv;
    }
    int64_t* o = out + (g * N + i) * k;
    for (int64_t s = 0; s < k; ++s) o[s] = cand[s];
  }
}

at::Tensor knn_graph_cuda(const at::Tensor& x_in, int64_t k, c10::string_view metric_name) {
  const KnnMetric metric = parse_knn_metric(std::string_view(metric_name.data(), metric_name.size()));
  TORCH_CHECK(x_in.is_cuda(), "knn_graph: x must be a CUDA tensor for the CUDA kernel");
  check_knn_args(x_in, k, /*check_values=*/false);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t G = x_in.size(0), N = x_in.size(1), d = x_in.size(2);
  at::Tensor out = at::empty({G, N, k}, x_in.options().dtype(at::kLong));
  if (G == 0) return out;
  const at::Tensor xs = knn_scaled_input(x_in, metric);  // also the NaN/Inf check of x (one sync)
  const at::Tensor sq64 = xs.square().sum(-1);
  const at::Tensor norms = sq64.sqrt().contiguous();
  const KnnGramInputs in = knn_gram_inputs(xs, metric, sq64, compute_dtype(x_in.scalar_type()));
  const int64_t C = knn_num_candidates(k, N);
  // Row blocks across all graphs bound the Gram buffer to ~2^26 entries.
  const int64_t R = std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(1) << 26) / (G * N)));
  const size_t smem = static_cast<size_t>(C) * (sizeof(int64_t) + sizeof(double));
  TORCH_CHECK(smem <= 48 * 1024, "knn_graph: k = ", k, " is too large for the CUDA kernel (k + ", kKnnSlack,
              " candidates must fit in shared memory)");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.xc.scalar_type(), "knn_graph_cuda", [&] {
    using acc_t = scalar_t;
    for (int64_t r0 = 0; r0 < N; r0 += R) {
      const int64_t nr = std::min(R, N - r0);
      const at::Tensor gram = at::matmul(in.xc.narrow(1, r0, nr), in.xc.transpose(1, 2)).contiguous();
      const dim3 grid(static_cast<unsigned>(nr), static_cast<unsigned>(G));
      knn_select_kernel<acc_t><<<grid, kThreads, smem, stream>>>(
          xs.data_ptr<double>(), norms.data_ptr<double>(), gram.data_ptr<acc_t>(), in.sq.data_ptr<acc_t>(), N, d,
          k, C, metric == KnnMetric::L2, r0, nr, out.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) { m.impl("knn_graph", &knn_graph_cuda); }

}  // namespace exgramed
