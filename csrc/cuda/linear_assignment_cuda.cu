// linear_assignment, CUDA kernel: the CPU algorithm (assignment.h: shortest augmenting paths
// with dual potentials, greedy tight start, ties to a free column then the lowest index) with
// one thread block per problem. Each Dijkstra step relaxes the row's columns in parallel (column
// j belongs to thread j % blockDim) and picks the next column by a block-wide lexicographic
// arg-min (distance, not-free, index) in shared memory; the dual update is parallel over columns
// (the scanned rows are the owners of the scanned columns); the path augmentation is done by one
// thread. All problems stay on the device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "checks.h"
#include "cuda/lap_cuda.cuh"

namespace exgramed {
namespace {

constexpr int kLapThreads = 256;

__device__ __forceinline__ bool cand_better(double d1, int f1, int j1, double d2, int f2, int j2) {
  return d1 < d2 || (d1 == d2 && (f1 > f2 || (f1 == f2 && j1 < j2)));
}

__global__ void lap_kernel(const double* __restrict__ S, int64_t n, double sign, bool clamp, bool warm,
                           double* __restrict__ u_all, double* __restrict__ v_all, double* __restrict__ spc_all,
                           int* __restrict__ row4col_all, int* __restrict__ col4row_all, int* __restrict__ path_all,
                           int* __restrict__ done_all, int64_t* __restrict__ out) {
  const int64_t b = blockIdx.x;
  const int tid = threadIdx.x, nt = blockDim.x;
  const double* Sb = S + b * n * n;
  double* u = u_all + b * n;
  double* v = v_all + b * n;
  double* spc = spc_all + b * n;
  int* row4col = row4col_all + b * n;
  int* col4row = col4row_all + b * n;
  int* path = path_all + b * n;
  int* done = done_all + b * n;
  __shared__ double sd[kLapThreads];
  __shared__ int sf[kLapThreads];
  __shared__ int sj[kLapThreads];
  __shared__ double s_min;
  __shared__ int s_i, s_sink;
  const double inf = INFINITY;
  auto cost = [&](int64_t i, int64_t j) {
    double s = Sb[i * n + j];
    if (clamp && s < 0) s = 0;
    return sign * s;
  };
  for (int64_t j = tid; j < n; j += nt) {
    if (!warm) v[j] = 0.0;
    row4col[j] = -1;
    col4row[j] = -1;
  }
  __syncthreads();
  // Row reduction against v; the argmin column of each row goes to path[] for the greedy start.
  for (int64_t i = tid; i < n; i += nt) {
    double best = inf;
    int bj = 0;
    for (int64_t j = 0; j < n; ++j) {
      const double r = cost(i, j) - v[j];
      if (r < best) {
        best = r;
        bj = static_cast<int>(j);
      }
    }
    u[i] = best;
    path[i] = bj;
  }
  __syncthreads();
  if (tid == 0) {
    for (int64_t i = 0; i < n; ++i) {
      const int j = path[i];
      if (row4col[j] < 0) {
        row4col[j] = static_cast<int>(i);
        col4row[i] = j;
      }
    }
  }
  __syncthreads();
  for (int64_t cur = 0; cur < n; ++cur) {
    if (col4row[cur] >= 0) continue;  // uniform: written before the last barrier
    for (int64_t j = tid; j < n; j += nt) {
      spc[j] = inf;
      done[j] = 0;
    }
    if (tid == 0) {
      s_min = 0.0;
      s_i = static_cast<int>(cur);
      s_sink = -1;
    }
    __syncthreads();
    while (true) {
      const int i = s_i;
      const double base = s_min - u[i];
      double bd = inf;
      int bf = 0, bj = INT_MAX;
      for (int64_t j = tid; j < n; j += nt) {
        if (done[j]) continue;
        const double r = base + cost(i, j) - v[j];
        if (r < spc[j]) {
          spc[j] = r;
          path[j] = i;
        }
        const double d = spc[j];
        const int fr = row4col[j] < 0 ? 1 : 0;
        if (cand_better(d, fr, static_cast<int>(j), bd, bf, bj)) {
          bd = d;
          bf = fr;
          bj = static_cast<int>(j);
        }
      }
      sd[tid] = bd;
      sf[tid] = bf;
      sj[tid] = bj;
      __syncthreads();
      for (int st = nt / 2; st > 0; st >>= 1) {
        if (tid < st && cand_better(sd[tid + st], sf[tid + st], sj[tid + st], sd[tid], sf[tid], sj[tid])) {
          sd[tid] = sd[tid + st];
          sf[tid] = sf[tid + st];
          sj[tid] = sj[tid + st];
        }
        __syncthreads();
      }
      if (tid == 0) {
        const int j = sj[0];
        if (j == INT_MAX || !(sd[0] < inf)) {
          s_sink = -2;  // no finite path: impossible for finite scores
        } else {
          s_min = sd[0];
          done[j] = 1;
          if (row4col[j] < 0) {
            s_sink = j;
          } else {
            s_i = row4col[j];
          }
        }
      }
      __syncthreads();
      if (s_sink != -1) break;
    }
    const int sink = s_sink;
    if (sink == -2) break;
    const double mv = s_min;
    for (int64_t j = tid; j < n; j += nt) {
      if (!done[j]) continue;
      v[j] -= mv - spc[j];
      if (j != sink) u[row4col[j]] += mv - spc[j];
    }
    __syncthreads();
    if (tid == 0) {
      u[cur] += mv;
      int j = sink;
      while (true) {
        const int r = path[j];
        row4col[j] = r;
        const int prev = col4row[r];
        col4row[r] = j;
        j = prev;
        if (r == cur) break;
      }
    }
    __syncthreads();
  }
  for (int64_t i = tid; i < n; i += nt) out[b * n + i] = col4row[i];
}

at::Tensor linear_assignment_cuda(const at::Tensor& score, bool maximize) {
  check_dim(score, 3, "linear_assignment: score", "[G, N, N]");
  TORCH_CHECK(score.size(1) == score.size(2), "linear_assignment: score must be square per problem ([G, N, N]), got ",
              score.sizes());
  check_float(score, "linear_assignment: score");
  check_finite(score, "linear_assignment: score");
  const c10::cuda::CUDAGuard guard(score.device());
  const int64_t G = score.size(0), N = score.size(1);
  if (G == 0 || N == 0) return at::empty({G, N}, score.options().dtype(at::kLong));
  at::Tensor v = at::zeros({G, N}, score.options().dtype(at::kDouble));
  return lap_cuda(score.to(at::kDouble).contiguous(), v, maximize, false, false);
}

}  // namespace

at::Tensor lap_cuda(const at::Tensor& S, at::Tensor& v, bool maximize, bool clamp_positive, bool warm) {
  const int64_t B = S.size(0), n = S.size(1);
  at::Tensor out = at::empty({B, n}, S.options().dtype(at::kLong));
  if (B == 0 || n == 0) return out;
  TORCH_CHECK(n < INT_MAX, "linear_assignment: N too large");
  TORCH_CHECK(v.is_contiguous() && v.scalar_type() == at::kDouble, "lap_cuda: v must be contiguous float64");
  const auto dopt = S.options().dtype(at::kDouble);
  const auto iopt = S.options().dtype(at::kInt);
  at::Tensor u = at::empty({B, n}, dopt), spc = at::empty({B, n}, dopt);
  at::Tensor row4col = at::empty({B, n}, iopt), col4row = at::empty({B, n}, iopt);
  at::Tensor path = at::empty({B, n}, iopt), done = at::empty({B, n}, iopt);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  lap_kernel<<<static_cast<unsigned>(B), kLapThreads, 0, stream>>>(
      S.data_ptr<double>(), n, maximize ? -1.0 : 1.0, clamp_positive, warm, u.data_ptr<double>(),
      v.data_ptr<double>(), spc.data_ptr<double>(), row4col.data_ptr<int>(), col4row.data_ptr<int>(),
      path.data_ptr<int>(), done.data_ptr<int>(), out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) { m.impl("linear_assignment", &linear_assignment_cuda); }

}  // namespace exgramed
