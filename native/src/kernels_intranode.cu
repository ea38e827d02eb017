// Intra-node kernels: direct peer stores for dispatch (warp per token, vector copies), the layer barrier,
// local-combine expansion and padding, the local-combine pre-sum, and the pulling combine.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "internal.h"

namespace epa2a {

// A warp's view of one token's K entries: lane k < K holds entry k.
struct Entry {
  int e = -1, row = -1, d = -1;
  float w = 1.f;
  bool valid = false;
};

__device__ __forceinline__ Entry load_entry(const DevCtx& c, int t, int lane, int phase) {
  Entry x;
  if (lane < c.K) {
    const int i = t * c.K + lane;
    x.e = c.ids[i];
    x.row = c.send_row[i];
    if (c.has_weights) x.w = c.wts[i];
    if (x.e >= 0 && x.e < c.E && x.row >= 0) {
      x.d = x.e / c.Epr;
      if (x.row >= c.out_rows) {
        record_error(c, EPA2A_ERR_BAD_ROW, phase, x.d, i, x.row, 0, 0, 0, true);
      } else {
        x.valid = true;
      }
    }
  }
  if (!x.valid) x.row = -1;
  return x;
}

// Local combine: the entry with the smallest row among this token's entries for the same rank is the one
// that crosses; `next` chains the token's rows on that rank in row order.
__device__ __forceinline__ void same_rank_links(const Entry& x, int K, int& primary, int& next) {
  primary = x.row;
  next = -1;
  for (int kk = 0; kk < K; ++kk) {
    const int r2 = __shfl_sync(kFullMask, x.row, kk);
    const int d2 = __shfl_sync(kFullMask, x.d, kk);
    if (x.valid && r2 >= 0 && d2 == x.d) {
      if (r2 < primary) primary = r2;
      if (r2 > x.row && (next < 0 || r2 < next)) next = r2;
    }
  }
}

template <typename V>
__global__ void dispatch_kernel(DevCtx c) {
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  for (int t = gw; t < c.n; t += nw) {
    const Entry x = load_entry(c, t, lane, EPA2A_PHASE_DISPATCH);
    const bool here = x.valid && x.d / c.L == c.node;  // this node; other nodes go through internode_send
    int primary = x.row, next = -1;
    if (c.local_combine) same_rank_links(x, c.K, primary, next);
    const bool crosses = here && primary == x.row;
    if (here) {
      c.peer_origin[x.d][x.row] = make_int4(c.me, t, lane, c.local_combine ? next : -1);
      c.peer_w[x.d][x.row] = x.w;
      if (!crosses) c.peer_lcsrc[x.d][x.row] = primary;  // `here` holds: x.d is a node peer
    }
    // The token is read once, kUnroll vectors a lane at a time (several loads in flight), and each chunk is
    // stored to every row that crosses.
    const V* src = reinterpret_cast<const V*>(c.tokens + (size_t)t * c.row_bytes);
    const int units = c.row_bytes / (int)sizeof(V);
    const unsigned dests = __ballot_sync(kFullMask, crosses);
    for (int base = 0; dests && base < units; base += 32 * kUnroll) {
      V r[kUnroll];
#pragma unroll
      for (int i = 0; i < kUnroll; ++i) {
        const int u = base + i * 32 + lane;
        if (u < units) r[i] = __ldcg(src + u);
      }
      for (unsigned m = dests; m; m &= m - 1) {
        const int kk = __ffs(m) - 1;
        const int r2 = __shfl_sync(kFullMask, x.row, kk);
        const int d2 = __shfl_sync(kFullMask, x.d, kk);
        V* dst = reinterpret_cast<V*>(c.peer_out[d2] + (size_t)r2 * c.row_bytes);
#pragma unroll
        for (int i = 0; i < kUnroll; ++i) {
          const int u = base + i * 32 + lane;
          if (u < units) dst[u] = r[i];
        }
      }
    }
  }
}

// Signals every rank of [first, first + count), then waits for each of them, with the layer's deadline. The
// epoch is device counter `counter` (+ 1 and stored back when `bump`), so a captured graph replays correctly.
__global__ void barrier_kernel(DevCtx c, int slot, int counter, int bump, int first, int count) {
  if (failed(c)) return;
  const uint64_t epoch = __ldcg(c.dep + counter) + (bump ? 1 : 0);
  __syncthreads();
  if (bump && threadIdx.x == 0) c.dep[counter] = epoch;
  __threadfence_system();
  uint64_t* base = c.sig + (size_t)slot * c.W;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int p = first + i;
    if (p != c.me) nvshmemx_signal_op(base + c.me, epoch, NVSHMEM_SIGNAL_SET, p);
  }
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int p = first + i;
    if (p != c.me) wait_signal(c, base + p, epoch, p, EPA2A_PHASE_BARRIER, slot);
  }
  if (slot == EPA2A_SLOT_COMBINE_READY && !c.rejecting) {
    // Every rank of the node has arrived, and a rank that rejected its combine input marked that before it did.
    __syncthreads();
    if (threadIdx.x == 0 && !failed(c)) {
      const int p =
          rejected_peer(c, epoch, first, count);  // this barrier's ranks: their marks came before it
      if (p >= 0) {
        c.dep[kEpochCombineRejected] = epoch;
        record_error(c, EPA2A_ERR_PEER_REJECTED, EPA2A_PHASE_COMBINE, p, -1, -1, 0, 0, 0, false);
      }
    }
  }
}

// epa2a_combine_reject, before its combine barrier: marks in every rank's reject word that this rank rejects the
// combine with the coming epoch, and completes the puts (so that a rank on another node sees the mark before any
// partial that went through this node). One thread: a put a rank.
__global__ void reject_mark_kernel(DevCtx c) {
  if (failed(c) || threadIdx.x != 0) return;
  const uint64_t epoch = __ldcg(c.dep + kEpochCombine) + 1;  // the combine barrier's (it bumps the counter)
  for (int p = 0; p < c.W; ++p)
    if (p != c.me) nvshmem_uint64_p(c.reject + c.me, epoch, p);
  nvshmem_quiet();
}

// After the dispatch barrier: copy each local-combine row from the row that crossed, and fill padding rows.
template <typename V>
__global__ void expand_kernel(DevCtx c) {
  if (failed(c)) return;
  const int W = c.W, Epr = c.Epr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, wpb = blockDim.x >> 5;
  const int recv = c.dinfo[info_recv(W) + c.me];
  if (c.local_combine) {
    const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int nw = (gridDim.x * blockDim.x) >> 5;
    for (int r = gw; r < recv; r += nw) {
      const int s = __ldcg(c.lcsrc + r);
      if (s >= 0) {
        if (s < recv && s != r) {
          warp_copy<V>(c.out + (size_t)r * c.row_bytes, c.out + (size_t)s * c.row_bytes, c.row_bytes, lane);
        } else if (lane == 0) {
          record_error(c, EPA2A_ERR_BAD_ROW, EPA2A_PHASE_EXPAND, -1, r, s, 0, 0, 0, true);
        }
      }
      __syncwarp();
      if (lane == 0) {
        c.lc_head[r] = s < 0 ? 1 : 0;
        c.lcsrc[r] = -1;  // reset for the next step
      }
    }
  }
  for (int j = blockIdx.x; j < Epr; j += gridDim.x) {
    const int rows = c.dinfo[info_rows(W, Epr) + j];
    const int padded = c.dinfo[info_padded(W, Epr) + j];
    const int start = c.dinfo[info_start(W, Epr) + j];
    for (int r = start + rows + warp; r < start + padded; r += wpb) {
      if (r >= c.out_rows) break;
      warp_zero<V>(c.out + (size_t)r * c.row_bytes, c.row_bytes, lane);
      if (lane == 0) {
        c.out_w[r] = 0.f;
        c.origin[r] = make_int4(-1, -1, -1, -1);  // presum skips rows whose origin is -1
      }
    }
  }
}

// Local combine, on the expert rank: one fp32 partial per (source token, this rank), at the row that crossed.
template <int TK, int G>
__global__ void presum_kernel(DevCtx c, int weighted) {
  using B = typename Tok<TK>::bits;
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int recv = c.dinfo[info_recv(c.W) + c.me];
  const int H = c.H;
  for (int r = gw; r < recv; r += nw) {
    if (!c.lc_head[r] || c.origin[r].x < 0) continue;
    // Lane i holds the i-th row of the chain.
    int my_row = -1, len = 0;
    float my_w = 0.f;
    for (int q = r; q >= 0 && q < recv && len < c.K; ++len) {
      if (lane == len) {
        my_row = q;
        my_w = weighted ? c.out_w[q] : 1.f;
      }
      q = c.origin[q].w;
    }
    for (int g0 = 0; g0 * G < H; g0 += 32) {
      const int g = g0 + lane;
      const bool active = g * G < H;
      float acc[G];
#pragma unroll
      for (int i = 0; i < G; ++i) acc[i] = 0.f;
      for (int i = 0; i < len; ++i) {
        const int q = __shfl_sync(kFullMask, my_row, i);
        const float w = __shfl_sync(kFullMask, my_w, i);
        if (active)
          acc_row<TK, G>(reinterpret_cast<const B*>(c.out + (size_t)q * c.row_bytes) + g * G, w, acc);
      }
      if (active) store_f32<G>(c.partial + (size_t)r * H + g * G, acc);
    }
  }
}

// Intra-node combine: each token pulls its rows (or, with local combine, one partial per rank) and sums in
// fp32, rounding once.
template <int TK, int G>
__global__ void combine_kernel(DevCtx c, void* out, int weighted) {
  using B = typename Tok<TK>::bits;
  if (failed(c)) return;
  if (__ldcg(c.dep + kEpochCombineRejected) == combine_epoch(c))
    return;  // recorded at the barrier: no output
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int H = c.H;
  for (int t = gw; t < c.n; t += nw) {
    const Entry x = load_entry(c, t, lane, EPA2A_PHASE_COMBINE);
    int primary = x.row, next = -1;
    if (c.local_combine) same_rank_links(x, c.K, primary, next);
    const bool use = x.valid && primary == x.row;
    const float scale = weighted && !c.local_combine ? x.w : 1.f;
    B* dst = reinterpret_cast<B*>(out) + (size_t)t * H;
    if constexpr (G * sizeof(B) == 16) {
      if (!c.local_combine) {
        // Rows in batches of kUnroll: their loads are all in flight before the sums.
        const unsigned rows = __ballot_sync(kFullMask, use);
        for (int g0 = 0; g0 * G < H; g0 += 32) {
          const int g = g0 + lane;
          const bool active = g * G < H;
          float acc[G];
#pragma unroll
          for (int i = 0; i < G; ++i) acc[i] = 0.f;
          for (unsigned m = rows; m;) {
            int4 raw[kUnroll];
            float sc[kUnroll];
#pragma unroll
            for (int j = 0; j < kUnroll; ++j) {
              sc[j] = 0.f;
              raw[j] = make_int4(0, 0, 0, 0);
              if (m) {
                const int kk = __ffs(m) - 1;
                m &= m - 1;
                const int r2 = __shfl_sync(kFullMask, x.row, kk);
                const int d2 = __shfl_sync(kFullMask, x.d, kk);
                sc[j] = __shfl_sync(kFullMask, scale, kk);
                if (active)
                  raw[j] =
                      __ldcg(reinterpret_cast<const int4*>(c.peer_out[d2] + (size_t)r2 * c.row_bytes) + g);
              }
            }
#pragma unroll
            for (int j = 0; j < kUnroll; ++j) acc_raw<TK, G>(raw[j], sc[j], acc);
          }
          if (active) store_row<TK, G>(dst + g * G, acc);
        }
        continue;
      }
    }
    for (int g0 = 0; g0 * G < H; g0 += 32) {
      const int g = g0 + lane;
      const bool active = g * G < H;
      float acc[G];
#pragma unroll
      for (int i = 0; i < G; ++i) acc[i] = 0.f;
      for (int kk = 0; kk < c.K; ++kk) {
        const int u = __shfl_sync(kFullMask, (int)use, kk);
        const int r2 = __shfl_sync(kFullMask, x.row, kk);
        const int d2 = __shfl_sync(kFullMask, x.d, kk);
        const float s2 = __shfl_sync(kFullMask, scale, kk);
        if (!u || !active) continue;
        if (c.local_combine) {
          acc_f32<G>(c.peer_partial[d2] + (size_t)r2 * H + g * G, 1.f, acc);
        } else {
          acc_row<TK, G>(reinterpret_cast<const B*>(c.peer_out[d2] + (size_t)r2 * c.row_bytes) + g * G, s2,
                         acc);
        }
      }
      if (active) store_row<TK, G>(dst + g * G, acc);
    }
  }
}

// Fixed capacity: copies the caller's expert output into the receive rows; the row count is on the device.
__global__ void copy_rows_kernel(DevCtx c, const int4* src) {
  if (failed(c)) return;
  const size_t units = (size_t)c.dinfo[info_recv(c.W) + c.me] * c.row_bytes / sizeof(int4);
  int4* dst = reinterpret_cast<int4*>(c.out);
  for (size_t u = blockIdx.x * (size_t)blockDim.x + threadIdx.x; u < units;
       u += (size_t)gridDim.x * blockDim.x)
    dst[u] = __ldg(src + u);
}

cudaError_t launch_copy_rows(const DevCtx& c, const void* src, int blocks, cudaStream_t s) {
  copy_rows_kernel<<<blocks, kThreads, 0, s>>>(c, static_cast<const int4*>(src));
  return cudaGetLastError();
}

cudaError_t launch_dispatch(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s) {
  if (c.n <= 0) return cudaSuccess;
  switch (vec_bytes) {
    case 16:
      dispatch_kernel<int4><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 8:
      dispatch_kernel<int2><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 4:
      dispatch_kernel<int><<<blocks, kThreads, 0, s>>>(c);
      break;
    default:
      dispatch_kernel<short><<<blocks, kThreads, 0, s>>>(c);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_barrier(const DevCtx& c, int slot, int counter, bool bump, int first, int count,
                           cudaStream_t s) {
  barrier_kernel<<<1, 128, 0, s>>>(c, slot, counter, bump ? 1 : 0, first, count);
  return cudaGetLastError();
}

cudaError_t launch_reject_mark(const DevCtx& c, cudaStream_t s) {
  reject_mark_kernel<<<1, 32, 0, s>>>(c);
  return cudaGetLastError();
}

cudaError_t launch_expand(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s) {
  switch (vec_bytes) {
    case 16:
      expand_kernel<int4><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 8:
      expand_kernel<int2><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 4:
      expand_kernel<int><<<blocks, kThreads, 0, s>>>(c);
      break;
    default:
      expand_kernel<short><<<blocks, kThreads, 0, s>>>(c);
      break;
  }
  return cudaGetLastError();
}

template <int TK>
static cudaError_t presum_typed(const DevCtx& c, int blocks, bool wide, int weighted, cudaStream_t s) {
  constexpr int kWide = 16 / sizeof(typename Tok<TK>::bits);
  if (wide)
    presum_kernel<TK, kWide><<<blocks, kThreads, 0, s>>>(c, weighted);
  else
    presum_kernel<TK, 1><<<blocks, kThreads, 0, s>>>(c, weighted);
  return cudaGetLastError();
}

cudaError_t launch_presum(const DevCtx& c, int blocks, int token_type, bool wide, int weighted,
                          cudaStream_t s) {
  switch (token_type) {
    case EPA2A_TOKEN_BF16:
      return presum_typed<EPA2A_TOKEN_BF16>(c, blocks, wide, weighted, s);
    case EPA2A_TOKEN_FP16:
      return presum_typed<EPA2A_TOKEN_FP16>(c, blocks, wide, weighted, s);
    default:
      return presum_typed<EPA2A_TOKEN_FP32>(c, blocks, wide, weighted, s);
  }
}

template <int TK>
static cudaError_t combine_typed(const DevCtx& c, void* out, int blocks, bool wide, int weighted,
                                 cudaStream_t s) {
  constexpr int kWide = 16 / sizeof(typename Tok<TK>::bits);
  if (wide)
    combine_kernel<TK, kWide><<<blocks, kThreads, 0, s>>>(c, out, weighted);
  else
    combine_kernel<TK, 1><<<blocks, kThreads, 0, s>>>(c, out, weighted);
  return cudaGetLastError();
}

cudaError_t launch_combine(const DevCtx& c, void* out, int blocks, int token_type, bool wide, int weighted,
                           cudaStream_t s) {
  if (c.n <= 0) return cudaSuccess;
  switch (token_type) {
    case EPA2A_TOKEN_BF16:
      return combine_typed<EPA2A_TOKEN_BF16>(c, out, blocks, wide, weighted, s);
    case EPA2A_TOKEN_FP16:
      return combine_typed<EPA2A_TOKEN_FP16>(c, out, blocks, wide, weighted, s);
    default:
      return combine_typed<EPA2A_TOKEN_FP32>(c, out, blocks, wide, weighted, s);
  }
}

}  // namespace epa2a
