// qap_solve_lockstep on the CPU: the lock-step driver the CUDA kernel of qap_solve runs
// (qap_solve_lockstep.h), with CPU hooks, so that the CUDA algorithm is tested on machines without a GPU.
// A testing op, not a public one: qap_solve's own CPU kernel runs one task per start instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "qap_cpu.h"
#include "qap_solve_lockstep.h"

namespace exgramed {
namespace {

using namespace qap_cpu;

std::tuple<at::Tensor, at::Tensor> qap_solve_lockstep_cpu(
    const at::Tensor& U, const at::Tensor& nbr1, const at::Tensor& nbr2, const c10::optional<at::Tensor>& Q,
    const c10::optional<at::Tensor>& H1, const c10::optional<at::Tensor>& H2, c10::string_view method_name,
    int64_t max_iter, double tol, int64_t restarts, bool partial, int64_t seed, c10::string_view estimator,
    double lambda, const c10::optional<at::Tensor>& init, bool /*sparse_q_grad*/) {
  TORCH_CHECK(U.device().is_cpu(), "qap_solve_lockstep: U must be a CPU tensor for the CPU kernel");
  const QapInputs in = prepare_qap(U, nbr1, nbr2, Q, H1, H2, method_name, max_iter, tol, restarts, estimator,
                                   lambda, init, partial);
  const int64_t G = in.G, N = in.N, k = in.k, R = in.R, B = G * R;
  if (G == 0 || N == 0) return {at::zeros({G, N, N}, U.options()), at::zeros({G}, U.options())};
  at::Tensor perm, obj;
  AT_DISPATCH_FLOATING_TYPES(in.Qt.scalar_type(), "qap_solve_lockstep_cpu", [&] {
    const scalar_t* qp = in.has_q ? in.Qt.data_ptr<scalar_t>() : nullptr;
    std::vector<Problem<scalar_t>> probs;
    for (int64_t g = 0; g < G; ++g) {
      probs.push_back(make_problem<scalar_t>(in.Ud.data_ptr<double>() + g * N * N,
                                             in.has_q ? qp + g * N * k * N * k : nullptr,
                                             in.n1.data_ptr<int64_t>() + g * N * k,
                                             in.n2.data_ptr<int64_t>() + g * N * k, N, k, partial, true));
    }
    QapHooks h;
    h.grad = [&](const at::Tensor& X) {
      const at::Tensor Xc = X.contiguous();
      at::Tensor out = at::empty_like(Xc);
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        std::vector<double> xg(N * N * std::max<int64_t>(k, 1));
        for (int64_t b = b0; b < b1; ++b) {
          grad_q(probs[b / R], Xc.data_ptr<double>() + b * N * N, out.data_ptr<double>() + b * N * N, xg.data());
        }
      });
      return out;
    };
    h.lap = [&](const at::Tensor& S, at::Tensor& v, bool warm, bool clamp) {
      const at::Tensor Sc = S.contiguous();
      const int64_t Bs = Sc.size(0), n = Sc.size(1);
      at::Tensor cols = at::empty({Bs, n}, S.options().dtype(at::kLong));
      at::parallel_for(0, Bs, 1, [&](int64_t b0, int64_t b1) {
        LapWorkspace ws;
        for (int64_t b = b0; b < b1; ++b) {
          ws.resize(n);
          double* vb = v.data_ptr<double>() + b * n;
          if (warm) std::copy(vb, vb + n, ws.v.begin());
          lap_solve(Sc.data_ptr<double>() + b * n * n, n, true, clamp, ws, warm);
          std::copy(ws.v.begin(), ws.v.end(), vb);
          std::copy(ws.col4row.begin(), ws.col4row.end(), cols.data_ptr<int64_t>() + b * n);
        }
      });
      return cols;
    };
    h.quad_perm = [&](const at::Tensor& pm) {
      const at::Tensor pc = pm.contiguous();
      at::Tensor out = at::empty({pc.size(0)}, U.options().dtype(at::kDouble));
      for (int64_t b = 0; b < pc.size(0); ++b) {
        out.data_ptr<double>()[b] = quad_perm(probs[b / R], pc.data_ptr<int64_t>() + b * N);
      }
      return out;
    };
    h.random_perms = [&](int64_t sd) {
      at::Tensor out = at::empty({B, N}, U.options().dtype(at::kLong));
      for (int64_t b = 0; b < B; ++b) random_start_perm(sd, b % R, N, out.data_ptr<int64_t>() + b * N);
      return out;
    };
    h.polish = [&](at::Tensor& pm, const at::Tensor&) {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        Work w;
        w.resize(N, k, /*annealing=*/false);  // 2-opt only
        for (int64_t b = b0; b < b1; ++b) {
          int64_t* row = pm.data_ptr<int64_t>() + b * N;
          std::copy(row, row + N, w.best.begin());
          polish(probs[b / R], w);
          std::copy(w.best.begin(), w.best.begin() + N, row);
        }
      });
    };
    std::tie(perm, obj) =
        qap_solve_driver(in.Ud, R, in.has_q, in.method, max_iter, tol, partial, seed, in.init, h);
  });
  return {perm_to_z(perm, N, U.scalar_type()), obj.to(U.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgramed, CPU, m) { m.impl("qap_solve_lockstep", &qap_solve_lockstep_cpu); }

}  // namespace exgramed
