// Helpers shared by the extension's CUDA kernels: block size, 16-byte packs, grid sizing,
// 32/64-bit indexing and vector width chosen at run time.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fastnl {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// A grid-stride loop of warps: this thread's lane, the first item its warp takes and the step
// to the next, for kernels that give each warp one item (a plane, a row) at a time.
struct WarpStride {
  int lane;
  int64_t first, step;
  __device__ WarpStride()
      : lane(threadIdx.x % kWarp),
        first(int64_t(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp),
        step(int64_t(gridDim.x) * (blockDim.x / kWarp)) {}
};

inline int grid_for(int64_t items, int64_t per_block) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t resident = int64_t(sms) * 2048 / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min(blocks, resident * 4)));
}

inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

// Calls fn(index_t tag, vector width tag) with 32-bit indexing where the offsets fit and
// 16-byte packs where sizes and pointers allow.
template <typename scalar_t, typename Fn>
void with_index_and_width(int64_t numel, bool aligned, Fn&& fn) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vec = aligned && numel % kVec == 0;
  const bool small = numel < (int64_t(1) << 30);
  if (small && vec) {
    fn(int32_t{}, std::integral_constant<int, kVec>{});
  } else if (small) {
    fn(int32_t{}, std::integral_constant<int, 1>{});
  } else if (vec) {
    fn(int64_t{}, std::integral_constant<int, kVec>{});
  } else {
    fn(int64_t{}, std::integral_constant<int, 1>{});
  }
}

}  // namespace fastnl
