// NLAM channel attention (paper eq. 3): operator schemas, the device-independent bodies
// (pooling kernel -> small MLP on ATen -> scale kernel, and the backward), CPU registration.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "channel_attention.h"

// `from fastnl import _C` needs a module init; the operators register themselves when the
// library is loaded (TORCH_LIBRARY below).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace fastnl {

int64_t Layout::n_div() const {
  switch (kind) {
    case LayoutKind::kContiguous: return C * HW;
    case LayoutKind::kFrameChannelsLast: return HW * C;
    default: return 1;
  }
}

int64_t Layout::c_div() const {
  switch (kind) {
    case LayoutKind::kContiguous: return HW;
    case LayoutKind::kFrameChannelsLast: return 1;
    default: return HW * N;
  }
}

int64_t Layout::hw_div() const {
  switch (kind) {
    case LayoutKind::kContiguous: return 1;
    case LayoutKind::kFrameChannelsLast: return C;
    default: return N;
  }
}

std::optional<Layout> classify(const at::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t HW = H * W;
  const std::pair<LayoutKind, std::array<int64_t, 5>> candidates[] = {
      {LayoutKind::kContiguous, {N * C * HW, C * HW, HW, W, 1}},
      {LayoutKind::kFrameChannelsLast, {N * HW * C, HW * C, 1, W * C, C}},
      {LayoutKind::kChannelsLast3d, {C * HW * N, 1, HW * N, W * N, N}},
  };
  for (const auto& [kind, strides] : candidates) {
    bool match = true;
    for (int d = 0; d < 5 && match; ++d) {
      match = x.size(d) == 1 || x.stride(d) == strides[d];
    }
    if (match) {
      return Layout{kind, B, N, C, HW};
    }
  }
  return std::nullopt;
}

namespace {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 5, "fastnl channel attention: x must be [B, N, C, H, W], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "fastnl channel attention: x must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.numel() > 0, "fastnl channel attention: x is empty: ", x.sizes());
}

// x itself when its layout is read natively, else a contiguous copy.
std::pair<at::Tensor, Layout> prepare(const at::Tensor& x) {
  check_inputs(x);
  if (auto l = classify(x)) {
    return {x, *l};
  }
  at::Tensor xc = x.contiguous();
  return {xc, *classify(xc)};
}

// `t` when it has `ref`'s dtype and strides, else a copy of it laid out like `ref`.
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& ref) {
  if (t.scalar_type() == ref.scalar_type() && t.strides() == ref.strides()) {
    return t;
  }
  return at::empty_strided(ref.sizes(), ref.strides(), ref.options()).copy_(t);
}

// An output for `kernel_input`'s layout: `out` itself when its strides match, else a buffer.
at::Tensor kernel_output(const at::Tensor& out, const at::Tensor& kernel_input) {
  if (out.strides() == kernel_input.strides()) {
    return out;
  }
  return at::empty_strided(kernel_input.sizes(), kernel_input.strides(), kernel_input.options());
}

at::Tensor as_acc(const at::Tensor& t, at::ScalarType acc) {
  return t.to(acc);
}

// The shared MLP and everything between the pooling and the rescaling work on [B, N, C] and
// [C, R] tensors, tiny next to x: they run in float64 on every device, so that their rounding
// stays far below that of the passes over x (which accumulate in float32, float64 for double).
constexpr at::ScalarType kMlp = at::kDouble;

// The shared MLP on both branches at once: P = [GMP; GAP] as [2*B*N, C],
// H = tanh(P W1^T + b1) [2*B*N, R], M = H W2^T + b2 [2*B*N, C].
struct Mlp {
  at::Tensor P, H, M;
};

Mlp mlp_forward(const at::Tensor& gmp, const at::Tensor& gap, const at::Tensor& w1,
                const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                const std::optional<at::Tensor>& b2) {
  const int64_t C = gmp.size(2);
  at::Tensor P = at::cat({gmp.reshape({-1, C}), gap.reshape({-1, C})}, 0);
  at::Tensor pre = b1 ? at::addmm(*b1, P, w1.t()) : at::mm(P, w1.t());
  at::Tensor H = at::tanh(pre);
  at::Tensor M = b2 ? at::addmm(*b2, H, w2.t()) : at::mm(H, w2.t());
  return {P, H, M};
}

std::optional<at::Tensor> opt_as_acc(const std::optional<at::Tensor>& t, at::ScalarType acc) {
  if (!t) {
    return std::nullopt;
  }
  return as_acc(*t, acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> channel_pool_impl(const at::Tensor& x, const Kernels& k) {
  auto [xn, l] = prepare(x);
  auto opts = xn.options().dtype(acc_type(x.scalar_type()));
  at::Tensor gmp = at::empty({l.B, l.N, l.C}, opts);
  at::Tensor gap = at::empty({l.B, l.N, l.C}, opts);
  k.pool(xn, l, gmp, gap);
  return {gmp, gap};
}

at::Tensor channel_attention_impl(const at::Tensor& x, const at::Tensor& w1,
                                  const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                  const std::optional<at::Tensor>& b2, const Kernels& k) {
  auto [xn, l] = prepare(x);
  const auto acc = acc_type(x.scalar_type());
  auto opts = xn.options().dtype(acc);
  at::Tensor gmp = at::empty({l.B, l.N, l.C}, opts);
  at::Tensor gap = at::empty({l.B, l.N, l.C}, opts);
  k.pool(xn, l, gmp, gap);

  Mlp mlp = mlp_forward(gmp.to(kMlp), gap.to(kMlp), as_acc(w1, kMlp), opt_as_acc(b1, kMlp), as_acc(w2, kMlp),
                        opt_as_acc(b2, kMlp));
  at::Tensor M = mlp.M.view({2, l.B, l.N, l.C});
  at::Tensor w = at::sigmoid(std::get<0>(M[0].max(1)) + M[1].mean(1)).to(acc).contiguous();  // [B, C]

  at::Tensor out = at::empty_like(x);
  at::Tensor target = kernel_output(out, xn);
  k.scale(xn, w, l, target);
  if (!target.is_same(out)) {
    out.copy_(target);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const Kernels& k) {
  auto [xn, l] = prepare(x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "fastnl channel attention backward: grad_out has shape ",
              grad_out.sizes(), " but x has ", x.sizes());
  at::Tensor g = laid_out_like(grad_out, xn);
  const auto acc = acc_type(x.scalar_type());
  auto opts = xn.options().dtype(acc);
  const int64_t B = l.B, N = l.N, C = l.C;

  // One read of x and grad_out: the pooled values again, the GMP argmax, sum_hw g * x.
  at::Tensor gmp = at::empty({B, N, C}, opts), gap = at::empty({B, N, C}, opts);
  at::Tensor dot = at::empty({B, N, C}, opts);
  at::Tensor argmax = at::empty({B, N, C}, opts.dtype(at::kLong));
  k.pool_stats(g, xn, l, gmp, gap, argmax, dot);

  at::Tensor w1a = as_acc(w1, kMlp), w2a = as_acc(w2, kMlp);
  Mlp mlp = mlp_forward(gmp.to(kMlp), gap.to(kMlp), w1a, opt_as_acc(b1, kMlp), w2a, opt_as_acc(b2, kMlp));
  at::Tensor M = mlp.M.view({2, B, N, C});
  auto [m_max, winner] = M[0].max(1);  // [B, C]: the frame whose GMP branch wins
  at::Tensor w = at::sigmoid(m_max + M[1].mean(1));

  // d loss / d z for z = max_n m_n + mean_n a_n, where out = x * sigmoid(z).
  at::Tensor dz = dot.to(kMlp).sum(1) * w * (1 - w);
  at::Tensor dM = at::zeros({2, B, N, C}, opts.dtype(kMlp));
  dM[0].scatter_(1, winner.unsqueeze(1), dz.unsqueeze(1));
  dM[1].copy_((dz / static_cast<double>(N)).unsqueeze(1).expand({B, N, C}));
  at::Tensor dMf = dM.view({2 * B * N, C});

  at::Tensor gw2 = dMf.t().mm(mlp.H);
  at::Tensor gb2 = dMf.sum(0);
  at::Tensor dpre = dMf.mm(w2a) * (1 - mlp.H * mlp.H);
  at::Tensor gw1 = dpre.t().mm(mlp.P);
  at::Tensor gb1 = dpre.sum(0);
  at::Tensor dP = dpre.mm(w1a);
  at::Tensor dgmp = dP.narrow(0, 0, B * N).reshape({B, N, C}).to(acc).contiguous();
  at::Tensor dgap = (dP.narrow(0, B * N, B * N) / static_cast<double>(l.HW)).reshape({B, N, C}).to(acc).contiguous();

  at::Tensor grad_x = at::empty_like(x);
  at::Tensor target = kernel_output(grad_x, xn);
  k.grad_input(g, w.to(acc).contiguous(), dgmp, dgap, argmax, l, target);
  if (!target.is_same(grad_x)) {
    grad_x.copy_(target);
  }
  return {grad_x, gw1.to(w1.scalar_type()), gb1.to(b1 ? b1->scalar_type() : w1.scalar_type()),
          gw2.to(w2.scalar_type()), gb2.to(b2 ? b2->scalar_type() : w2.scalar_type())};
}

namespace {

std::tuple<at::Tensor, at::Tensor> channel_pool_cpu(const at::Tensor& x) {
  return channel_pool_impl(x, kCpuKernels);
}

at::Tensor channel_attention_cpu(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                 const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  return channel_attention_impl(x, w1, b1, w2, b2, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  return channel_attention_backward_impl(grad_out, x, w1, b1, w2, b2, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY(fastnl, m) {
  m.def("channel_pool(Tensor x) -> (Tensor, Tensor)");
  m.def("channel_attention(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) -> Tensor");
  m.def(
      "channel_attention_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2)"
      " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnl, CPU, m) {
  m.impl("channel_pool", &channel_pool_cpu);
  m.impl("channel_attention", &channel_attention_cpu);
  m.impl("channel_attention_backward", &channel_attention_backward_cpu);
}

}  // namespace fastnl
