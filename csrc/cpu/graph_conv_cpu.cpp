// graph_conv, CPU kernels: the neighbourhood aggregation and its transpose, one node per
// task (at::parallel_for), features innermost (contiguous rows, vectorised row primitives). The GEMMs
// and the graph structure are shared with CUDA (graph_conv.h).
//
// Max: ties go to the neighbour with the lowest node index (then the first table slot), so the
// forward argmax -- and with it the backward -- is deterministic. Sum/mean/gcn accumulate in
// fp32 (fp64 for fp64 input) in the CSR's fixed order.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <type_traits>
#include <vector>

#include "graph_conv.h"
#include "multiversion.h"

namespace exgramed {
namespace {

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t gc_grain(int64_t d, int64_t k) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, d * (k + 1))); }

// ---- row primitives: branch-free loops the compiler vectorises; float/double get the clones of
// multiversion.h, picked at load time (the extension itself is built for baseline x86-64). ----

template <typename T, typename A>
inline void row_max_step(const T* __restrict xr, A* __restrict best, int32_t* __restrict arg,
                         int32_t* __restrict bc, int64_t d, int32_t p, int32_t c) {
  // Take x if it is larger, or equal and from a lower node index (the tie rule).
  for (int64_t f = 0; f < d; ++f) {
    const A v = static_cast<A>(xr[f]);
    const bool take = (v > best[f]) | ((v == best[f]) & (c < bc[f]));
    best[f] = take ? v : best[f];
    arg[f] = take ? p : arg[f];
    bc[f] = take ? c : bc[f];
  }
}

template <typename T, typename A>
inline void row_axpy(A* __restrict acc, const T* __restrict xr, A w, int64_t d) {
  for (int64_t f = 0; f < d; ++f) acc[f] += w * static_cast<A>(xr[f]);
}

template <typename T, typename A>
inline void row_masked_add(A* __restrict acc, const T* __restrict g, const int32_t* __restrict a, int32_t p,
                           int64_t d) {
  for (int64_t f = 0; f < d; ++f) acc[f] += a[f] == p ? static_cast<A>(g[f]) : A(0);
}

// Copies src into dst (if given); returns nonzero if src holds a NaN/Inf (v - v != 0 exactly then).
template <typename T, typename A>
inline int32_t row_copy_check(T* __restrict dst, const T* __restrict src, int64_t d) {
  int32_t bad = 0;
  if (dst) {
    for (int64_t f = 0; f < d; ++f) {
      const A v = static_cast<A>(src[f]);
      dst[f] = src[f];
      bad |= static_cast<int32_t>(v - v != A(0));
    }
  } else {
    for (int64_t f = 0; f < d; ++f) {
      const A v = static_cast<A>(src[f]);
      bad |= static_cast<int32_t>(v - v != A(0));
    }
  }
  return bad;
}

#define GC_SPECIALISE(T, A)                                                                                        \
  EXGRAMED_MULTIVERSION void row_max_step(const T* __restrict xr, A* __restrict best, int32_t* __restrict arg,     \
                                          int32_t* __restrict bc, int64_t d, int32_t p, int32_t c) {               \
    row_max_step<T, A>(xr, best, arg, bc, d, p, c);                                                                \
  }                                                                                                                \
  EXGRAMED_MULTIVERSION void row_axpy(A* __restrict acc, const T* __restrict xr, A w, int64_t d) {                 \
    row_axpy<T, A>(acc, xr, w, d);                                                                                 \
  }                                                                                                                \
  EXGRAMED_MULTIVERSION void row_masked_add(A* __restrict acc, const T* __restrict g, const int32_t* __restrict a, \
                                            int32_t p, int64_t d) {                                                \
    row_masked_add<T, A>(acc, g, a, p, d);                                                                         \
  }                                                                                                                \
  EXGRAMED_MULTIVERSION int32_t row_copy_check(T* __restrict dst, const T* __restrict src, int64_t d) {            \
    return row_copy_check<T, A>(dst, src, d);                                                                      \
  }
GC_SPECIALISE(float, float)
GC_SPECIALISE(double, double)
#undef GC_SPECIALISE

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
    std::vector<acc_t> acc(d);
    std::vector<int32_t> bc(aggr == GcAggr::Max ? d : 0);
    int32_t bad = 0;
    for (int64_t gn = begin; gn < end; ++gn) {
      const int64_t g = gn / N, n = gn % N;
      scalar_t* dst = cp ? cp + gn * cstride : nullptr;
      if constexpr (std::is_same_v<scalar_t, acc_t>)
        bad |= row_copy_check(dst, xp + gn * d, d);  // the AVX clones
      else
        bad |= row_copy_check<scalar_t, acc_t>(dst, xp + gn * d, d);
      const int64_t b = ptr ? ptr[g * (N + 1) + n] : n * k;
      const int64_t e = ptr ? ptr[g * (N + 1) + n + 1] : (n + 1) * k;
      const int64_t* cg = col + g * E;
      const scalar_t* xg = xp + g * N * d;
      scalar_t* o = op + gn * ostride;
      if (aggr == GcAggr::Max) {
        int32_t* a = am + gn * d;
        std::fill(acc.begin(), acc.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(bc.begin(), bc.end(), std::numeric_limits<int32_t>::max());
        std::fill(a, a + d, int32_t(-1));
        for (int64_t p = b; p < e; ++p)
          row_max_step(xg + cg[p] * d, acc.data(), a, bc.data(), d, static_cast<int32_t>(p),
                       static_cast<int32_t>(cg[p]));
        // x is finite, so a non-empty neighbourhood has replaced every -inf.
        for (int64_t f = 0; f < d; ++f) o[f] = b == e ? scalar_t(0) : static_cast<scalar_t>(acc[f]);
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (selfw) row_axpy(acc.data(), xg + n * d, selfw[gn], d);
      for (int64_t p = b; p < e; ++p) row_axpy(acc.data(), xg + cg[p] * d, w ? w[g * E + p] : acc_t(1), d);
      for (int64_t f = 0; f < d; ++f) o[f] = static_cast<scalar_t>(acc[f]);
    }
    if (bad) finite = false;
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
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (dp) row_axpy(acc.data(), dp + gn * dstride, acc_t(1), d);
      if (selfw) row_axpy(acc.data(), gp + gn * gstride, selfw[gn], d);
      for (int64_t q = b; q < e; ++q) {
        const int64_t n = g * N + tcol[g * E + q];
        const int64_t p = tpos[g * E + q];
        if (am)
          row_masked_add(acc.data(), gp + n * gstride, am + n * d, static_cast<int32_t>(p), d);
        else
          row_axpy(acc.data(), gp + n * gstride, w ? w[g * E + p] : acc_t(1), d);
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
