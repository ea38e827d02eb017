// Inter-node kernels (WorldSize > LocalWorldSize). A token crosses to each other node that holds one of its
// experts once: it is staged as a record [expert ids | rows | weights | token] and put, with a per-token
// signal, to the rank of that node with the same local rank (the proxy), which forwards it over peer stores
// to the ranks of its node. Nodes that hold none of the token's experts get the signal alone (no data), so a
// proxy knows when every token of a source has been decided. Combine runs the other way: the proxy sums the
// token's rows inside its node in fp32 and puts one fp32 partial back; the source adds its own node's rows
// and the partials and rounds once.
//
// No nvshmem_quiet: with the proxy enabled every device quiet is a round trip through the host proxy thread
// (it cost ~35 ms a step here). Reuse is safe without it: a source stages token t in x_send again only in
// the next step, after it has received (in this step's combine) the partial that the proxy sent after reading
// the record, and a proxy reuses c_stage only after the source's next count exchange, which follows the
// source's use of the partial. Delivery before use is what the put-with-signal guarantees.
#include <nvshmem.h>
#include <nvshmemx.h>

#include "internal.h"

namespace epa2a {

namespace {

// The record of token t as staged by its source: lane k < K gets entry k.
__device__ __forceinline__ void read_record(const DevCtx& c, const char* rec, int lane, int t, int& e,
                                            int& row, int& d, float& w, bool& valid) {
  e = -1;
  row = -1;
  d = -1;
  w = 1.f;
  valid = false;
  if (lane >= c.K) return;
  e = __ldcg(reinterpret_cast<const int*>(rec) + lane);
  row = __ldcg(reinterpret_cast<const int*>(rec) + c.K + lane);
  w = __ldcg(reinterpret_cast<const float*>(rec) + 2 * c.K + lane);
  if (e >= 0 && e < c.E && row >= 0) {
    d = e / c.Epr;
    if (row >= c.out_rows) {
      record_error(c, EPA2A_ERR_BAD_ROW, EPA2A_PHASE_FORWARD, d, t, row, 0, 0, 0, true);
    } else {
      valid = true;
    }
  }
  if (!valid) row = -1;
}

}  // namespace

template <typename V>
__global__ void internode_send_kernel(DevCtx c) {
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int K = c.K;
  for (int t = gw; t < c.n; t += nw) {
    int e = -1, row = -1, d = -1;
    float w = 1.f;
    bool valid = false;
    if (lane < K) {
      const int i = t * K + lane;
      e = c.ids[i];
      row = c.send_row[i];
      if (c.has_weights) w = c.wts[i];
      valid = e >= 0 && e < c.E && row >= 0 && row < c.out_rows;
      if (valid) d = e / c.Epr;
    }
    const bool remote = valid && d / c.L != c.node;
    char* rec = c.x_send + (size_t)t * c.rec_bytes;
    if (__ballot_sync(kFullMask, remote)) {
      if (lane < K) {
        reinterpret_cast<int*>(rec)[lane] = valid ? e : -1;
        reinterpret_cast<int*>(rec)[K + lane] = valid ? row : -1;
        reinterpret_cast<float*>(rec)[2 * K + lane] = w;
      }
      warp_copy<V>(rec + c.meta_bytes, c.tokens + (size_t)t * c.row_bytes, c.row_bytes, lane);
      __syncwarp();
    }
    const size_t slot = (size_t)c.node * c.max_tokens + t;
    for (int m = 0; m < c.N; ++m) {
      if (m == c.node) continue;
      const int peer = m * c.L + c.lrank;
      const bool has = __ballot_sync(kFullMask, remote && d / c.L == m) != 0;
      if (has) {
        nvshmemx_putmem_signal_nbi_warp(c.x_recv + slot * c.rec_bytes, rec, c.meta_bytes + c.row_bytes,
                                        c.x_sig + slot, 2 * step_epoch(c) + 1, NVSHMEM_SIGNAL_SET, peer);
      } else if (lane == 0) {
        nvshmemx_signal_op(c.x_sig + slot, 2 * step_epoch(c), NVSHMEM_SIGNAL_SET, peer);
      }
    }
  }
}

template <typename V>
__global__ void forward_kernel(DevCtx c) {
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int total = c.N * c.max_tokens;
  for (int task = gw; task < total; task += nw) {
    const int ns = task / c.max_tokens, t = task % c.max_tokens;
    if (ns == c.node) continue;
    const int s = ns * c.L + c.lrank;
    if (t >= c.dinfo[info_tokens(c.W) + s]) continue;
    const uint64_t* sig = c.x_sig + task;
    int ok = 1;
    unsigned long long v = 0;
    if (lane == 0) {
      ok = wait_signal(c, sig, 2 * step_epoch(c), s, EPA2A_PHASE_FORWARD, t) ? 1 : 0;
      v = ld_acquire_sys(sig);
    }
    __syncwarp();
    ok = __shfl_sync(kFullMask, ok, 0);
    if (!ok) return;
    v = __shfl_sync(kFullMask, v, 0);
    if (v != 2 * step_epoch(c) + 1) continue;  // no expert of this token on this node
    const char* rec = c.x_recv + (size_t)task * c.rec_bytes;
    int e, row, d;
    float w;
    bool valid;
    read_record(c, rec, lane, t, e, row, d, w, valid);
    const bool mine = valid && d / c.L == c.node;
    if (mine) {
      c.peer_origin[d][row] = make_int4(s, t, lane, -1);
      c.peer_w[d][row] = w;
    }
    for (int kk = 0; kk < c.K; ++kk) {
      if (!__shfl_sync(kFullMask, (int)mine, kk)) continue;
      const int r2 = __shfl_sync(kFullMask, row, kk);
      const int d2 = __shfl_sync(kFullMask, d, kk);
      warp_copy<V>(c.peer_out[d2] + (size_t)r2 * c.row_bytes, rec + c.meta_bytes, c.row_bytes, lane);
    }
  }
}

// On the proxy: one fp32 partial per (source node, token) over this node's rows, put back with a signal.
template <int TK, int G>
__global__ void combine_proxy_kernel(DevCtx c, int weighted) {
  using B = typename Tok<TK>::bits;
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int total = c.N * c.max_tokens;
  const int H = c.H;
  for (int task = gw; task < total; task += nw) {
    const int ns = task / c.max_tokens, t = task % c.max_tokens;
    if (ns == c.node) continue;
    const int s = ns * c.L + c.lrank;
    if (t >= c.dinfo[info_tokens(c.W) + s]) continue;
    if (ld_acquire_sys(c.x_sig + task) != 2 * step_epoch(c) + 1) continue;  // nothing of this token here
    const char* rec = c.x_recv + (size_t)task * c.rec_bytes;
    int e, row, d;
    float w;
    bool valid;
    read_record(c, rec, lane, t, e, row, d, w, valid);
    const bool mine = valid && d / c.L == c.node;
    const float scale = weighted ? w : 1.f;
    float* stage = c.c_stage + (size_t)task * H;
    for (int g0 = 0; g0 * G < H; g0 += 32) {
      const int g = g0 + lane;
      const bool active = g * G < H;
      float acc[G];
#pragma unroll
      for (int i = 0; i < G; ++i) acc[i] = 0.f;
      for (int kk = 0; kk < c.K; ++kk) {
        const int u = __shfl_sync(kFullMask, (int)mine, kk);
        const int r2 = __shfl_sync(kFullMask, row, kk);
        const int d2 = __shfl_sync(kFullMask, d, kk);
        const float s2 = __shfl_sync(kFullMask, scale, kk);
        if (u && active)
          acc_row<TK, G>(reinterpret_cast<const B*>(c.peer_out[d2] + (size_t)r2 * c.row_bytes) + g * G, s2,
                         acc);
      }
      if (active) store_f32<G>(stage + g * G, acc);
    }
    __syncwarp();
    const size_t slot = (size_t)c.node * c.max_tokens + t;
    nvshmemx_putmem_signal_nbi_warp(c.c_recv + slot * H, stage, sizeof(float) * H, c.c_sig + slot,
                                    combine_epoch(c), NVSHMEM_SIGNAL_SET, s);
  }
}

// On the source: this node's rows plus one partial from every other node that holds an expert of the token.
template <int TK, int G>
__global__ void combine_final_kernel(DevCtx c, void* out, int weighted) {
  using B = typename Tok<TK>::bits;
  if (failed(c)) return;
  const int lane = threadIdx.x & 31;
  const int gw = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int nw = (gridDim.x * blockDim.x) >> 5;
  const int H = c.H, K = c.K;
  for (int t = gw; t < c.n; t += nw) {
    int e = -1, row = -1, d = -1;
    float w = 1.f;
    bool valid = false;
    if (lane < K) {
      const int i = t * K + lane;
      e = c.ids[i];
      row = c.send_row[i];
      if (c.has_weights) w = c.wts[i];
      valid = e >= 0 && e < c.E && row >= 0 && row < c.out_rows;
      if (valid) d = e / c.Epr;
    }
    const bool here = valid && d / c.L == c.node;
    unsigned long long nodes = 0;
    for (int m = 0; m < c.N; ++m) {
      if (m != c.node && __ballot_sync(kFullMask, valid && d / c.L == m)) nodes |= 1ull << m;
    }
    for (int m = 0; m < c.N; ++m) {
      if (!((nodes >> m) & 1ull)) continue;
      int ok = 1;
      if (lane == 0)
        ok = wait_signal(c, c.c_sig + (size_t)m * c.max_tokens + t, combine_epoch(c), m * c.L + c.lrank,
                         EPA2A_PHASE_COMBINE_REMOTE, t)
                 ? 1
                 : 0;
      __syncwarp();
      if (!__shfl_sync(kFullMask, ok, 0)) return;
    }
    const float scale = weighted ? w : 1.f;
    B* dst = reinterpret_cast<B*>(out) + (size_t)t * H;
    for (int g0 = 0; g0 * G < H; g0 += 32) {
      const int g = g0 + lane;
      const bool active = g * G < H;
      float acc[G];
#pragma unroll
      for (int i = 0; i < G; ++i) acc[i] = 0.f;
      for (int kk = 0; kk < K; ++kk) {
        const int u = __shfl_sync(kFullMask, (int)here, kk);
        const int r2 = __shfl_sync(kFullMask, row, kk);
        const int d2 = __shfl_sync(kFullMask, d, kk);
        const float s2 = __shfl_sync(kFullMask, scale, kk);
        if (u && active)
          acc_row<TK, G>(reinterpret_cast<const B*>(c.peer_out[d2] + (size_t)r2 * c.row_bytes) + g * G, s2,
                         acc);
      }
      if (active) {
        for (int m = 0; m < c.N; ++m) {
          if ((nodes >> m) & 1ull)
            acc_f32<G>(c.c_recv + ((size_t)m * c.max_tokens + t) * H + g * G, 1.f, acc);
        }
        store_row<TK, G>(dst + g * G, acc);
      }
    }
  }
  // A rank that rejected its combine input marked that before its node's barrier, so a rank whose tokens went
  // through that node sees the mark once it has waited for their partials (a rank whose tokens did not has a
  // result that does not depend on it).
  if (lane == 0 && !c.rejecting) {
    const int p = rejected_peer(c, combine_epoch(c));
    if (p >= 0)
      record_error(c, EPA2A_ERR_PEER_REJECTED, EPA2A_PHASE_COMBINE_REMOTE, p, -1, -1, 0, 0, 0, false);
  }
}

cudaError_t launch_internode_send(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s) {
  if (c.n <= 0) return cudaSuccess;
  switch (vec_bytes) {
    case 16:
      internode_send_kernel<int4><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 8:
      internode_send_kernel<int2><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 4:
      internode_send_kernel<int><<<blocks, kThreads, 0, s>>>(c);
      break;
    default:
      internode_send_kernel<short><<<blocks, kThreads, 0, s>>>(c);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_forward(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s) {
  switch (vec_bytes) {
    case 16:
      forward_kernel<int4><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 8:
      forward_kernel<int2><<<blocks, kThreads, 0, s>>>(c);
      break;
    case 4:
      forward_kernel<int><<<blocks, kThreads, 0, s>>>(c);
      break;
    default:
      forward_kernel<short><<<blocks, kThreads, 0, s>>>(c);
      break;
  }
  return cudaGetLastError();
}

template <int TK>
static cudaError_t proxy_typed(const DevCtx& c, int blocks, bool wide, int weighted, cudaStream_t s) {
  constexpr int kWide = 16 / sizeof(typename Tok<TK>::bits);
  if (wide)
    combine_proxy_kernel<TK, kWide><<<blocks, kThreads, 0, s>>>(c, weighted);
  else
    combine_proxy_kernel<TK, 1><<<blocks, kThreads, 0, s>>>(c, weighted);
  return cudaGetLastError();
}

cudaError_t launch_combine_proxy(const DevCtx& c, int blocks, int token_type, bool wide, int weighted,
                                 cudaStream_t s) {
  switch (token_type) {
    case EPA2A_TOKEN_BF16:
      return proxy_typed<EPA2A_TOKEN_BF16>(c, blocks, wide, weighted, s);
    case EPA2A_TOKEN_FP16:
      return proxy_typed<EPA2A_TOKEN_FP16>(c, blocks, wide, weighted, s);
    default:
      return proxy_typed<EPA2A_TOKEN_FP32>(c, blocks, wide, weighted, s);
  }
}

template <int TK>
static cudaError_t final_typed(const DevCtx& c, void* out, int blocks, bool wide, int weighted,
                               cudaStream_t s) {
  constexpr int kWide = 16 / sizeof(typename Tok<TK>::bits);
  if (wide)
    combine_final_kernel<TK, kWide><<<blocks, kThreads, 0, s>>>(c, out, weighted);
  else
    combine_final_kernel<TK, 1><<<blocks, kThreads, 0, s>>>(c, out, weighted);
  return cudaGetLastError();
}

cudaError_t launch_combine_final(const DevCtx& c, void* out, int blocks, int token_type, bool wide,
                                 int weighted, cudaStream_t s) {
  if (c.n <= 0) return cudaSuccess;
  switch (token_type) {
    case EPA2A_TOKEN_BF16:
      return final_typed<EPA2A_TOKEN_BF16>(c, out, blocks, wide, weighted, s);
    case EPA2A_TOKEN_FP16:
      return final_typed<EPA2A_TOKEN_FP16>(c, out, blocks, wide, weighted, s);
    default:
      return final_typed<EPA2A_TOKEN_FP32>(c, out, blocks, wide, weighted, s);
  }
}

}  // namespace epa2a
