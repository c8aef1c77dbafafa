// graph_conv, CPU kernels: the neighbourhood aggregation and its transpose, one node per
// task (at::parallel_for), features innermost (contiguous rows, auto-vectorised). The GEMMs
// and the graph structure are shared with CUDA (graph_conv.h).
//
// Max: ties go to the neighbour with the lowest node index (then the first table slot), so the
// forward argmax -- and with it the backward -- is deterministic. Sum/mean/gcn accumulate in
// fp32 (fp64 for fp64 input) in the CSR's fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <type_traits>
#include <vector>

#include "graph_conv.h"

namespace exgramed {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t gc_grain(int64_t d, int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * (k + 1))); }

template <typename scalar_t>
bool aggregate_kernel(const at::Tensor& x, const GcGraph& gr, GcAggr aggr, at::Tensor& agg, at::Tensor& argmax,
                      at::Tensor& xcopy) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t G = gr.G, N = gr.N, k = gr.k, E = gr.E, d = x.size(2);
  const int64_t ostride = agg.stride(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = agg.data_ptr<scalar_t>();
  const int64_t* ptr = gr.ptr.defined() ? gr.ptr.data_ptr<int64_t>() : nullptr;
  const int64_t* col = gr.col.data_ptr<int64_t>();
  const acc_t* w = gr.w.defined() ? gr.w.data_ptr<acc_t>() : nullptr;
  const acc_t* selfw = gr.selfw.defined() ? gr.selfw.data_ptr<acc_t>() : nullptr;
  int32_t* am = aggr == GcAggr::Max ? argmax.data_ptr<int32_t>() : nullptr;
  scalar_t* cp = xcopy.defined() ? xcopy.data_ptr<scalar_t>() : nullptr;
  const int64_t cstride = xcopy.defined() ? xcopy.stride(1) : 0;
  std::atomic<bool> finite{true};
  at::parallel_for(0, G * N, gc_grain(d, k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(aggr == GcAggr::Max ? 0 : d);
    // v - v is 0 for finite v and NaN for NaN/Inf: one NaN-propagating sum checks every row.
    acc_t chk = 0;
    for (int64_t gn = begin; gn < end; ++gn) {
      const scalar_t* own = xp + gn * d;
      if (cp) {
        scalar_t* c = cp + gn * cstride;
        for (int64_t f = 0; f < d; ++f) {
          c[f] = own[f];
          chk += static_cast<acc_t>(own[f]) - static_cast<acc_t>(own[f]);
        }
      } else {
        for (int64_t f = 0; f < d; ++f) chk += static_cast<acc_t>(own[f]) - static_cast<acc_t>(own[f]);
      }
    }
    if (chk != acc_t(0)) finite = false;
    for (int64_t gn = begin; gn < end; ++gn) {
      const int64_t g = gn / N, n = gn % N;
      const int64_t b = ptr ? ptr[g * (N + 1) + n] : n * k;
      const int64_t e = ptr ? ptr[g * (N + 1) + n + 1] : (n + 1) * k;
      const int64_t* cg = col + g * E;
      const scalar_t* xg = xp + g * N * d;
      scalar_t* o = op + gn * ostride;
      if (aggr == GcAggr::Max) {
        int32_t* a = am + gn * d;
        if (b == e) {
          for (int64_t f = 0; f < d; ++f) o[f] = scalar_t(0), a[f] = -1;
          continue;
        }
        const scalar_t* x0 = xg + cg[b] * d;
        for (int64_t f = 0; f < d; ++f) o[f] = x0[f], a[f] = static_cast<int32_t>(b);
        for (int64_t p = b + 1; p < e; ++p) {
          const int64_t c = cg[p];
          const scalar_t* xr = xg + c * d;
          for (int64_t f = 0; f < d; ++f) {
            const acc_t v = static_cast<acc_t>(xr[f]), cur = static_cast<acc_t>(o[f]);
            if (v > cur || (v == cur && c < cg[a[f]])) o[f] = xr[f], a[f] = static_cast<int32_t>(p);
          }
        }
        continue;
      }
      if (selfw) {
        const acc_t s = selfw[gn];
        const scalar_t* xs = xg + n * d;
        for (int64_t f = 0; f < d; ++f) acc[f] = s * static_cast<acc_t>(xs[f]);
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
      for (int64_t p = b; p < e; ++p) {
        const acc_t wp = w ? w[g * E + p] : acc_t(1);
        const scalar_t* xr = xg + cg[p] * d;
        for (int64_t f = 0; f < d; ++f) acc[f] += wp * static_cast<acc_t>(xr[f]);
      }
      for (int64_t f = 0; f < d; ++f) o[f] = static_cast<scalar_t>(acc[f]);
    }
  });
  return finite.load();
}

template <typename scalar_t>
void aggregate_backward_kernel(const at::Tensor& gagg, const c10::optional<at::Tensor>& direct, const GcGraph& gr,
                               GcAggr aggr, const at::Tensor& argmax, at::Tensor& gx) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t G = gr.G, N = gr.N, k = gr.k, E = gr.E, d = gx.size(2);
  const int64_t gstride = gagg.stride(1);
  const scalar_t* gp = gagg.data_ptr<scalar_t>();
  const scalar_t* dp = direct.has_value() ? direct->data_ptr<scalar_t>() : nullptr;
  const int64_t dstride = direct.has_value() ? direct->stride(1) : 0;
  scalar_t* op = gx.data_ptr<scalar_t>();
  const int64_t* tptr = gr.tptr.defined() ? gr.tptr.data_ptr<int64_t>() : nullptr;
  const int64_t* tcol = gr.tcol.data_ptr<int64_t>();
  const int64_t* tpos = gr.tpos.data_ptr<int64_t>();
  const acc_t* w = gr.w.defined() ? gr.w.data_ptr<acc_t>() : nullptr;
  const acc_t* selfw = gr.selfw.defined() ? gr.selfw.data_ptr<acc_t>() : nullptr;
  const int32_t* am = aggr == GcAggr::Max ? argmax.data_ptr<int32_t>() : nullptr;
  at::parallel_for(0, G * N, gc_grain(d, k), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d);
    for (int64_t gn = begin; gn < end; ++gn) {
      const int64_t g = gn / N, j = gn % N;
      const int64_t b = tptr ? tptr[g * (N + 1) + j] : j * k;
      const int64_t e = tptr ? tptr[g * (N + 1) + j + 1] : (j + 1) * k;
      if (dp) {
        const scalar_t* dr = dp + gn * dstride;
        for (int64_t f = 0; f < d; ++f) acc[f] = static_cast<acc_t>(dr[f]);
      } else {
        std::fill(acc.begin(), acc.end(), acc_t(0));
      }
      if (selfw) {
        const acc_t s = selfw[gn];
        const scalar_t* gr_self = gp + gn * gstride;
        for (int64_t f = 0; f < d; ++f) acc[f] += s * static_cast<acc_t>(gr_self[f]);
      }
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = g * N + tcol[g * E + q];
        const int64_t p = tpos[g * E + q];
        const scalar_t* grow = gp + n * gstride;
        if (am) {
          const int32_t* a = am + n * d;
          const int32_t p32 = static_cast<int32_t>(p);
          for (int64_t f = 0; f < d; ++f) acc[f] += a[f] == p32 ? static_cast<acc_t>(grow[f]) : acc_t(0);
        } else {
          const acc_t wp = w ? w[g * E + p] : acc_t(1);
          for (int64_t f = 0; f < d; ++f) acc[f] += wp * static_cast<acc_t>(grow[f]);
        }
      }
      scalar_t* o = op + gn * d;
      for (int64_t f = 0; f < d; ++f) o[f] = static_cast<scalar_t>(acc[f]);
    }
  });
}

bool aggregate_cpu(const at::Tensor& x, const GcGraph& gr, GcAggr aggr, at::Tensor& agg, at::Tensor& argmax,
                   at::Tensor& xcopy) {
  bool finite = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "graph_conv_cpu",
                                  [&] { finite = aggregate_kernel<scalar_t>(x, gr, aggr, agg, argmax, xcopy); });
  return finite;
}

at::Tensor aggregate_backward_cpu(const at::Tensor& gagg, const c10::optional<at::Tensor>& direct, const GcGraph& gr,
                                  GcAggr aggr, const at::Tensor& argmax) {
  if (aggr == GcAggr::Max)
    TORCH_CHECK(argmax.dim() == 3 && argmax.size(0) == gr.G && argmax.size(1) == gr.N &&
                    argmax.size(2) == gagg.size(2) && argmax.scalar_type() == at::kInt,
                "graph_conv_backward: argmax must be int32 [G, N, d], got ", argmax.scalar_type(), " ",
                argmax.sizes());
  at::Tensor gx = at::empty({gr.G, gr.N, gagg.size(2)}, gagg.options());
  const at::Tensor am = argmax.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gagg.scalar_type(), "graph_conv_backward_cpu",
                                  [&] { aggregate_backward_kernel<scalar_t>(gagg, direct, gr, aggr, am, gx); });
  return gx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_forward_cpu(
    const at::Tensor& x, const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel,
    const c10::optional<at::Tensor>& bias, c10::string_view aggr, bool reverse, bool relu) {
  TORCH_CHECK(x.device().is_cpu(), "graph_conv: x must be a CPU tensor for the CPU kernel");
  return graph_conv_forward_impl(x, nbr, w_root, w_rel, bias, aggr, reverse, relu, &aggregate_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_stacked_cpu(const at::Tensor& x, const at::Tensor& nbr,
                                                                      const at::Tensor& weight,
                                                                      const c10::optional<at::Tensor>& bias,
                                                                      c10::string_view aggr, bool reverse, bool relu) {
  TORCH_CHECK(x.device().is_cpu(), "graph_conv: x must be a CPU tensor for the CPU kernel");
  const auto w = gc_split_weight(x, weight, aggr);
  return graph_conv_forward_impl(x, nbr, w.first, w.second, bias, aggr, reverse, relu, &aggregate_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& xa, const at::Tensor& argmax,
    const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel, c10::string_view aggr, bool reverse,
    bool relu) {
  return graph_conv_backward_impl(grad_out, out, xa, argmax, nbr, w_root, w_rel, aggr, reverse, relu,
                                  &aggregate_backward_cpu);
}

// The public op: the forward op's first output. Autograd is registered (in Python) on
// graph_conv_forward, whose extra outputs (xa, argmax) are what the backward reuses.
at::Tensor graph_conv_composite(const at::Tensor& x, const at::Tensor& nbr, const at::Tensor& w_root,
                                const at::Tensor& w_rel, const c10::optional<at::Tensor>& bias,
                                c10::string_view aggr, bool reverse, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("exgramed::graph_conv_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const c10::optional<at::Tensor>&, c10::string_view, bool, bool)>();
  return std::get<0>(op.call(x, nbr, w_root, w_rel, bias, aggr, reverse, relu));
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) {
  m.impl("graph_conv_forward", &graph_conv_forward_cpu);
  m.impl("graph_conv_backward", &graph_conv_backward_cpu);
  m.impl("graph_conv_stacked", &graph_conv_stacked_cpu);
}

TORCH_LIBRARY_IMPL(exgramed, CompositeImplicitAutograd, m) { m.impl("graph_conv", &graph_conv_composite); }

}  // namespace exgramed
