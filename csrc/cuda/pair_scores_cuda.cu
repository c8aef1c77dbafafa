// pair_scores, CUDA: one thread per output entry (four gathers of C, the Gumbel sample from the
// same counter-based generator as the CPU kernel). The backward is the ATen composite of
// pair_scores.h (batched GEMMs with the signed incidence matrices: deterministic).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "pair_scores.h"

namespace exgramed {
namespace {

constexpr int kPairThreads = 256;

template <typename scalar_t>
__global__ void pair_scores_kernel(const scalar_t* __restrict__ C, const scalar_t* __restrict__ w1,
                                   const scalar_t* __restrict__ w2, const int64_t* __restrict__ nbr1,
                                   const int64_t* __restrict__ nbr2, const scalar_t* __restrict__ noise,
                                   scalar_t* __restrict__ out, int64_t P, int64_t N, int64_t k, scalar_t alpha,
                                   scalar_t beta, scalar_t noise_scale, const int64_t* __restrict__ seeds) {
  const int64_t Nk = N * k;
  const int64_t total = P * Nk * Nk;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = idx / Nk, f = idx % Nk;
    const int64_t p = r / Nk, e = r % Nk;
    const scalar_t* Ci = C + (p * N + e / k) * N;
    const scalar_t* Cj = C + (p * N + nbr1[r]) * N;
    const int64_t a = f / k, b = nbr2[p * Nk + f];
    scalar_t v = alpha * w1[r] * w2[p * Nk + f] * ((Ci[a] - Ci[b]) - (Cj[a] - Cj[b])) + beta;
    if (seeds != nullptr) {
      uint32_t lo, hi;
      noise_row_keys(seeds[p], e, lo, hi);
      v += noise_scale * static_cast<scalar_t>(gumbel_at(static_cast<uint32_t>(f), lo, hi));
    } else if (noise != nullptr) {
      v += noise_scale * noise[idx];
    }
    out[idx] = v;
  }
}

at::Tensor pair_scores_cuda(const at::Tensor& C, const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& nbr1,
                            const at::Tensor& nbr2, double alpha, double beta, const c10::optional<at::Tensor>& noise,
                            double noise_scale, const c10::optional<at::Tensor>& noise_seed) {
  const PairScoresArgs a = check_pair_scores_args(C, w1, w2, nbr1, nbr2, noise, noise_seed, "pair_scores");
  const c10::cuda::CUDAGuard guard(C.device());
  const at::ScalarType ct = compute_dtype(C.scalar_type());
  at::Tensor out = at::empty({a.P, a.Nk, a.Nk}, C.options().dtype(ct));
  if (out.numel() == 0) return out.to(C.scalar_type());
  const at::Tensor Cc = C.to(ct).contiguous(), w1c = w1.to(ct).contiguous(), w2c = w2.to(ct).contiguous();
  const at::Tensor t1 = nbr1.contiguous(), t2 = nbr2.contiguous();
  const at::Tensor nz = a.has_noise ? noise->to(ct).contiguous() : at::Tensor();
  const int64_t blocks = std::min<int64_t>((out.numel() + kPairThreads - 1) / kPairThreads, 65535 * 8);
  AT_DISPATCH_FLOATING_TYPES(ct, "pair_scores_cuda", [&] {
    pair_scores_kernel<scalar_t><<<static_cast<unsigned>(blocks), kPairThreads, 0,
                                   c10::cuda::getCurrentCUDAStream()>>>(
        Cc.data_ptr<scalar_t>(), w1c.data_ptr<scalar_t>(), w2c.data_ptr<scalar_t>(), t1.data_ptr<int64_t>(),
        t2.data_ptr<int64_t>(), a.has_noise ? nz.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), a.P, a.N,
        a.k, static_cast<scalar_t>(alpha), static_cast<scalar_t>(beta), static_cast<scalar_t>(noise_scale),
        a.has_seed ? a.seeds.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.to(C.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_scores_backward_cuda(const at::Tensor& grad, const at::Tensor& C,
                                                                         const at::Tensor& w1, const at::Tensor& w2,
                                                                         const at::Tensor& nbr1,
                                                                         const at::Tensor& nbr2, double alpha) {
  check_pair_scores_backward_args(grad, C, w1, w2, nbr1, nbr2);
  const c10::cuda::CUDAGuard guard(C.device());
  const at::ScalarType ct = compute_dtype(C.scalar_type());
  const auto [gC, gw1, gw2] = pair_scores_backward_aten(grad, C.to(ct), w1.to(ct), w2.to(ct), nbr1, nbr2, alpha);
  return {gC.to(C.scalar_type()), gw1.to(C.scalar_type()), gw2.to(C.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) {
  m.impl("pair_scores", &pair_scores_cuda);
  m.impl("pair_scores_backward", &pair_scores_backward_cuda);
}

}  // namespace exgramed
