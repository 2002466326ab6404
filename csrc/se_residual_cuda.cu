// SE-ResNet bottleneck tail (se_residual.h): CUDA kernels and their registration.
//
// relu and its mask as torch has them (NaN propagates: v < 0 ? 0 : v, and g passes unless
// out <= 0). Forward and backward: contiguous x takes one warp per (n, c) plane of H*W elements, with
// 16-byte packs where H*W and the pointers allow (the backward's sum of m * x over the plane
// reduced across the warp, no atomics); channels_last takes one thread per (n, c) looping over
// H*W, consecutive threads on consecutive channels (coalesced).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>


#include "cuda_common.cuh"
#include "se_residual.h"

namespace fastnl {
namespace {

// Contiguous x: one warp per (n, c) plane of H*W elements (no index arithmetic per element);
// kVec > 1 needs HW % kVec == 0 and 16-byte aligned pointers.
template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kThreads) se_forward_rows_kernel(const scalar_t* __restrict__ x,
                                                                   const acc_t* __restrict__ gate,
                                                                   const scalar_t* __restrict__ r,
                                                                   scalar_t* __restrict__ out, int64_t planes,
                                                                   int64_t HW) {
  using P = Pack<scalar_t, kVec>;
  const WarpStride w;
  const int lane = w.lane;
  for (int64_t plane = w.first; plane < planes; plane += w.step) {
    const acc_t s = gate[plane];
    const int64_t base = plane * HW;
    for (int64_t i = int64_t(lane) * kVec; i < HW; i += int64_t(kWarp) * kVec) {
      const P xv = *reinterpret_cast<const P*>(x + base + i);
      const P rv = *reinterpret_cast<const P*>(r + base + i);
      P o;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t v = static_cast<acc_t>(xv.v[j]) * s + static_cast<acc_t>(rv.v[j]);
        o.v[j] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
      }
      *reinterpret_cast<P*>(out + base + i) = o;
    }
  }
}

// channels_last x ([N][HW][C]): one thread per (n, c), looping over HW.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) se_forward_columns_kernel(const scalar_t* __restrict__ x,
                                                                      const acc_t* __restrict__ gate,
                                                                      const scalar_t* __restrict__ r,
                                                                      scalar_t* __restrict__ out, int64_t planes,
                                                                      int64_t C, int64_t HW) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < planes; t += stride) {
    const int64_t n = t / C, c = t - n * C;
    const acc_t s = gate[t];
    for (int64_t hw = 0; hw < HW; ++hw) {
      const int64_t i = (n * HW + hw) * C + c;
      const acc_t v = static_cast<acc_t>(x[i]) * s + static_cast<acc_t>(r[i]);
      out[i] = static_cast<scalar_t>(v < acc_t(0) ? acc_t(0) : v);
    }
  }
}

// Contiguous x: one warp per (n, c) plane; kVec > 1 needs HW % kVec == 0 and aligned pointers.
template <typename scalar_t, typename acc_t, int kVec>
__global__ void __launch_bounds__(kThreads) se_backward_rows_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ gate, scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_r,
    acc_t* __restrict__ grad_gate, int64_t planes, int64_t HW) {
  using P = Pack<scalar_t, kVec>;
  const WarpStride w;
  const int lane = w.lane;
  for (int64_t plane = w.first; plane < planes; plane += w.step) {
    using dot_t = se_dot_t<scalar_t>;
    const acc_t s = gate[plane];
    const int64_t base = plane * HW;
    dot_t d = 0;
    for (int64_t i = int64_t(lane) * kVec; i < HW; i += int64_t(kWarp) * kVec) {
      const P gv = *reinterpret_cast<const P*>(g + base + i);
      const P ov = *reinterpret_cast<const P*>(out + base + i);
      const P xv = *reinterpret_cast<const P*>(x + base + i);
      P gx, gr;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const acc_t m = !(static_cast<acc_t>(ov.v[j]) <= acc_t(0)) ? static_cast<acc_t>(gv.v[j]) : acc_t(0);
        gx.v[j] = static_cast<scalar_t>(m * s);
        gr.v[j] = static_cast<scalar_t>(m);
        d += static_cast<dot_t>(m) * static_cast<dot_t>(xv.v[j]);
      }
      *reinterpret_cast<P*>(grad_x + base + i) = gx;
      *reinterpret_cast<P*>(grad_r + base + i) = gr;
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      d += __shfl_xor_sync(kFullMask, d, offset);
    }
    if (lane == 0) {
      grad_gate[plane] = static_cast<acc_t>(d);
    }
  }
}

// channels_last x ([N][HW][C]): one thread per (n, c), looping over HW.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) se_backward_columns_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
    const acc_t* __restrict__ gate, scalar_t* __restrict__ grad_x, scalar_t* __restrict__ grad_r,
    acc_t* __restrict__ grad_gate, int64_t planes, int64_t C, int64_t HW) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < planes; t += stride) {
    using dot_t = se_dot_t<scalar_t>;
    const int64_t n = t / C, c = t % C;
    const acc_t s = gate[t];
    dot_t d = 0;
    for (int64_t hw = 0; hw < HW; ++hw) {
      const int64_t i = (n * HW + hw) * C + c;
      const acc_t m = !(static_cast<acc_t>(out[i]) <= acc_t(0)) ? static_cast<acc_t>(g[i]) : acc_t(0);
      grad_x[i] = static_cast<scalar_t>(m * s);
      grad_r[i] = static_cast<scalar_t>(m);
      d += static_cast<dot_t>(m) * static_cast<dot_t>(x[i]);
    }
    grad_gate[t] = static_cast<acc_t>(d);
  }
}

void se_forward_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut, const SeLayout& l,
                     at::Tensor& out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_se_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t planes = l.N * l.C;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* rp = shortcut.const_data_ptr<scalar_t>();
    const acc_t* sp = gate.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (l.channels_last) {
      se_forward_columns_kernel<scalar_t, acc_t><<<grid_for(planes, kThreads), kThreads, 0, stream>>>(
          xp, sp, rp, op, planes, l.C, l.HW);
    } else {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = l.HW % kVec == 0 && aligned16(xp) && aligned16(rp) && aligned16(op);
      const int grid = grid_for(planes, kThreads / kWarp);
      if (vec) {
        se_forward_rows_kernel<scalar_t, acc_t, kVec><<<grid, kThreads, 0, stream>>>(xp, sp, rp, op, planes, l.HW);
      } else {
        se_forward_rows_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(xp, sp, rp, op, planes, l.HW);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void se_backward_cuda(const at::Tensor& g, const at::Tensor& out, const at::Tensor& x, const at::Tensor& gate,
                      const SeLayout& l, at::Tensor& grad_x, at::Tensor& grad_gate, at::Tensor& grad_shortcut) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_se_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t planes = l.N * l.C;
    const SeBackwardPointers<scalar_t, acc_t> p(g, out, x, gate, grad_x, grad_gate, grad_shortcut);
    const scalar_t *gp = p.g, *op = p.out, *xp = p.x;
    const acc_t* sp = p.gate;
    scalar_t *gxp = p.grad_x, *grp = p.grad_shortcut;
    acc_t* ggp = p.grad_gate;
    if (l.channels_last) {
      se_backward_columns_kernel<scalar_t, acc_t><<<grid_for(planes, kThreads), kThreads, 0, stream>>>(
          gp, op, xp, sp, gxp, grp, ggp, planes, l.C, l.HW);
    } else {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = l.HW % kVec == 0 && aligned16(gp) && aligned16(op) && aligned16(xp) && aligned16(gxp) &&
                       aligned16(grp);
      const int grid = grid_for(planes, kThreads / kWarp);
      if (vec) {
        se_backward_rows_kernel<scalar_t, acc_t, kVec><<<grid, kThreads, 0, stream>>>(gp, op, xp, sp, gxp, grp, ggp,
                                                                                      planes, l.HW);
      } else {
        se_backward_rows_kernel<scalar_t, acc_t, 1><<<grid, kThreads, 0, stream>>>(gp, op, xp, sp, gxp, grp, ggp,
                                                                                   planes, l.HW);
      }
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const SeKernels kSeCudaKernels = {&se_forward_cuda, &se_backward_cuda};

at::Tensor se_residual_relu_cuda(const at::Tensor& x, const at::Tensor& gate, const at::Tensor& shortcut) {
  const c10::cuda::CUDAGuard guard(x.device());
  return se_residual_relu_impl(x, gate, shortcut, kSeCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> se_residual_relu_backward_cuda(const at::Tensor& grad_out,
                                                                              const at::Tensor& out,
                                                                              const at::Tensor& x,
                                                                              const at::Tensor& gate) {
  const c10::cuda::CUDAGuard guard(x.device());
  return se_residual_relu_backward_impl(grad_out, out, x, gate, kSeCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnl, CUDA, m) {
  m.impl("se_residual_relu", &se_residual_relu_cuda);
  m.impl("se_residual_relu_backward", &se_residual_relu_backward_cuda);
}

}  // namespace fastnl
