// NLAM channel attention (paper eq. 3): CPU kernels, parallelised with at::parallel_for.
//
// Two loop shapes cover the three layouts: "rows" (kContiguous: each (b, n, c) pooling row of
// H*W elements is contiguous) and "columns" (channels-last layouts: per block (b, p) an
// [HW][Q] slab whose inner dimension q is contiguous; (p, q) = (n, c) or (c, n)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <limits>
#include <vector>

#include "channel_attention.h"

namespace fastnl {
namespace {

// Independent accumulator lanes, so that the row reductions vectorise.
constexpr int64_t kLanes = 8;

template <typename acc_t>
inline acc_t max_of(acc_t a, acc_t b) {
  return b > a ? b : a;
}

// Max and sum of one contiguous row.
template <typename scalar_t, typename acc_t>
inline void row_max_sum(const scalar_t* p, int64_t n, acc_t& mx, acc_t& sum) {
  acc_t m[kLanes], s[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) {
    m[k] = -std::numeric_limits<acc_t>::infinity();
    s[k] = 0;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(p[i + k]);
      m[k] = max_of(m[k], v);
      s[k] += v;
    }
  }
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(p[i]);
    m[0] = max_of(m[0], v);
    s[0] += v;
  }
  mx = m[0];
  sum = s[0];
  for (int64_t k = 1; k < kLanes; ++k) {
    mx = max_of(mx, m[k]);
    sum += s[k];
  }
}

template <typename scalar_t, typename acc_t>
inline acc_t row_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      s[k] += static_cast<acc_t>(a[i + k]) * static_cast<acc_t>(b[i + k]);
    }
  }
  for (; i < n; ++i) {
    s[0] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  }
  acc_t sum = s[0];
  for (int64_t k = 1; k < kLanes; ++k) {
    sum += s[k];
  }
  return sum;
}

// Columns family: p is the block's outer index, q the contiguous one.
struct Columns {
  int64_t P, Q;
  bool q_is_channel;
};

Columns columns_of(const Layout& l) {
  return l.kind == LayoutKind::kFrameChannelsLast ? Columns{l.N, l.C, true} : Columns{l.C, l.N, false};
}

// Index into a [B, N, C] tensor of block (b, p), column q.
inline int64_t pooled_index(const Layout& l, const Columns& cols, int64_t b, int64_t p, int64_t q) {
  return cols.q_is_channel ? (b * l.N + p) * l.C + q : (b * l.N + q) * l.C + p;
}

int64_t row_grain(int64_t row_len) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_len));
}

void pool_cpu(const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_channel_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* mp = gmp.mutable_data_ptr<acc_t>();
    acc_t* ap = gap.mutable_data_ptr<acc_t>();
    const int64_t HW = l.HW;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    if (l.kind == LayoutKind::kContiguous) {
      at::parallel_for(0, l.B * l.N * l.C, row_grain(HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t mx, sum;
          row_max_sum<scalar_t, acc_t>(xp + r * HW, HW, mx, sum);
          mp[r] = mx;
          ap[r] = sum * inv_hw;
        }
      });
      return;
    }
    const Columns cols = columns_of(l);
    const int64_t Q = cols.Q;
    at::parallel_for(0, l.B * cols.P, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> m(Q), s(Q);
      for (int64_t blk = begin; blk < end; ++blk) {
        std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(s.begin(), s.end(), acc_t(0));
        const scalar_t* base = xp + blk * HW * Q;
        for (int64_t hw = 0; hw < HW; ++hw) {
          const scalar_t* row = base + hw * Q;
          for (int64_t q = 0; q < Q; ++q) {
            const acc_t v = static_cast<acc_t>(row[q]);
            m[q] = max_of(m[q], v);
            s[q] += v;
          }
        }
        const int64_t b = blk / cols.P, p = blk % cols.P;
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t i = pooled_index(l, cols, b, p, q);
          mp[i] = m[q];
          ap[i] = s[q] * inv_hw;
        }
      }
    });
  });
}

void pool_stats_cpu(const at::Tensor& g, const at::Tensor& x, const Layout& l, at::Tensor& gmp, at::Tensor& gap,
                    at::Tensor& argmax, at::Tensor& dot) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_channel_pool_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    acc_t* mp = gmp.mutable_data_ptr<acc_t>();
    acc_t* ap = gap.mutable_data_ptr<acc_t>();
    acc_t* dp = dot.mutable_data_ptr<acc_t>();
    int64_t* ip = argmax.mutable_data_ptr<int64_t>();
    const int64_t HW = l.HW;
    const acc_t inv_hw = acc_t(1) / static_cast<acc_t>(HW);
    if (l.kind == LayoutKind::kContiguous) {
      at::parallel_for(0, l.B * l.N * l.C, row_grain(HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* row = xp + r * HW;
          acc_t mx, sum;
          row_max_sum<scalar_t, acc_t>(row, HW, mx, sum);
          int64_t at_max = 0;
          for (int64_t i = 0; i < HW; ++i) {
            if (static_cast<acc_t>(row[i]) == mx) {
              at_max = i;
              break;
            }
          }
          mp[r] = mx;
          ap[r] = sum * inv_hw;
          ip[r] = at_max;
          dp[r] = row_dot<scalar_t, acc_t>(gp + r * HW, row, HW);
        }
      });
      return;
    }
    const Columns cols = columns_of(l);
    const int64_t Q = cols.Q;
    at::parallel_for(0, l.B * cols.P, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> m(Q), s(Q), d(Q);
      std::vector<int64_t> am(Q);
      for (int64_t blk = begin; blk < end; ++blk) {
        std::fill(m.begin(), m.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(s.begin(), s.end(), acc_t(0));
        std::fill(d.begin(), d.end(), acc_t(0));
        std::fill(am.begin(), am.end(), int64_t(0));
        const scalar_t* xbase = xp + blk * HW * Q;
        const scalar_t* gbase = gp + blk * HW * Q;
        for (int64_t hw = 0; hw < HW; ++hw) {
          const scalar_t* xrow = xbase + hw * Q;
          const scalar_t* grow = gbase + hw * Q;
          for (int64_t q = 0; q < Q; ++q) {
            const acc_t v = static_cast<acc_t>(xrow[q]);
            if (v > m[q]) {
              m[q] = v;
              am[q] = hw;
            }
            s[q] += v;
            d[q] += static_cast<acc_t>(grow[q]) * v;
          }
        }
        const int64_t b = blk / cols.P, p = blk % cols.P;
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t i = pooled_index(l, cols, b, p, q);
          mp[i] = m[q];
          ap[i] = s[q] * inv_hw;
          ip[i] = am[q];
          dp[i] = d[q];
        }
      }
    });
  });
}

void scale_cpu(const at::Tensor& x, const at::Tensor& w, const Layout& l, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastnl_channel_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t HW = l.HW, C = l.C, N = l.N;
    if (l.kind == LayoutKind::kContiguous) {
      at::parallel_for(0, l.B * N * C, row_grain(HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t s = wp[(r / (N * C)) * C + r % C];
          const scalar_t* xr = xp + r * HW;
          scalar_t* orow = op + r * HW;
          for (int64_t i = 0; i < HW; ++i) {
            orow[i] = static_cast<scalar_t>(static_cast<acc_t>(xr[i]) * s);
          }
        }
      });
      return;
    }
    const Columns cols = columns_of(l);
    const int64_t Q = cols.Q;
    at::parallel_for(0, l.B * cols.P * HW, row_grain(Q), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t blk = r / HW, b = blk / cols.P, p = blk % cols.P;
        const scalar_t* xr = xp + r * Q;
        scalar_t* orow = op + r * Q;
        if (cols.q_is_channel) {
          const acc_t* ws = wp + b * C;
          for (int64_t q = 0; q < Q; ++q) {
            orow[q] = static_cast<scalar_t>(static_cast<acc_t>(xr[q]) * ws[q]);
          }
        } else {
          const acc_t s = wp[b * C + p];
          for (int64_t q = 0; q < Q; ++q) {
            orow[q] = static_cast<scalar_t>(static_cast<acc_t>(xr[q]) * s);
          }
        }
      }
    });
  });
}

void grad_input_cpu(const at::Tensor& g, const at::Tensor& w, const at::Tensor& dgmp, const at::Tensor& dgap,
                    const at::Tensor& argmax, const Layout& l, at::Tensor& grad_x) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fastnl_channel_grad_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* mp = dgmp.const_data_ptr<acc_t>();
    const acc_t* ap = dgap.const_data_ptr<acc_t>();
    const int64_t* ip = argmax.const_data_ptr<int64_t>();
    scalar_t* op = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t HW = l.HW, C = l.C, N = l.N;
    if (l.kind == LayoutKind::kContiguous) {
      at::parallel_for(0, l.B * N * C, row_grain(HW), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const acc_t s = wp[(r / (N * C)) * C + r % C];
          const acc_t spread = ap[r];
          const scalar_t* grow = gp + r * HW;
          scalar_t* orow = op + r * HW;
          for (int64_t i = 0; i < HW; ++i) {
            orow[i] = static_cast<scalar_t>(static_cast<acc_t>(grow[i]) * s + spread);
          }
          const int64_t i = ip[r];
          orow[i] = static_cast<scalar_t>(static_cast<acc_t>(grow[i]) * s + spread + mp[r]);
        }
      });
      return;
    }
    const Columns cols = columns_of(l);
    const int64_t Q = cols.Q;
    at::parallel_for(0, l.B * cols.P * HW, row_grain(Q), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t hw = r % HW, blk = r / HW, b = blk / cols.P, p = blk % cols.P;
        const scalar_t* grow = gp + r * Q;
        scalar_t* orow = op + r * Q;
        for (int64_t q = 0; q < Q; ++q) {
          const int64_t i = pooled_index(l, cols, b, p, q);
          const acc_t s = wp[b * C + (cols.q_is_channel ? q : p)];
          const acc_t routed = ip[i] == hw ? mp[i] : acc_t(0);
          orow[q] = static_cast<scalar_t>(static_cast<acc_t>(grow[q]) * s + ap[i] + routed);
        }
      }
    });
  });
}

}  // namespace

const Kernels kCpuKernels = {&pool_cpu, &pool_stats_cpu, &scale_cpu, &grad_input_cpu};

}  // namespace fastnl
