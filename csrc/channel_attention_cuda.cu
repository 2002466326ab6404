// NLAM channel attention (paper eq. 3): CUDA kernels and their registration.
//
// Pooling: kContiguous rows (H*W contiguous) take one warp per (b, n, c) row; the
// channels-last layouts take one thread per (b, p, q) column with q contiguous across the
// threads of a warp (coalesced). Scale and grad-input are elementwise over x's memory order,
// with 16-byte vector loads and stores where alignment allows. Accumulation is in float32
// (float64 for float64 inputs); every reduction has a fixed order (no atomics).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "channel_attention.h"
#include "cuda_common.cuh"

namespace fastnl {
namespace {

template <typename acc_t>
__device__ __forceinline__ acc_t max_of(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// Folds (max, first argmax) of another lane into this one.
template <typename acc_t>
__device__ __forceinline__ void fold_argmax(acc_t& mx, int64_t& am, acc_t other_mx, int64_t other_am) {
  if (other_mx > mx || (other_mx == mx && other_am < am)) {
    mx = other_mx;
    am = other_am;
  }
}

// kContiguous: one warp per (b, n, c) row of HW elements. With kStats it also gives the
// first argmax and sum(g * x); max and sum are accumulated in the same order either way.
template <typename scalar_t, typename acc_t, bool kStats>
__global__ void __launch_bounds__(kThreads) pool_rows_kernel(const scalar_t* __restrict__ x,
                                                             const scalar_t* __restrict__ g, int64_t rows,
                                                             int64_t HW, acc_t inv_hw, acc_t* __restrict__ gmp,
                                                             acc_t* __restrict__ gap, int64_t* __restrict__ argmax,
                                                             acc_t* __restrict__ dot) {
  const WarpStride w;
  const int lane = w.lane;
  for (int64_t r = w.first; r < rows; r += w.step) {
    const scalar_t* xr = x + r * HW;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    acc_t sum = 0;
    acc_t d = 0;
    int64_t am = lane;
    for (int64_t i = lane; i < HW; i += kWarp) {
      const acc_t v = static_cast<acc_t>(xr[i]);
      if constexpr (kStats) {
        if (v > mx) {
          mx = v;
          am = i;
        }
        d += static_cast<acc_t>(g[r * HW + i]) * v;
      } else {
        mx = max_of(mx, v);
      }
      sum += v;
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      const acc_t other_mx = __shfl_xor_sync(kFullMask, mx, offset);
      sum += __shfl_xor_sync(kFullMask, sum, offset);
      if constexpr (kStats) {
        const int64_t other_am = __shfl_xor_sync(kFullMask, am, offset);
        d += __shfl_xor_sync(kFullMask, d, offset);
        fold_argmax(mx, am, other_mx, other_am);
      } else {
        mx = max_of(mx, other_mx);
      }
    }
    if (lane == 0) {
      gmp[r] = mx;
      gap[r] = sum * inv_hw;
      if constexpr (kStats) {
        argmax[r] = am < HW ? am : 0;
        dot[r] = d;
      }
    }
  }
}

// Channels-last layouts: x is [B][P][HW][Q]; one thread per (b, p, q), looping over HW.
// (p, q) = (n, c) when q_is_channel, else (c, n).
template <typename scalar_t, typename acc_t, bool kStats>
__global__ void __launch_bounds__(kThreads) pool_columns_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ g, int64_t total, int64_t P, int64_t Q,
    int64_t HW, bool q_is_channel, int64_t N, int64_t C, acc_t inv_hw, acc_t* __restrict__ gmp,
    acc_t* __restrict__ gap, int64_t* __restrict__ argmax, acc_t* __restrict__ dot) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; t < total; t += stride) {
    const int64_t q = t % Q, blk = t / Q;
    const int64_t offset = blk * HW * Q + q;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    acc_t sum = 0;
    acc_t d = 0;
    int64_t am = 0;
    for (int64_t hw = 0; hw < HW; ++hw) {
      const acc_t v = static_cast<acc_t>(x[offset + hw * Q]);
      if constexpr (kStats) {
        if (v > mx) {
          mx = v;
          am = hw;
        }
        d += static_cast<acc_t>(g[offset + hw * Q]) * v;
      } else {
        mx = max_of(mx, v);
      }
      sum += v;
    }
    const int64_t b = blk / P, p = blk % P;
    const int64_t i = q_is_channel ? blk * Q + q : (b * N + q) * C + p;
    gmp[i] = mx;
    gap[i] = sum * inv_hw;
    if constexpr (kStats) {
      argmax[i] = am;
      dot[i] = d;
    }
  }
}

// Index decoding of a linear offset in x's memory order: index = (offset / div) % size.
template <typename index_t>
struct Decode {
  index_t n_div, N, c_div, C, hw_div, HW, per_b;
};

template <typename index_t>
Decode<index_t> decode_of(const Layout& l) {
  return {index_t(l.n_div()), index_t(l.N), index_t(l.c_div()), index_t(l.C),
          index_t(l.hw_div()), index_t(l.HW), index_t(l.N * l.C * l.HW)};
}

// out = x * w[b, c].
template <typename scalar_t, typename acc_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kThreads) scale_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ w,
                                                         scalar_t* __restrict__ out, index_t numel,
                                                         Decode<index_t> dec) {
  using P = Pack<scalar_t, kVec>;
  const index_t stride = index_t(gridDim.x) * blockDim.x * kVec;
  for (index_t base = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < numel; base += stride) {
    const P in = *reinterpret_cast<const P*>(x + base);
    P o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const index_t i = base + j;
      const index_t c = (i / dec.c_div) % dec.C;
      const index_t b = i / dec.per_b;
      o.v[j] = static_cast<scalar_t>(static_cast<acc_t>(in.v[j]) * w[b * dec.C + c]);
    }
    *reinterpret_cast<P*>(out + base) = o;
  }
}

// grad_x = g * w[b, c] + dgap[b, n, c] + (hw == argmax[b, n, c]) * dgmp[b, n, c].
template <typename scalar_t, typename acc_t, typename index_t, int kVec>
__global__ void __launch_bounds__(kThreads) grad_input_kernel(
    const scalar_t* __restrict__ g, const acc_t* __restrict__ w, const acc_t* __restrict__ dgmp,
    const acc_t* __restrict__ dgap, const int64_t* __restrict__ argmax, scalar_t* __restrict__ grad_x,
    index_t numel, Decode<index_t> dec) {
  using P = Pack<scalar_t, kVec>;
  const index_t stride = index_t(gridDim.x) * blockDim.x * kVec;
  for (index_t base = (index_t(blockIdx.x) * blockDim.x + threadIdx.x) * kVec; base < numel; base += stride) {
    const P in = *reinterpret_cast<const P*>(g + base);
    P o;
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const index_t i = base + j;
      const index_t b = i / dec.per_b;
      const index_t n = (i / dec.n_div) % dec.N;
      const index_t c = (i / dec.c_div) % dec.C;
      const index_t hw = (i / dec.hw_div) % dec.HW;
      const index_t k = (b * dec.N + n) * dec.C + c;
      acc_t v = static_cast<acc_t>(in.v[j]) * w[b * dec.C + c] + dgap[k];
      if (argmax[k] == hw) {
        v += dgmp[k];
      }
      o.v[j] = static_cast<scalar_t>(v);
    }
    *reinterpret_cast<P*>(grad_x + base) = o;
  }
}

template <bool kStats>
void launch_pool(const at::Tensor& g, const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap,
                 at::Tensor* argmax, at::Tensor* dot) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_channel_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(l.HW);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = kStats ? g.const_data_ptr<scalar_t>() : nullptr;
    int64_t* ap = kStats ? argmax->mutable_data_ptr<int64_t>() : nullptr;
    acc_t* dp = kStats ? dot->mutable_data_ptr<acc_t>() : nullptr;
    if (l.kind == LayoutKind::kContiguous) {
      const int64_t rows = l.B * l.N * l.C;
      pool_rows_kernel<scalar_t, acc_t, kStats><<<grid_for(rows, kThreads / kWarp), kThreads, 0, stream>>>(
          xp, gp, rows, l.HW, inv_hw, gmp.mutable_data_ptr<acc_t>(), gap.mutable_data_ptr<acc_t>(), ap, dp);
    } else {
      const bool q_is_channel = l.kind == LayoutKind::kFrameChannelsLast;
      const int64_t P = q_is_channel ? l.N : l.C, Q = q_is_channel ? l.C : l.N;
      const int64_t total = l.B * P * Q;
      pool_columns_kernel<scalar_t, acc_t, kStats><<<grid_for(total, kThreads), kThreads, 0, stream>>>(
          xp, gp, total, P, Q, l.HW, q_is_channel, l.N, l.C, inv_hw, gmp.mutable_data_ptr<acc_t>(),
          gap.mutable_data_ptr<acc_t>(), ap, dp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void pool_cuda(const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap) {
  launch_pool<false>(x, x, l, gmp, gap, nullptr, nullptr);
}

void pool_stats_cuda(const at::Tensor& g, const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap,
                     at::Tensor& argmax, at::Tensor& dot) {
  launch_pool<true>(g, x, l, gmp, gap, &argmax, &dot);
}

void scale_cuda(const at::Tensor& x, const at::Tensor& w, const Layout& l, at::Tensor& out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_channel_scale_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t numel = l.numel();
    const bool aligned = aligned16(x.const_data_ptr()) && aligned16(out.const_data_ptr());
    with_index_and_width<scalar_t>(numel, aligned, [&](auto index_tag, auto width) {
      using index_t = decltype(index_tag);
      constexpr int kVec = decltype(width)::value;
      scale_kernel<scalar_t, acc_t, index_t, kVec><<<grid_for(numel / kVec, kThreads), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          index_t(numel), decode_of<index_t>(l));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void grad_input_cuda(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dgmp, const at::Tensor& dgap,
                     const at::Tensor& argmax, const Layout& l, at::Tensor& grad_x) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fastnl_channel_grad_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t numel = l.numel();
    const bool aligned = aligned16(g.const_data_ptr()) && aligned16(grad_x.const_data_ptr());
    with_index_and_width<scalar_t>(numel, aligned, [&](auto index_tag, auto width) {
      using index_t = decltype(index_tag);
      constexpr int kVec = decltype(width)::value;
      grad_input_kernel<scalar_t, acc_t, index_t, kVec><<<grid_for(numel / kVec, kThreads), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), w.const_data_ptr<acc_t>(), dgmp.const_data_ptr<acc_t>(),
          dgap.const_data_ptr<acc_t>(), argmax.const_data_ptr<int64_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          index_t(numel), decode_of<index_t>(l));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

const Kernels kCudaKernels = {&pool_cuda, &pool_stats_cuda, &scale_cuda, &grad_input_cuda};

std::tuple<at::Tensor, at::Tensor> channel_pool_cuda(const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_pool_impl(x, kCudaKernels);
}

at::Tensor channel_attention_cuda(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                  const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_attention_impl(x, w1, b1, w2, b2, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> channel_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
    const at::Tensor& w2, const std::optional<at::Tensor>& b2) {
  const c10::cuda::CUDAGuard guard(x.device());
  return channel_attention_backward_impl(grad_out, x, w1, b1, w2, b2, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnl, CUDA, m) {
  m.impl("channel_pool", &channel_pool_cuda);
  m.impl("channel_attention", &channel_attention_cuda);
  m.impl("channel_attention_backward", &channel_attention_backward_cuda);
}

}  // namespace fastnl
