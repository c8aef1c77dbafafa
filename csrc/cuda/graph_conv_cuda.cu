// graph_conv, CUDA kernels: the neighbourhood aggregation and its transpose, mirroring the CPU
// kernels (graph_conv_cpu.cpp): one block per node, threads over features (coalesced rows),
// the CSR walked in its fixed order, so results are deterministic and atomic-free. The GEMMs
// (cuBLAS via ATen, ReLU in the cublasLt epilogue through _addmm_activation) and the graph
// structure (ATen sort/searchsorted on the device) are shared with the CPU (graph_conv.h).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "graph_conv.h"

namespace exgramed {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int gc_threads(int64_t d) {
  const int64_t t = ((d + 31) / 32) * 32;
  return static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, t)));
}

// agg[n] = AGG_{p in [ptr[n], ptr[n+1])} w[p] x[col[p]] (+ selfw[n] x[n]); max: the winner
// with ties to the lowest node index, its position in argmax. Also copies x[n] into xcopy.
template <typename scalar_t, typename acc_t>
__global__ void gc_aggregate_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t d, int64_t k, int64_t E,
                                    const int64_t* __restrict__ ptr, const int64_t* __restrict__ col,
                                    const acc_t* __restrict__ w, const acc_t* __restrict__ selfw, bool is_max,
                                    scalar_t* __restrict__ out, int64_t ostride, int32_t* __restrict__ argmax,
                                    scalar_t* __restrict__ xcopy, int64_t cstride) {
  const int64_t gn = blockIdx.x;
  const int64_t g = gn / N, n = gn % N;
  const int64_t b = ptr ? ptr[g * (N + 1) + n] : n * k;
  const int64_t e = ptr ? ptr[g * (N + 1) + n + 1] : (n + 1) * k;
  const int64_t* cg = col + g * E;
  const scalar_t* xg = x + g * N * d;
  for (int64_t f = threadIdx.x; f < d; f += blockDim.x) {
    if (xcopy) xcopy[gn * cstride + f] = x[gn * d + f];
    if (is_max) {
      if (b == e) {
        out[gn * ostride + f] = scalar_t(0);
        argmax[gn * d + f] = -1;
        continue;
      }
      int64_t bc = cg[b], bp = b;
      scalar_t bv = xg[bc * d + f];
      acc_t best = static_cast<acc_t>(bv);
      for (int64_t p = b + 1; p < e; ++p) {
        const int64_t c = cg[p];
        const scalar_t xv = xg[c * d + f];
        const acc_t v = static_cast<acc_t>(xv);
        if (v > best || (v == best && c < bc)) best = v, bv = xv, bp = p, bc = c;
      }
      out[gn * ostride + f] = bv;
      argmax[gn * d + f] = static_cast<int32_t>(bp);
    } else {
      acc_t a = selfw ? selfw[gn] * static_cast<acc_t>(xg[n * d + f]) : acc_t(0);
      for (int64_t p = b; p < e; ++p) {
        const acc_t wp = w ? w[g * E + p] : acc_t(1);
        a += wp * static_cast<acc_t>(xg[cg[p] * d + f]);
      }
      out[gn * ostride + f] = static_cast<scalar_t>(a);
    }
  }
}

// gx[j] = direct[j] + selfw[j] gagg[j] + sum over the transposed CSR of node j of
// (max: [argmax[tcol[q]] == tpos[q]] | else: w[tpos[q]]) * gagg[tcol[q]].
template <typename scalar_t, typename acc_t>
__global__ void gc_aggregate_backward_kernel(const scalar_t* __restrict__ gagg, int64_t gstride,
                                             const scalar_t* __restrict__ direct, int64_t dstride, int64_t N,
                                             int64_t d, int64_t k, int64_t E, const int64_t* __restrict__ tptr,
                                             const int64_t* __restrict__ tcol, const int64_t* __restrict__ tpos,
                                             const acc_t* __restrict__ w, const acc_t* __restrict__ selfw,
                                             const int32_t* __restrict__ argmax, scalar_t* __restrict__ gx) {
  const int64_t gn = blockIdx.x;
  const int64_t g = gn / N, j = gn % N;
  const int64_t b = tptr ? tptr[g * (N + 1) + j] : j * k;
  const int64_t e = tptr ? tptr[g * (N + 1) + j + 1] : (j + 1) * k;
  for (int64_t f = threadIdx.x; f < d; f += blockDim.x) {
    acc_t a = direct ? static_cast<acc_t>(direct[gn * dstride + f]) : acc_t(0);
    if (selfw) a += selfw[gn] * static_cast<acc_t>(gagg[gn * gstride + f]);
    for (int64_t q = b; q < e; ++q) {
      const int64_t n = g * N + tcol[g * E + q];
      const int64_t p = tpos[g * E + q];
      const acc_t gv = static_cast<acc_t>(gagg[n * gstride + f]);
      if (argmax) {
        if (argmax[n * d + f] == static_cast<int32_t>(p)) a += gv;
      } else {
        a += (w ? w[g * E + p] : acc_t(1)) * gv;
      }
    }
    gx[gn * d + f] = static_cast<scalar_t>(a);
  }
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

bool aggregate_cuda(const at::Tensor& x, const GcGraph& gr, GcAggr aggr, at::Tensor& agg, at::Tensor& argmax,
                    at::Tensor& xcopy) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t d = x.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_conv_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    gc_aggregate_kernel<scalar_t, acc_t><<<gr.G * gr.N, gc_threads(d), 0, stream>>>(
        x.data_ptr<scalar_t>(), gr.N, d, gr.k, gr.E, opt_ptr<int64_t>(gr.ptr), gr.col.data_ptr<int64_t>(),
        opt_ptr<acc_t>(gr.w), opt_ptr<acc_t>(gr.selfw), aggr == GcAggr::Max, agg.data_ptr<scalar_t>(), agg.stride(1),
        aggr == GcAggr::Max ? argmax.data_ptr<int32_t>() : nullptr,
        xcopy.defined() ? xcopy.data_ptr<scalar_t>() : nullptr, xcopy.defined() ? xcopy.stride(1) : 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return true;  // x was checked for NaN/Inf before (check_graph_conv_args)
}

at::Tensor aggregate_backward_cuda(const at::Tensor& gagg, const c10::optional<at::Tensor>& direct, const GcGraph& gr,
                                   GcAggr aggr, const at::Tensor& argmax) {
  if (aggr == GcAggr::Max)
    TORCH_CHECK(argmax.dim() == 3 && argmax.size(0) == gr.G && argmax.size(1) == gr.N &&
                    argmax.size(2) == gagg.size(2) && argmax.scalar_type() == at::kInt,
                "graph_conv_backward: argmax must be int32 [G, N, d], got ", argmax.scalar_type(), " ",
                argmax.sizes());
  const c10::cuda::CUDAGuard guard(gagg.device());
  const int64_t d = gagg.size(2);
  at::Tensor gx = at::empty({gr.G, gr.N, d}, gagg.options());
  const at::Tensor am = argmax.contiguous();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gagg.scalar_type(), "graph_conv_backward_cuda", [&] {
    using acc_t = acc_type_t<scalar_t>;
    gc_aggregate_backward_kernel<scalar_t, acc_t><<<gr.G * gr.N, gc_threads(d), 0, stream>>>(
        gagg.data_ptr<scalar_t>(), gagg.stride(1), direct.has_value() ? direct->data_ptr<scalar_t>() : nullptr,
        direct.has_value() ? direct->stride(1) : 0, gr.N, d, gr.k, gr.E, opt_ptr<int64_t>(gr.tptr),
        gr.tcol.data_ptr<int64_t>(), gr.tpos.data_ptr<int64_t>(), opt_ptr<acc_t>(gr.w), opt_ptr<acc_t>(gr.selfw),
        aggr == GcAggr::Max ? am.data_ptr<int32_t>() : nullptr, gx.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_forward_cuda(
    const at::Tensor& x, const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel,
    const c10::optional<at::Tensor>& bias, c10::string_view aggr, bool reverse, bool relu) {
  TORCH_CHECK(x.is_cuda(), "graph_conv: x must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  return graph_conv_forward_impl(x, nbr, w_root, w_rel, bias, aggr, reverse, relu, &aggregate_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_stacked_cuda(const at::Tensor& x, const at::Tensor& nbr,
                                                                       const at::Tensor& weight,
                                                                       const c10::optional<at::Tensor>& bias,
                                                                       c10::string_view aggr, bool reverse,
                                                                       bool relu) {
  TORCH_CHECK(x.is_cuda(), "graph_conv: x must be a CUDA tensor for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto w = gc_split_weight(x, weight, aggr);
  return graph_conv_forward_impl(x, nbr, w.first, w.second, bias, aggr, reverse, relu, &aggregate_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& xa, const at::Tensor& argmax,
    const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel, c10::string_view aggr, bool reverse,
    bool relu) {
  const c10::cuda::CUDAGuard guard(xa.device());
  return graph_conv_backward_impl(grad_out, out, xa, argmax, nbr, w_root, w_rel, aggr, reverse, relu,
                                  &aggregate_backward_cuda);
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CUDA, m) {
  m.impl("graph_conv_forward", &graph_conv_forward_cuda);
  m.impl("graph_conv_stacked", &graph_conv_stacked_cuda);
  m.impl("graph_conv_backward", &graph_conv_backward_cuda);
}

}  // namespace exgramed
