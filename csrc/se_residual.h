// The tail of an SE-ResNet bottleneck in one pass: out = relu(x * gate[n, c] + shortcut), and
// its backward in one pass (squeeze-and-excitation, Hu et al. 2018, as SE-ResNet50 uses it).
//
// x, shortcut, out: [N, C, H, W], one dtype, contiguous or channels_last (any other layout is
// made contiguous first); gate: [N, C] in the accumulation dtype (float32, float64 for
// float64 x). Arithmetic in the accumulation dtype, one rounding per output element.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <type_traits>

namespace fastnl {

// The accumulator of grad_gate's sums over H*W: double for float32 and float64 inputs (a float
// sum over H*W terms rounds ~sqrt(HW) times worse than torch's pairwise sum of the rounded
// products), float for half precision (whose rounded products dominate either way).
template <typename scalar_t>
using se_dot_t = std::conditional_t<sizeof(scalar_t) >= 4, double, float>;

struct SeLayout {
  bool channels_last;  // [N][H*W][C] in memory, else [N][C][H*W]
  int64_t N, C, HW;

  int64_t numel() const { return N * C * HW; }
};

struct SeKernels {
  // out = max(x * gate[n, c] + shortcut, 0)
  void (*forward)(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut, const SeLayout& l,
                  at::Tensor& out);
  // m = (out > 0) * g; grad_x = m * gate[n, c]; grad_shortcut = m; grad_gate[n, c] = sum_hw m * x
  void (*backward)(const at::Tensor& g, const at::Tensor& out, const at::Tensor& x, const at::Tensor& gate,
                   const SeLayout& l, at::Tensor& grad_x, at::Tensor& grad_gate, at::Tensor& grad_shortcut);
};

// The typed pointers of a backward call, as every device's kernels read them.
template <typename scalar_t, typename acc_t>
struct SeBackwardPointers {
  const scalar_t* g;
  const scalar_t* out;
  const scalar_t* x;
  const acc_t* gate;
  scalar_t* grad_x;
  scalar_t* grad_shortcut;
  acc_t* grad_gate;

  SeBackwardPointers(const at::Tensor& g_, const at::Tensor& out_, const at::Tensor& x_, const at::Tensor& gate_,
                     at::Tensor& grad_x_, at::Tensor& grad_gate_, at::Tensor& grad_shortcut_)
      : g(g_.const_data_ptr<scalar_t>()),
        out(out_.const_data_ptr<scalar_t>()),
        x(x_.const_data_ptr<scalar_t>()),
        gate(gate_.const_data_ptr<acc_t>()),
        grad_x(grad_x_.mutable_data_ptr<scalar_t>()),
        grad_shortcut(grad_shortcut_.mutable_data_ptr<scalar_t>()),
        grad_gate(grad_gate_.mutable_data_ptr<acc_t>()) {}
};

extern const SeKernels kSeCpuKernels;

at::Tensor se_residual_relu_impl(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut,
                                 const SeKernels& k);
std::tuple<at::Tensor, at::Tensor, at::Tensor> se_residual_relu_backward_impl(const at::Tensor& grad_out,
                                                                              const at::Tensor& out,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& gate,
                                                                              const SeKernels& k);

}  // namespace fastnl
