// The CUDA graph-matching kernels' shared pieces: one problem's neighbour tables and in-edge lists on
// the device, and grad q(X) (one thread per (iterate, x, y), gathers only: deterministic, no atomics;
// float64 accumulation). Used by qap_solve's and qap_gradient's CUDA kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include "qap.h"

namespace exgramed {
namespace qap_cuda {

constexpr int kThreads = 256;

// One problem's neighbour tables and in-edge lists (CSR).
struct GraphView {
  const int64_t *n1, *n2, *ptr1, *ptr2, *in1, *in2;
};

struct Graphs {
  const int64_t *n1, *n2, *ptr1, *in1, *ptr2, *in2;  // per problem offsets: g*N*k, g*(N+1), g*N*k
  __device__ GraphView of(int64_t g, int64_t N, int64_t k) const {
    const int64_t Nk = N * k;
    return {n1 + g * Nk, n2 + g * Nk, ptr1 + g * (N + 1), ptr2 + g * (N + 1), in1 + g * Nk, in2 + g * Nk};
  }
};

template <typename qt>
__global__ void grad_kernel(const double* __restrict__ X, const qt* __restrict__ Q, Graphs gr, double* __restrict__ out,
                            int64_t B, int64_t R, int64_t N, int64_t k) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * N * N) return;
  const int64_t b = idx / (N * N), x = (idx / N) % N, y = idx % N, g = b / R, Nk = N * k;
  const qt* Qg = Q + g * Nk * Nk;
  const double* Xb = X + b * N * N;
  const auto [n1, n2, ptr1, ptr2, in1, in2] = gr.of(g, N, k);
  double acc = 0.0;
  for (int64_t s = 0; s < k; ++s) {
    const int64_t e = x * k + s, j = n1[e];
    for (int64_t t = 0; t < k; ++t) {
      const int64_t f = y * k + t;
      acc += static_cast<double>(Qg[e * Nk + f]) * Xb[j * N + n2[f]];
    }
  }
  for (int64_t p = ptr1[x]; p < ptr1[x + 1]; ++p) {
    const int64_t e = in1[p], i = e / k;
    for (int64_t q = ptr2[y]; q < ptr2[y + 1]; ++q) {
      const int64_t f = in2[q];
      acc += static_cast<double>(Qg[e * Nk + f]) * Xb[i * N + f / k];
    }
  }
  out[idx] = acc;
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

struct CudaGraphs {
  at::Tensor n1, n2, ptr1, in1, ptr2, in2;
  Graphs view() const {
    return {n1.data_ptr<int64_t>(),   n2.data_ptr<int64_t>(),  ptr1.data_ptr<int64_t>(),
            in1.data_ptr<int64_t>(), ptr2.data_ptr<int64_t>(), in2.data_ptr<int64_t>()};
  }
};

inline CudaGraphs make_graphs(const at::Tensor& n1, const at::Tensor& n2) {
  CudaGraphs c;
  c.n1 = n1.contiguous();
  c.n2 = n2.contiguous();
  std::tie(c.ptr1, c.in1) = in_edges_csr(c.n1);
  std::tie(c.ptr2, c.in2) = in_edges_csr(c.n2);
  return c;
}

template <typename qt>
at::Tensor launch_grad(const at::Tensor& X, const at::Tensor& Q, const CudaGraphs& gr, int64_t R, int64_t N,
                       int64_t k) {
  const at::Tensor Xc = X.contiguous();
  const int64_t B = Xc.size(0);
  at::Tensor out = at::empty({B, N, N}, Xc.options());
  if (B * N * N == 0) return out;
  grad_kernel<qt><<<blocks_for(B * N * N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      Xc.data_ptr<double>(), Q.data_ptr<qt>(), gr.view(), out.data_ptr<double>(), B, R, N, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace qap_cuda
}  // namespace exgramed
