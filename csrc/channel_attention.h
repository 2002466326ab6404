// NLAM channel attention (paper eq. 3): shared declarations of the per-device kernels.
//
// x: [B, N, C, H, W]. GMP/GAP over the H*W positions of each frame, the shared MLP
// W2 tanh(W1 p + b1) + b2 on both, max over frames (GMP branch) + mean over frames (GAP
// branch), sigmoid, and x rescaled per (clip, channel).
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

namespace fastnl {

// Memory layouts the kernels read natively (each one dense and non-overlapping); any other
// input is made contiguous first.
enum class LayoutKind {
  kContiguous,         // [B][N][C][HW]: each (b, n, c) pooling row is contiguous.
  kFrameChannelsLast,  // [B][N][HW][C]: channels innermost (a channels_last [B*N, C, H, W]).
  kChannelsLast3d,     // [B][C][HW][N]: torch.channels_last_3d of the 5-d tensor.
};

struct Layout {
  LayoutKind kind;
  int64_t B, N, C, HW;

  int64_t numel() const { return B * N * C * HW; }
  // Element-index decoding of a linear memory offset: index = (offset / div) % size.
  int64_t n_div() const;
  int64_t c_div() const;
  int64_t hw_div() const;
};

// The layout of a dense x (sizes [B, N, C, H, W]), or nullopt if it is none of the above.
std::optional<Layout> classify(const at::Tensor& x);

// Per-device kernels. Pooled tensors are [B, N, C] in the accumulation dtype (float32 for
// float16/bfloat16/float32 inputs, float64 for float64); weights are [B, C] in that dtype.
struct Kernels {
  // gmp = max over HW, gap = mean over HW, in one read of x.
  void (*pool)(const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap);
  // As pool, plus argmax over HW (first maximum, int64) and dot = sum over HW of g * x.
  void (*pool_stats)(const at::Tensor& g, const at::Tensor& x, const Layout& l, at::Tensor& gmp,
                     at::Tensor& gap, at::Tensor& argmax, at::Tensor& dot);
  // out = x * w[b, c].
  void (*scale)(const at::Tensor& x, const at::Tensor& w, const Layout& l, at::Tensor& out);
  // grad_x = g * w[b, c] + dgap[b, n, c] + (hw == argmax[b, n, c]) * dgmp[b, n, c]
  // (dgap already divided by H*W).
  void (*grad_input)(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dgmp,
                     const at::Tensor& dgap, const at::Tensor& argmax, const Layout& l,
                     at::Tensor& grad_x);
};

extern const Kernels kCpuKernels;

// Device-independent bodies of the operators (the small MLP runs on ATen ops).
std::tuple<at::Tensor, at::Tensor> channel_pool_impl(const at::Tensor& x, const Kernels& k);
at::Tensor channel_attention_impl(const at::Tensor& x, const at::Tensor& w1,
                                  const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                  const std::optional<at::Tensor>& b2, const Kernels& k);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    const Kernels& k);

}  // namespace fastnl
