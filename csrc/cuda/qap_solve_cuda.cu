// qap_solve, CUDA kernel: the lock-step driver
// (qap_solve_lockstep.h: all starts of all problems in lock-step, ATen ops for the elementwise work, no
// per-iteration host sync) with these device hooks:
//   gradient      one thread per (iterate, x, y), gathers only (out-edges of x, y, then the
//                 in-edge lists): deterministic, no atomics; float64 accumulation
//   assignment    lap_cuda (one block per iterate, linear_assignment_cuda.cu), warm-started
//   q(P)          one block per iterate, fixed-order tree reduction
//   random starts one thread per start, the CPU's counter-based generator (same permutations)
//   2-opt         one block per iterate: each round evaluates all swaps in parallel and applies
//                 the best (ties: the lowest pair); the gradient update is done by one thread
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cfloat>
#include <climits>

#include "cuda/lap_cuda.cuh"
#include "cuda/qap_cuda.cuh"
#include "qap.h"
#include "qap_solve_lockstep.h"

namespace exgramed {
namespace {

using namespace qap_cuda;

template <typename qt>
__global__ void quad_perm_kernel(const int64_t* __restrict__ perm, const qt* __restrict__ Q, Graphs gr,
                                 double* __restrict__ out, int64_t R, int64_t N, int64_t k) {
  const int64_t b = blockIdx.x, g = b / R, Nk = N * k;
  const qt* Qg = Q + g * Nk * Nk;
  const GraphView v = gr.of(g, N, k);
  const int64_t *n1 = v.n1, *n2 = v.n2;
  const int64_t* pb = perm + b * N;
  __shared__ double sh[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t a = pb[i];
    if (a < 0) continue;
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = i * k + s, bb = pb[n1[e]];
      if (bb < 0) continue;
      for (int64_t t = 0; t < k; ++t) {
        if (n2[a * k + t] == bb) acc += static_cast<double>(Qg[e * Nk + a * k + t]);
      }
    }
  }
  sh[threadIdx.x] = acc;
  __syncthreads();
  for (int st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) sh[threadIdx.x] += sh[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[b] = sh[0];
}

__global__ void random_perm_kernel(int64_t* __restrict__ out, int64_t seed, int64_t B, int64_t R, int64_t N) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < B) random_start_perm(seed, b % R, N, out + b * N);
}

// The change of P at real (x, c) when rows i, j swap columns a, b.
__device__ __forceinline__ double swap_d(int64_t x, int64_t c, int64_t i, int64_t j, int64_t a, int64_t b) {
  if (x == i) return c == a ? -1.0 : (c == b ? 1.0 : 0.0);
  if (x == j) return c == b ? -1.0 : (c == a ? 1.0 : 0.0);
  return 0.0;
}

// f(P') - f(P) for the swap of rows i < j (columns a = ext[i], b = ext[j]); rows/columns >= N are
// dummies (score 0, no edges). Same formula as the CPU polish: <U + grad q(P), D> + q(D).
template <typename qt>
__device__ double swap_delta(const double* U, const double* Gq, const qt* Q, const int64_t* n1, const int64_t* n2,
                             int64_t N, int64_t k, int64_t i, int64_t j, int64_t a, int64_t b) {
  auto w = [&](int64_t x, int64_t y) { return (x < N && y < N) ? U[x * N + y] + Gq[x * N + y] : 0.0; };
  double delta = w(i, b) + w(j, a) - w(i, a) - w(j, b);
  if (i >= N || j >= N) return delta;
  const int64_t Nk = N * k;
  const int64_t xs[2] = {i, j}, cs[2] = {a, b};
  for (int xi = 0; xi < 2; ++xi) {
    const int64_t x = xs[xi];
    for (int64_t s = 0; s < k; ++s) {
      const int64_t e = x * k + s, y = n1[e];
      if (y != i && y != j) continue;
      for (int ci = 0; ci < 2; ++ci) {
        const int64_t c = cs[ci];
        if (c >= N) continue;
        const double dxc = swap_d(x, c, i, j, a, b);
        for (int64_t t = 0; t < k; ++t) {
          const int64_t f = c * k + t, d = n2[f];
          if (d != a && d != b) continue;
          delta += static_cast<double>(Q[e * Nk + f]) * dxc * swap_d(y, d, i, j, a, b);
        }
      }
    }
  }
  return delta;
}

template <typename qt>
__global__ void polish_kernel(int64_t* __restrict__ perm, const double* __restrict__ U, const qt* __restrict__ Q,
                              Graphs gr, double* __restrict__ Gq_all, int64_t* __restrict__ ext_all,
                              const double* __restrict__ f_start, int64_t R, int64_t N, int64_t k, bool partial,
                              int64_t max_rounds) {
  const int64_t b = blockIdx.x, g = b / R, Nk = N * k, M = partial ? 2 * N : N;
  const int tid = threadIdx.x, nt = blockDim.x;
  const double* Ug = U + g * N * N;
  const qt* Qg = Q + g * Nk * Nk;
  const auto [n1, n2, ptr1, ptr2, in1, in2] = gr.of(g, N, k);
  double* Gq = Gq_all + b * N * N;
  int64_t* ext = ext_all + b * 2 * N;
  int64_t* pb = perm + b * N;
  __shared__ double sd[kThreads];
  __shared__ long long sp[kThreads];
  if (tid == 0) {  // the extended permutation, as the CPU polish builds it
    if (partial) {
      int64_t r = N;
      for (int64_t i = 0; i < N; ++i) ext[i] = pb[i] >= 0 ? pb[i] : N + i;
      for (int64_t a = 0; a < N; ++a) {
        bool used = false;
        for (int64_t i = 0; i < N; ++i) used = used || pb[i] == a;
        if (!used) ext[r++] = a;
      }
      for (int64_t i = 0; i < N; ++i) {
        if (pb[i] >= 0) ext[r++] = N + i;
      }
    } else {
      for (int64_t i = 0; i < N; ++i) ext[i] = pb[i];
    }
  }
  __syncthreads();
  const double thr = 1e-12 * fmax(1.0, fabs(f_start[b]));
  for (int64_t round = 0; round < max_rounds; ++round) {
    double bd = thr;
    long long bp = LLONG_MAX;
    for (int64_t p = tid; p < M * M; p += nt) {
      const int64_t i = p / M, j = p % M;
      if (j <= i) continue;
      const int64_t a = ext[i], bcol = ext[j];
      if ((i >= N && j >= N) || (a >= N && bcol >= N)) continue;
      const double d = swap_delta(Ug, Gq, Qg, n1, n2, N, k, i, j, a, bcol);
      if (d > bd) {  // p increases per thread: the first of equal maxima is the lowest pair
        bd = d;
        bp = p;
      }
    }
    sd[tid] = bd;
    sp[tid] = bp;
    __syncthreads();
    for (int st = nt / 2; st > 0; st >>= 1) {
      if (tid < st && (sd[tid + st] > sd[tid] || (sd[tid + st] == sd[tid] && sp[tid + st] < sp[tid]))) {
        sd[tid] = sd[tid + st];
        sp[tid] = sp[tid + st];
      }
      __syncthreads();
    }
    const long long best = sp[0];
    if (best == LLONG_MAX) break;  // uniform: no improving swap
    if (tid == 0) {
      const int64_t i = best / M, j = best % M, a = ext[i], bcol = ext[j];
      const int64_t xs[2] = {i, j}, cs[2] = {a, bcol};
      for (int xi = 0; xi < 2; ++xi) {
        const int64_t x = xs[xi];
        if (x >= N) continue;
        for (int ci = 0; ci < 2; ++ci) {
          const int64_t c = cs[ci];
          if (c >= N) continue;
          const double dxc = swap_d(x, c, i, j, a, bcol);
          for (int64_t q1 = ptr1[x]; q1 < ptr1[x + 1]; ++q1) {
            const int64_t e = in1[q1];
            for (int64_t q2 = ptr2[c]; q2 < ptr2[c + 1]; ++q2) {
              const int64_t f = in2[q2];
              Gq[(e / k) * N + f / k] += static_cast<double>(Qg[e * Nk + f]) * dxc;
            }
          }
          for (int64_t s = 0; s < k; ++s) {
            const int64_t e = x * k + s;
            for (int64_t t = 0; t < k; ++t) {
              const int64_t f = c * k + t;
              Gq[n1[e] * N + n2[f]] += static_cast<double>(Qg[e * Nk + f]) * dxc;
            }
          }
        }
      }
      ext[i] = bcol;
      ext[j] = a;
    }
    __syncthreads();
  }
  for (int64_t i = tid; i < N; i += nt) pb[i] = ext[i] < N ? ext[i] : -1;
}


std::tuple<at::Tensor, at::Tensor> qap_solve_cuda(const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2,
                                                  const c10::optional<at::Tensor>& Q,
                                                  const c10::optional<at::Tensor>& H1,
                                                  const c10::optional<at::Tensor>& H2, c10::string_view method_name,
                                                  int64_t max_iter, double tol, int64_t restarts, bool partial,
                                                  int64_t seed, c10::string_view estimator, double lambda,
                                                  const c10::optional<at::Tensor>& init, bool /*sparse_q_grad*/) {
  const QapInputs in = prepare_qap(U, nbr1, nbr2, Q, H1, H2, method_name, max_iter, tol, restarts, estimator,
                                   lambda, init, partial);
  const c10::cuda::CUDAGuard guard(U.device());
  const int64_t G = in.G, N = in.N, k = in.k, R = in.R, B = G * R;
  if (G == 0 || N == 0) return {at::zeros({G, N, N}, U.options()), at::zeros({G}, U.options())};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const CudaGraphs gr = make_graphs(in.n1, in.n2);
  at::Tensor perm, obj;
  AT_DISPATCH_FLOATING_TYPES(in.Qt.scalar_type(), "qap_solve_cuda", [&] {
    QapHooks h;
    h.grad = [&](const at::Tensor& X) { return launch_grad<scalar_t>(X, in.Qt, gr, R, N, k); };
    h.lap = [&](const at::Tensor& S, at::Tensor& v, bool warm, bool clamp) {
      return lap_cuda(S.contiguous(), v, true, clamp, warm);
    };
    h.quad_perm = [&](const at::Tensor& pm) {
      const at::Tensor pc = pm.contiguous();
      at::Tensor out = at::empty({pc.size(0)}, U.options().dtype(at::kDouble));
      quad_perm_kernel<scalar_t><<<static_cast<unsigned>(pc.size(0)), kThreads, 0, stream>>>(
          pc.data_ptr<int64_t>(), in.Qt.data_ptr<scalar_t>(), gr.view(), out.data_ptr<double>(), R, N, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return out;
    };
    h.random_perms = [&](int64_t sd) {
      at::Tensor out = at::empty({B, N}, U.options().dtype(at::kLong));
      random_perm_kernel<<<blocks_for(B), kThreads, 0, stream>>>(out.data_ptr<int64_t>(), sd, B, R, N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return out;
    };
    h.polish = [&](at::Tensor& pm, const at::Tensor& f_start) {
      at::Tensor Gq = launch_grad<scalar_t>(perm_matrix(pm, N), in.Qt, gr, R, N, k);
      at::Tensor ext = at::empty({B, 2 * N}, pm.options());
      const at::Tensor fs = f_start.contiguous();
      const int64_t M = partial ? 2 * N : N;
      polish_kernel<scalar_t><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
          pm.data_ptr<int64_t>(), in.Ud.data_ptr<double>(), in.Qt.data_ptr<scalar_t>(), gr.view(),
          Gq.data_ptr<double>(), ext.data_ptr<int64_t>(), fs.data_ptr<double>(), R, N, k, partial,
          kPolishMaxPasses * M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    std::tie(perm, obj) =
        qap_solve_driver(in.Ud, R, in.has_q, in.method, max_iter, tol, partial, seed, in.init, h);
  });
  return {perm_to_z(perm, N, U.scalar_type()), obj.to(U.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) {
  m.impl("qap_solve", &qap_solve_cuda);
  m.impl("qap_solve_lockstep", &qap_solve_cuda);
}

}  // namespace exgramed
