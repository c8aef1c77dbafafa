// graph_conv: what the CPU and CUDA kernels share (argument checks, the graph structure,
// the GEMMs). Only the neighbourhood aggregation and its transpose are backend kernels.
//
// Forward, for aggr in {max, mean, sum}:
//     xa  = [x | agg]                       [G*N, 2d]  (agg written in place by the kernel)
//     out = act(xa @ [w_root; w_rel] + b)   one GEMM (at::addmm / _addmm_activation)
// and for aggr = gcn:  xa = agg = D^-1/2 (A+I) D^-1/2 x,  out = act(xa @ w_rel + b).
// Backward:
//     gp      = relu ? grad * (out > 0) : grad
//     grad_W  = xa^T gp                      one GEMM, [2d, h] (gcn: [d, h])
//     grad_xa = gp W^T                       one GEMM, [G*N, 2d]: [direct | grad_agg]
//     grad_x  = direct + A^T grad_agg        the transposed aggregation, a gather over the
//                                            transposed CSR (no atomics, fixed order)
// Max records, per node and feature, the aggregation position of the winning edge; its
// transpose adds grad_agg only where that position matches, so exactly one edge receives it.
//
// Edges: per graph, e = i*k + s joins table row i and j = nbr[g, i, s]. The aggregation CSR
// lists, per target node, its incoming positions p; reverse = false aggregates the table rows
// (fixed degree k, p = e), reverse = true aggregates the in-neighbours (the table sorted stably
// by j: sources in increasing order). The transposed CSR lists, per source node, the
// (target, p) pairs it feeds.
#pragma once
#include <ATen/ATen.h>

#include <limits>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace exgramed {

enum class GcAggr { Max, Mean, Sum, Gcn };

inline GcAggr parse_gc_aggr(std::string_view aggr) {
  if (aggr == "max") return GcAggr::Max;
  if (aggr == "mean") return GcAggr::Mean;
  if (aggr == "sum") return GcAggr::Sum;
  if (aggr == "gcn") return GcAggr::Gcn;
  TORCH_CHECK(false, "graph_conv: aggr must be one of 'max', 'mean', 'sum', 'gcn', got '", std::string(aggr), "'");
}

// x's finiteness is checked here when check_x_finite, else by the aggregation kernel (the CPU
// kernel does it in the pass that copies x into the GEMM input).
inline void check_graph_conv_args(const at::Tensor& x, const at::Tensor& nbr, const at::Tensor& w_root,
                                  const at::Tensor& w_rel, const c10::optional<at::Tensor>& bias,
                                  bool check_x_finite) {
  check_dim(x, 3, "graph_conv: x", "[G, N, d]");
  check_float(x, "graph_conv: x");
  check_dim(nbr, 3, "graph_conv: nbr", "[G, N, k]");
  check_index(nbr, "graph_conv: nbr");
  const int64_t G = x.size(0), N = x.size(1), d = x.size(2);
  TORCH_CHECK(nbr.size(0) == G && nbr.size(1) == N, "graph_conv: nbr must have shape [G, N, k] = [", G, ", ", N,
              ", k] to match x ", x.sizes(), ", got ", nbr.sizes());
  check_dim(w_root, 2, "graph_conv: w_root", "[d, h]");
  check_dim(w_rel, 2, "graph_conv: w_rel", "[d, h]");
  TORCH_CHECK(w_root.size(0) == d, "graph_conv: w_root must have shape [d, h] with d = ", d,
              " (the last dim of x), got ", w_root.sizes());
  TORCH_CHECK(w_rel.sizes() == w_root.sizes(), "graph_conv: w_rel must have the shape of w_root ", w_root.sizes(),
              ", got ", w_rel.sizes());
  TORCH_CHECK(w_root.scalar_type() == x.scalar_type(), "graph_conv: w_root must have the dtype of x (",
              x.scalar_type(), "), got ", w_root.scalar_type());
  TORCH_CHECK(w_rel.scalar_type() == x.scalar_type(), "graph_conv: w_rel must have the dtype of x (",
              x.scalar_type(), "), got ", w_rel.scalar_type());
  check_same_device(x, "graph_conv: x", nbr, "nbr");
  check_same_device(x, "graph_conv: x", w_root, "w_root");
  check_same_device(x, "graph_conv: x", w_rel, "w_rel");
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "graph_conv: bias", "[h]");
    TORCH_CHECK(bias->size(0) == w_root.size(1), "graph_conv: bias must have shape [h] with h = ", w_root.size(1),
                ", got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "graph_conv: bias must have the dtype of x (",
                x.scalar_type(), "), got ", bias->scalar_type());
    check_same_device(x, "graph_conv: x", *bias, "bias");
  }
  TORCH_CHECK(N * nbr.size(2) < std::numeric_limits<int32_t>::max(),
              "graph_conv: N * k must be below 2^31 per graph, got N = ", N, ", k = ", nbr.size(2));
  if (nbr.numel() > 0) {
    // One device->host sync on CUDA; an out-of-range index would read out of bounds.
    auto mm = at::aminmax(nbr);
    const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < N, "graph_conv: nbr entries must lie in [0, N) = [0, ", N, "), got values in [", lo,
                ", ", hi, "]");
  }
  if (check_x_finite) check_finite(x, "graph_conv: x");
}

// The neighbourhood structure of one call, per graph (leading dim G), local node indices.
struct GcGraph {
  int64_t G = 0, N = 0, k = 0, E = 0;
  // Aggregation CSR: node n aggregates col[p] for p in [ptr[n], ptr[n+1]); ptr undefined means
  // fixed degree k (ptr[n] = n*k).
  at::Tensor ptr, col;  // [G, N+1], [G, E]
  // Transposed CSR: node j feeds node tcol[q] through aggregation position tpos[q].
  at::Tensor tptr, tcol, tpos;
  at::Tensor w;      // [G, E] accumulation dtype: weight of aggregation position p (mean, gcn)
  at::Tensor selfw;  // [G, N] accumulation dtype: gcn self-loop weight 1/(deg+1)
};

inline GcGraph build_gc_graph(const at::Tensor& nbr_in, GcAggr aggr, bool reverse, at::ScalarType acc, bool forward) {
  GcGraph gr;
  const at::Tensor nbr = nbr_in.contiguous();
  gr.G = nbr.size(0), gr.N = nbr.size(1), gr.k = nbr.size(2), gr.E = gr.N * gr.k;
  const int64_t G = gr.G, N = gr.N, k = gr.k, E = gr.E;
  const auto lopt = nbr.options();
  const at::Tensor flat = nbr.view({G, E});
  // The reverse CSR: the table sorted stably by target j, so each j lists its sources in
  // increasing order; perm[q] = the table position e of the q-th sorted edge.
  const bool need_rev = reverse || !forward;
  at::Tensor rptr, rsrc, perm, invperm;
  if (need_rev && nbr.is_cpu()) {
    // Counting sort by target (stable: positions ascending), O(N k) per graph.
    rptr = at::zeros({G, N + 1}, lopt), perm = at::empty({G, E}, lopt), rsrc = at::empty({G, E}, lopt);
    invperm = at::empty({G, E}, lopt);
    const int64_t* fp = flat.data_ptr<int64_t>();
    int64_t *pp = rptr.data_ptr<int64_t>(), *qp = perm.data_ptr<int64_t>(), *sp = rsrc.data_ptr<int64_t>(),
            *ip = invperm.data_ptr<int64_t>();
    std::vector<int64_t> next(N);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t* fg = fp + g * E;
      int64_t* pg = pp + g * (N + 1);
      for (int64_t e = 0; e < E; ++e) ++pg[fg[e] + 1];
      for (int64_t n = 0; n < N; ++n) pg[n + 1] += pg[n];
      std::copy(pg, pg + N, next.begin());
      for (int64_t e = 0; e < E; ++e) {
        const int64_t q = next[fg[e]]++;
        qp[g * E + q] = e, sp[g * E + q] = e / k, ip[g * E + e] = q;
      }
    }
  } else if (need_rev) {
    auto sorted = at::sort(flat, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    perm = std::get<1>(sorted).contiguous();
    rptr = at::searchsorted(std::get<0>(sorted).contiguous(), at::arange(N + 1, lopt).expand({G, N + 1}).contiguous());
    rsrc = perm.div(k, "floor");
    if (reverse && !forward) invperm = at::empty_like(perm).scatter_(1, perm, at::arange(E, lopt).expand({G, E}));
  }
  if (!reverse) {
    if (forward) {
      gr.col = flat;
    } else {
      gr.tptr = rptr, gr.tcol = rsrc, gr.tpos = perm;
    }
  } else {
    if (forward) {
      gr.ptr = rptr, gr.col = rsrc;
    } else {
      gr.tcol = flat;
      gr.tpos = invperm;
    }
  }
  const auto fopt = nbr.options().dtype(acc);
  if (aggr == GcAggr::Mean) {
    if (!reverse) {
      gr.w = at::full({G, E}, 1.0 / static_cast<double>(k), fopt);
    } else {
      // 1 / (in-degree of the target), in aggregation order (targets ascending).
      const at::Tensor cnt = (rptr.narrow(1, 1, N) - rptr.narrow(1, 0, N)).to(acc);
      const at::Tensor tgt = at::gather(flat, 1, perm);
      gr.w = at::gather(cnt.reciprocal(), 1, tgt).contiguous();
    }
  } else if (aggr == GcAggr::Gcn) {
    // PyG gcn_norm: deg = in-degree + one self loop; a table entry j == i is that self loop.
    const at::Tensor rows = at::arange(N, lopt).repeat_interleave(k).expand({G, E});
    const at::Tensor keep = flat.ne(rows);
    at::Tensor deg;
    if (!reverse) {
      deg = keep.view({G, N, k}).sum(-1);
    } else {
      deg = at::zeros({G, N}, lopt).scatter_add_(1, flat, keep.to(at::kLong));
    }
    const at::Tensor degp1 = (deg + 1).to(acc);
    const at::Tensor dis = degp1.rsqrt();
    const at::Tensor wcanon = at::gather(dis, 1, rows) * at::gather(dis, 1, flat) * keep.to(acc);
    gr.w = (reverse ? at::gather(wcanon, 1, perm) : wcanon).contiguous();
    gr.selfw = degp1.reciprocal().contiguous();
  }
  return gr;
}

// [w_root; w_rel] as one [2d, h] matrix without a copy, when they are the two halves of one
// contiguous buffer (as GraphConvNet stores them); undefined otherwise.
inline at::Tensor gc_stacked_weight(const at::Tensor& w_root, const at::Tensor& w_rel) {
  const int64_t d = w_root.size(0), h = w_root.size(1);
  if (w_root.is_contiguous() && w_rel.is_contiguous() && w_root.storage().is_alias_of(w_rel.storage()) &&
      w_rel.storage_offset() == w_root.storage_offset() + d * h)
    return w_root.as_strided({2 * d, h}, {h, 1}, w_root.storage_offset());
  return {};
}

// (w_root, w_rel) of a stacked weight [w_root; w_rel] ([2d, h]; gcn: w_rel = weight, [d, h]),
// as adjacent views, so the GEMMs take the one-matrix path.
inline std::pair<at::Tensor, at::Tensor> gc_split_weight(const at::Tensor& x, const at::Tensor& weight,
                                                         c10::string_view aggr_name) {
  const GcAggr aggr = parse_gc_aggr(std::string_view(aggr_name.data(), aggr_name.size()));
  check_dim(x, 3, "graph_conv: x", "[G, N, d]");
  check_dim(weight, 2, "graph_conv: weight", aggr == GcAggr::Gcn ? "[d, h]" : "[2d, h]");
  const int64_t d = x.size(2);
  if (aggr == GcAggr::Gcn) {
    TORCH_CHECK(weight.size(0) == d, "graph_conv: weight must have shape [d, h] with d = ", d,
                " (the last dim of x) for aggr='gcn', got ", weight.sizes());
    return {weight, weight};
  }
  TORCH_CHECK(weight.size(0) == 2 * d, "graph_conv: weight must have shape [2d, h] = [w_root; w_rel] with d = ", d,
              " (the last dim of x), got ", weight.sizes());
  const at::Tensor w = weight.contiguous();
  return {w.narrow(0, 0, d), w.narrow(0, d, d)};
}

// The aggregation kernels each backend provides.
//   forward: agg [G, N, d] (rows of stride agg.stride(1)) = AGG over gr's CSR of x [G, N, d]
//            (contiguous); max also writes argmax [G, N, d] int32 (-1: empty neighbourhood);
//            x is copied into xcopy (row-strided) when it is defined. Returns false if the
//            kernel found a NaN/Inf in x (backends that check beforehand return true).
//   backward: returns grad_x [G, N, d] = direct (optional, row-strided) + A^T gagg (row-strided).
using GcAggregateFn = bool (*)(const at::Tensor& x, const GcGraph& gr, GcAggr aggr, at::Tensor& agg,
                               at::Tensor& argmax, at::Tensor& xcopy);
using GcAggregateBackwardFn = at::Tensor (*)(const at::Tensor& gagg, const c10::optional<at::Tensor>& direct,
                                             const GcGraph& gr, GcAggr aggr, const at::Tensor& argmax);

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_forward_impl(
    const at::Tensor& x_in, const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel,
    const c10::optional<at::Tensor>& bias, c10::string_view aggr_name, bool reverse, bool relu,
    GcAggregateFn aggregate) {
  const GcAggr aggr = parse_gc_aggr(std::string_view(aggr_name.data(), aggr_name.size()));
  check_graph_conv_args(x_in, nbr, w_root, w_rel, bias, /*check_x_finite=*/!x_in.is_cpu());
  const int64_t G = x_in.size(0), N = x_in.size(1), d = x_in.size(2), h = w_root.size(1);
  const at::Tensor x = x_in.contiguous();
  const bool gcn = aggr == GcAggr::Gcn;
  at::Tensor xa = at::empty({G, N, gcn ? d : 2 * d}, x.options());
  at::Tensor argmax = at::empty({aggr == GcAggr::Max ? G : 0, N, d}, x.options().dtype(at::kInt));
  at::Tensor agg = gcn ? xa : xa.narrow(2, d, d);
  at::Tensor xcopy = gcn ? at::Tensor() : xa.narrow(2, 0, d);
  if (G * N > 0 && d > 0) {
    const GcGraph gr = build_gc_graph(nbr, aggr, reverse, compute_dtype(x.scalar_type()), /*forward=*/true);
    TORCH_CHECK(aggregate(x, gr, aggr, agg, argmax, xcopy), "graph_conv: x contains NaN or Inf");
  } else {
    agg.zero_();
    if (!gcn) xcopy.copy_(x);
  }
  const at::Tensor a2 = xa.view({G * N, xa.size(2)});
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor out;
  const at::Tensor W = gcn ? w_rel : gc_stacked_weight(w_root, w_rel);
  if (W.defined()) {
    if (has_bias)
      out = relu ? at::_addmm_activation(*bias, a2, W) : at::addmm(*bias, a2, W);
    else
      out = at::mm(a2, W);
  } else {
    // Separate weight buffers: the same FLOPs as two GEMMs into one output (stacking the
    // weights would copy 2dh elements per call).
    out = has_bias ? at::addmm(*bias, a2.narrow(1, 0, d), w_root) : at::mm(a2.narrow(1, 0, d), w_root);
    out.addmm_(a2.narrow(1, d, d), w_rel);
  }
  if (relu && !(W.defined() && has_bias)) out.relu_();
  return {out.view({G, N, h}), xa, argmax};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> graph_conv_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& xa, const at::Tensor& argmax,
    const at::Tensor& nbr, const at::Tensor& w_root, const at::Tensor& w_rel, c10::string_view aggr_name,
    bool reverse, bool relu, GcAggregateBackwardFn aggregate_backward) {
  const GcAggr aggr = parse_gc_aggr(std::string_view(aggr_name.data(), aggr_name.size()));
  const bool gcn = aggr == GcAggr::Gcn;
  const int64_t G = nbr.size(0), N = nbr.size(1), d = w_root.size(0), h = w_root.size(1);
  TORCH_CHECK(grad_out.dim() == 3 && grad_out.size(0) == G && grad_out.size(1) == N && grad_out.size(2) == h,
              "graph_conv_backward: grad_out must have shape [G, N, h] = [", G, ", ", N, ", ", h, "], got ",
              grad_out.sizes());
  TORCH_CHECK(xa.dim() == 3 && xa.size(0) == G && xa.size(1) == N && xa.size(2) == (gcn ? d : 2 * d),
              "graph_conv_backward: xa must have shape [G, N, ", gcn ? d : 2 * d, "], got ", xa.sizes());
  check_index(nbr, "graph_conv_backward: nbr");
  if (nbr.numel() > 0) {
    auto mm = at::aminmax(nbr);
    TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < N,
                "graph_conv_backward: nbr entries must lie in [0, N) = [0, ", N, ")");
  }
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "graph_conv_backward: out must have the shape of grad_out ",
              grad_out.sizes(), ", got ", out.sizes());
  const int64_t M = G * N;
  at::Tensor gp = grad_out.to(xa.scalar_type()).contiguous().view({M, h});
  if (relu) gp = at::threshold_backward(gp, out.contiguous().view({M, h}), 0);
  const at::Tensor a2 = xa.contiguous().view({M, xa.size(2)});
  at::Tensor grad_w = at::mm(a2.t(), gp);  // [2d, h] or [d, h]
  at::Tensor grad_b = gp.sum(0);
  at::Tensor gagg;
  c10::optional<at::Tensor> direct;
  if (gcn) {
    gagg = at::mm(gp, w_rel.t()).view({G, N, d});
  } else {
    const at::Tensor W = gc_stacked_weight(w_root, w_rel);
    if (W.defined()) {
      const at::Tensor gxa = at::mm(gp, W.t()).view({G, N, 2 * d});
      direct = gxa.narrow(2, 0, d);
      gagg = gxa.narrow(2, d, d);
    } else {
      direct = at::mm(gp, w_root.t()).view({G, N, d});
      gagg = at::mm(gp, w_rel.t()).view({G, N, d});
    }
  }
  at::Tensor grad_x;
  if (M > 0 && d > 0) {
    const GcGraph gr = build_gc_graph(nbr, aggr, reverse, compute_dtype(xa.scalar_type()), /*forward=*/false);
    grad_x = aggregate_backward(gagg, direct, gr, aggr, argmax);
  } else {
    grad_x = at::zeros({G, N, d}, xa.options());
  }
  return {grad_x, grad_w, grad_b};
}

}  // namespace exgramed
