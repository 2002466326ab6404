// SE-ResNet bottleneck tail (se_residual.h): operator schemas, the device-independent bodies
// (layout and dtype checks), the CPU kernels and their registration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "se_residual.h"

namespace fastnl {
namespace {

constexpr const char* kWhat = "fastnl se_residual_relu";

at::ScalarType se_acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// x as the kernels read it (itself when contiguous or channels_last, else a contiguous copy)
// and its layout.
std::pair<at::Tensor, SeLayout> se_prepare(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, kWhat, ": x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), kWhat, ": x must be floating point, got ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (x.is_contiguous()) {
    return {x, SeLayout{false, N, C, HW}};
  }
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return {x, SeLayout{true, N, C, HW}};
  }
  return {x.contiguous(), SeLayout{false, N, C, HW}};
}

// `t` when it has `ref`'s dtype and strides, else a copy of it laid out like `ref`.
at::Tensor se_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes(), kWhat, ": ", name, " has shape ", t.sizes(), " but x has ", ref.sizes());
  TORCH_CHECK(t.device() == ref.device(), kWhat, ": ", name, " is on ", t.device(), " but x is on ", ref.device());
  if (t.scalar_type() == ref.scalar_type() && t.strides() == ref.strides()) {
    return t;
  }
  return at::empty_strided(ref.sizes(), ref.strides(), ref.options()).copy_(t);
}

at::Tensor se_gate(const at::Tensor& gate, const at::Tensor& x, const SeLayout& l) {
  TORCH_CHECK(gate.numel() == l.N * l.C && gate.size(0) == l.N, kWhat, ": gate must be [N, C] = [", l.N, ", ", l.C,
              "], got ", gate.sizes());
  TORCH_CHECK(gate.device() == x.device(), kWhat, ": gate is on ", gate.device(), " but x is on ", x.device());
  return gate.reshape({l.N, l.C}).to(se_acc_type(x.scalar_type())).contiguous();
}

// ---- CPU kernels --------------------------------------------------------------------------
//
// Branch-free selects (the ReLU mask of random data mispredicts half the time: a branch made the
// backward 4x slower than torch's three passes) and, in the
// backward's sums, kLanes independent accumulators, so that the loops vectorise.

constexpr int64_t kLanes = 8;

// relu as torch computes it: NaN stays NaN (a select on v > 0 would make it 0).
template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// g where the ReLU passed (torch's threshold_backward: out <= 0 gives exactly 0, NaN passes),
// as a bit mask rather than a branch.
template <typename T>
inline T pass_where(T out, T g) {
  using U = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
  static_assert(sizeof(T) == sizeof(U), "float or double");
  U bits;
  std::memcpy(&bits, &g, sizeof(T));
  bits &= U(0) - U(!(out <= T(0)));
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

template <typename scalar_t, typename acc_t>
inline void forward_span(const scalar_t* __restrict__ x, const scalar_t* __restrict__ r, acc_t s,
                         scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]) * s + static_cast<acc_t>(r[i]);
    out[i] = static_cast<scalar_t>(relu(v));
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t masked(const scalar_t* __restrict__ g, const scalar_t* __restrict__ out, int64_t i) {
  return pass_where(static_cast<acc_t>(out[i]), static_cast<acc_t>(g[i]));
}

// grad_x and grad_shortcut of one contiguous span of n elements sharing the gate s; returns
// sum(m * x) over the span.
template <typename scalar_t, typename acc_t, typename dot_t>
inline dot_t backward_span(const scalar_t* __restrict__ g, const scalar_t* __restrict__ out,
                           const scalar_t* __restrict__ x, acc_t s, scalar_t* __restrict__ gx,
                           scalar_t* __restrict__ gr, int64_t n) {
  dot_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t m = masked<scalar_t, acc_t>(g, out, i + k);
      gx[i + k] = static_cast<scalar_t>(m * s);
      gr[i + k] = static_cast<scalar_t>(m);
      lanes[k] += static_cast<dot_t>(m) * static_cast<dot_t>(x[i + k]);
    }
  }
  for (; i < n; ++i) {
    const acc_t m = masked<scalar_t, acc_t>(g, out, i);
    gx[i] = static_cast<scalar_t>(m * s);
    gr[i] = static_cast<scalar_t>(m);
    lanes[0] += static_cast<dot_t>(m) * static_cast<dot_t>(x[i]);
  }
  dot_t dot = 0;
  for (int64_t k = 0; k < kLanes; ++k) {
    dot += lanes[k];
  }
  return dot;
}

void forward_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut, const SeLayout& l,
                 at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_se_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = shortcut.const_data_ptr<scalar_t>();
    const acc_t* gp = gate.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t C = l.C, HW = l.HW;
    if (!l.channels_last) {
      at::parallel_for(0, l.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t b, int64_t e) {
        for (int64_t plane = b; plane < e; ++plane) {
          forward_span(xp + plane * HW, rp + plane * HW, gp[plane], op + plane * HW, HW);
        }
      });
    } else {
      at::parallel_for(0, l.N * HW, std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1)), [&](int64_t b, int64_t e) {
        for (int64_t row = b; row < e; ++row) {
          const acc_t* __restrict__ s = gp + (row / HW) * C;
          const scalar_t* __restrict__ xr = xp + row * C;
          const scalar_t* __restrict__ rr = rp + row * C;
          scalar_t* __restrict__ orow = op + row * C;
          for (int64_t c = 0; c < C; ++c) {
            const acc_t v = static_cast<acc_t>(xr[c]) * s[c] + static_cast<acc_t>(rr[c]);
            orow[c] = static_cast<scalar_t>(relu(v));
          }
        }
      });
    }
  });
}

void backward_cpu(const at::Tensor& g, const at::Tensor& out, const at::Tensor& x, const at::Tensor& gate,
                  const SeLayout& l, at::Tensor& grad_x, at::Tensor& grad_gate, at::Tensor& grad_shortcut) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_se_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using dot_t = se_dot_t<scalar_t>;
    const SeBackwardPointers<scalar_t, acc_t> p(g, out, x, gate, grad_x, grad_gate, grad_shortcut);
    const scalar_t *gp = p.g, *op = p.out, *xp = p.x;
    const acc_t* sp = p.gate;
    scalar_t *gxp = p.grad_x, *grp = p.grad_shortcut;
    acc_t* ggp = p.grad_gate;
    const int64_t C = l.C, HW = l.HW;
    if (!l.channels_last) {
      at::parallel_for(0, l.N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(HW, 1)), [&](int64_t b, int64_t e) {
        for (int64_t plane = b; plane < e; ++plane) {
          const int64_t o = plane * HW;
          ggp[plane] = static_cast<acc_t>(backward_span<scalar_t, acc_t, dot_t>(
              gp + o, op + o, xp + o, sp[plane], gxp + o, grp + o, HW));
        }
      });
    } else {
      // one image per task: its [HW][C] slab, the C sums accumulated over the rows in order
      at::parallel_for(0, l.N, 1, [&](int64_t b, int64_t e) {
        std::vector<dot_t> dot(C);
        for (int64_t n = b; n < e; ++n) {
          const acc_t* __restrict__ s = sp + n * C;
          std::fill(dot.begin(), dot.end(), dot_t(0));
          dot_t* __restrict__ d = dot.data();
          for (int64_t hw = 0; hw < HW; ++hw) {
            const int64_t o = (n * HW + hw) * C;
            const scalar_t* __restrict__ grow = gp + o;
            const scalar_t* __restrict__ orow = op + o;
            const scalar_t* __restrict__ xrow = xp + o;
            scalar_t* __restrict__ gxrow = gxp + o;
            scalar_t* __restrict__ grrow = grp + o;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t m = masked<scalar_t, acc_t>(grow, orow, c);
              gxrow[c] = static_cast<scalar_t>(m * s[c]);
              grrow[c] = static_cast<scalar_t>(m);
              d[c] += static_cast<dot_t>(m) * static_cast<dot_t>(xrow[c]);
            }
          }
          for (int64_t c = 0; c < C; ++c) {
            ggp[n * C + c] = static_cast<acc_t>(d[c]);
          }
        }
      });
    }
  });
}

}  // namespace

const SeKernels kSeCpuKernels = {&forward_cpu, &backward_cpu};

at::Tensor se_residual_relu_impl(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut,
                                 const SeKernels& k) {
  auto [xn, l] = se_prepare(x);
  at::Tensor r = se_like(shortcut, xn, "shortcut");
  at::Tensor s = se_gate(gate, xn, l);
  at::Tensor out = at::empty_strided(xn.sizes(), xn.strides(), xn.options());
  if (l.numel() > 0) {
    k.forward(xn, s, r, l, out);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> se_residual_relu_backward_impl(const at::Tensor& grad_out,
                                                                              const at::Tensor& out,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& gate,
                                                                              const SeKernels& k) {
  auto [xn, l] = se_prepare(x);
  at::Tensor o = se_like(out, xn, "out");
  at::Tensor g = se_like(grad_out, xn, "grad_out");
  at::Tensor s = se_gate(gate, xn, l);
  at::Tensor grad_x = at::empty_strided(xn.sizes(), xn.strides(), xn.options());
  at::Tensor grad_shortcut = at::empty_strided(xn.sizes(), xn.strides(), xn.options());
  at::Tensor grad_gate = at::zeros({l.N, l.C}, s.options());
  if (l.numel() > 0) {
    k.backward(g, o, xn, s, l, grad_x, grad_gate, grad_shortcut);
  }
  return {grad_x, grad_gate.to(gate.scalar_type()).reshape(gate.sizes()), grad_shortcut};
}

namespace {

at::Tensor se_residual_relu_cpu(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut) {
  return se_residual_relu_impl(x, gate, shortcut, kSeCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> se_residual_relu_backward_cpu(const at::Tensor& grad_out,
                                                                             const at::Tensor& out,
                                                                             const at::Tensor& x,
                                                                             const at::Tensor& gate) {
  return se_residual_relu_backward_impl(grad_out, out, x, gate, kSeCpuKernels);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastnl, m) {
  m.def("se_residual_relu(Tensor x, Tensor gate, Tensor shortcut) -> Tensor");
  m.def("se_residual_relu_backward(Tensor grad_out, Tensor out, Tensor x, Tensor gate) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastnl, CPU, m) {
  m.impl("se_residual_relu", &se_residual_relu_cpu);
  m.impl("se_residual_relu_backward", &se_residual_relu_backward_cpu);
}

}  // namespace fastnl
