// Counting and deterministic row assignment.
//
// Entries (token, k) are cut into chunks of kChunk. count_kernel makes one histogram per chunk (atomics only
// count, they decide no order). exchange_kernel turns the chunk histograms into per-chunk exclusive bases,
// all-gathers the per-expert counts into every rank's [W, E+2] table with signals, and derives the offsets
// table: on destination d, the block of (local expert j, source s) starts at the padded prefix over j plus
// the counts of sources before s. assign_kernel gives each entry its row: block start + chunk base + rank of
// the entry among the earlier entries of its expert inside the chunk (a warp walks the chunk in order).
#include <nvshmem.h>
#include <nvshmemx.h>

#include "internal.h"

namespace epa2a {

__global__ void count_kernel(DevCtx c, int nchunks) {
  extern __shared__ int hist[];  // [E + 1]
  if (failed(c)) return;
  const int E = c.E;
  const int total = c.n * c.K;
  for (int ch = blockIdx.x; ch < nchunks; ch += gridDim.x) {
    for (int i = threadIdx.x; i <= E; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const int begin = ch * kChunk;
    const int end = min(begin + kChunk, total);
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
      int e = c.ids[i];
      if (e < 0 || e > E) {
        record_error(c, EPA2A_ERR_BAD_EXPERT_ID, EPA2A_PHASE_COUNT, -1, i, e, 0, 0, 0, false);
        e = E;  // treated as dropped everywhere
      }
      atomicAdd(&hist[e], 1);
    }
    __syncthreads();
    for (int i = threadIdx.x; i <= E; i += blockDim.x) c.chunk_hist[(size_t)ch * (E + 1) + i] = hist[i];
    __syncthreads();
  }
}

__global__ void exchange_kernel(DevCtx c, int nchunks) {
  if (failed(c)) return;
  const int E = c.E, W = c.W, Epr = c.Epr, me = c.me;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int row_len = E + 2;
  const uint64_t epoch = __ldcg(c.dep + kEpochDispatch) + 1;  // this step's; every thread reads it first
  // Per-chunk exclusive bases (in place) and this rank's totals.
  for (int e = tid; e <= E; e += nt) {
    int run = 0;
    for (int ch = 0; ch < nchunks; ++ch) {
      int* p = c.chunk_hist + (size_t)ch * (E + 1) + e;
      const int v = *p;
      *p = run;
      run += v;
    }
    c.my_counts[e] = run;
  }
  if (tid == 0) c.my_counts[E + 1] = c.rejecting ? -1 : c.n;  // -1 tokens: this rank rejected its input
  __syncthreads();
  if (tid == 0) c.dep[kEpochDispatch] = epoch;  // for the later kernels of this step
  for (int i = tid; i < row_len; i += nt) c.table[(size_t)me * row_len + i] = c.my_counts[i];
  __threadfence();
  __syncthreads();
  // All-gather: my row into every peer's table, each put followed by its signal.
  const int warp = tid / 32, nwarps = nt / 32;
  uint64_t* count_sig = c.sig + (size_t)EPA2A_SLOT_COUNTS * W;
  for (int p = warp; p < W; p += nwarps) {
    if (p == me) continue;
    nvshmemx_putmem_signal_warp(c.table + (size_t)me * row_len, c.my_counts, sizeof(int) * row_len,
                                count_sig + me, epoch, NVSHMEM_SIGNAL_SET, p);
  }
  for (int p = tid; p < W; p += nt) {
    if (p != me) wait_signal(c, count_sig + p, epoch, p, EPA2A_PHASE_EXCHANGE, EPA2A_SLOT_COUNTS);
  }
  __syncthreads();
  if (failed(c)) return;
  // A rank that rejected its input sent -1 tokens: every rank stops this step here together, and the host poll
  // (epa2a_dispatch_wait_sizes) reports the lowest such rank. Nothing was sent, so no reset is needed.
  __shared__ int rejected;
  if (tid == 0) {
    rejected = -1;
    for (int s = 0; s < W && rejected < 0; ++s)
      if (__ldcg(c.table + (size_t)s * row_len + E + 1) < 0) rejected = s;
    if (rejected >= 0) {
      c.dep[kEpochRejected] = epoch;  // the assign kernel of this step stops too
      // Fixed capacity (no host between the kernels): fatal, so that send and finish stop on every rank.
      if (!c.rejecting)
        record_error(c, EPA2A_ERR_PEER_REJECTED, EPA2A_PHASE_EXCHANGE, rejected, -1, -1, 0, 0, 0,
                     c.fixed_capacity != 0);
    }
  }
  __syncthreads();
  if (rejected >= 0) {
    volatile int* h = c.hinfo;
    for (int i = W + tid; i < info_len(W, Epr); i += nt) h[i] = 0;
    __syncthreads();
    for (int s = tid; s < W; s += nt) h[info_tokens(W) + s] = __ldcg(c.table + (size_t)s * row_len + E + 1);
    __threadfence_system();
    __syncthreads();
    for (int d = tid; d < W; d += nt) h[d] = 0;  // the sizes the host polls: known (nothing is received)
    __threadfence_system();
    return;
  }
  // Offsets. The table rows arrived from peers: read them past L1.
  const int align = c.has_scatter ? 1 : c.align;
  for (int e = tid; e < E; e += nt) {
    int sum = 0;
    for (int s = 0; s < W; ++s) sum += __ldcg(c.table + (size_t)s * row_len + e);
    c.expert_rows[e] = sum;
  }
  __syncthreads();
  for (int d = tid; d < W; d += nt) {
    int row = 0;
    for (int j = 0; j < Epr; ++j) {
      const int e = d * Epr + j;
      c.estart[e] = row;
      row += round_up(c.expert_rows[e], align);
    }
    c.dinfo[info_recv(W) + d] = row;
    c.dinfo[info_tokens(W) + d] = __ldcg(c.table + (size_t)d * row_len + E + 1);
  }
  __syncthreads();
  if (c.fixed_capacity) {
    // No host sizes the buffers in this mode: every rank sees the same table, so every rank stops here
    // together when any rank would receive more rows than the buffers hold.
    __shared__ int over;
    if (tid == 0) {
      over = -1;
      for (int d = 0; d < W && over < 0; ++d)
        if (c.dinfo[info_recv(W) + d] > c.out_rows) over = d;
      if (over >= 0)
        record_error(c, EPA2A_ERR_CAPACITY, EPA2A_PHASE_ASSIGN, over, -1, c.dinfo[info_recv(W) + over],
                     c.out_rows, 0, 0, true);
    }
    __syncthreads();
    if (over >= 0) return;
  }
  if (tid == 0) {
    int off = 0;
    for (int d = 0; d < W; ++d) {
      c.dinfo[info_offset(W) + d] = off;
      off += c.dinfo[info_recv(W) + d];
    }
  }
  for (int e = tid; e < E; e += nt) {
    int b = c.estart[e];
    for (int s = 0; s < me; ++s) b += __ldcg(c.table + (size_t)s * row_len + e);
    c.send_base[e] = b;
  }
  for (int j = tid; j < Epr; j += nt) {
    const int e = me * Epr + j;
    const int rows = c.expert_rows[e];
    c.dinfo[info_rows(W, Epr) + j] = rows;
    c.dinfo[info_padded(W, Epr) + j] = round_up(rows, align);
    c.dinfo[info_start(W, Epr) + j] = c.estart[e];
  }
  __syncthreads();
  // Host copy: everything but the receive sizes first, then the sizes the host polls.
  volatile int* h = c.hinfo;
  for (int i = W + tid; i < info_len(W, Epr); i += nt) h[i] = c.dinfo[i];
  __threadfence_system();
  __syncthreads();
  for (int d = tid; d < W; d += nt) h[d] = c.dinfo[d];
  __threadfence_system();
}

__global__ void assign_kernel(DevCtx c, int nchunks, int warps_per_block) {
  extern __shared__ int counters[];  // [warps_per_block][E + 1]
  if (failed(c)) return;
  if (__ldcg(c.dep + kEpochRejected) == step_epoch(c)) return;  // a rank rejected this step's input
  const int E = c.E, W = c.W, Epr = c.Epr;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int total = c.n * c.K;
  const int* recv = c.dinfo + info_recv(W);
  const int* offset = c.dinfo + info_offset(W);
  if (c.has_scatter) {
    // Rows come from the caller: bounds-check each against its destination's rows.
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
      const int e = c.ids[i];
      int row = -1, global = -1;
      if (e >= 0 && e < E) {
        const int d = e / Epr;
        const int g = c.user_scatter[i];
        if (g >= offset[d] && g < offset[d] + recv[d]) {
          row = g - offset[d];
          global = g;
        } else {
          record_error(c, EPA2A_ERR_BAD_SCATTER_INDEX, EPA2A_PHASE_ASSIGN, d, i, g, 0, 0, 0, false);
        }
      }
      c.send_row[i] = row;
      c.scatter[i] = global;
    }
    return;
  }
  if (warp >= warps_per_block) return;
  int* cnt = counters + warp * (E + 1);
  for (int ch = blockIdx.x * warps_per_block + warp; ch < nchunks; ch += gridDim.x * warps_per_block) {
    for (int i = lane; i <= E; i += 32) cnt[i] = 0;
    __syncwarp();
    const int begin = ch * kChunk;
    const int end = min(begin + kChunk, total);
    const int* base = c.chunk_hist + (size_t)ch * (E + 1);
    for (int b = begin; b < end; b += 32) {
      const int i = b + lane;
      const bool in = i < end;
      const int e = in ? c.ids[i] : -1;
      const bool valid = in && e >= 0 && e < E;
      const unsigned same = __match_any_sync(kFullMask, valid ? e : -1);
      const int rank = __popc(same & ((1u << lane) - 1u));
      const int before = valid ? cnt[e] : 0;
      __syncwarp();
      if (valid && rank == 0) cnt[e] = before + __popc(same);
      __syncwarp();
      if (!in) continue;
      int row = -1, global = -1;
      if (valid) {
        const int d = e / Epr;
        row = c.send_base[e] + base[e] + before + rank;
        if (row < 0 || row >= recv[d]) {
          record_error(c, EPA2A_ERR_BAD_ROW, EPA2A_PHASE_ASSIGN, d, i, row, 0, 0, 0, true);
          row = -1;
        } else {
          global = offset[d] + row;
        }
      }
      c.send_row[i] = row;
      c.scatter[i] = global;
    }
    __syncwarp();
  }
}

cudaError_t launch_count(const DevCtx& c, int nchunks, int blocks, cudaStream_t s) {
  if (nchunks <= 0) return cudaSuccess;
  count_kernel<<<min(blocks, nchunks), kThreads, sizeof(int) * (c.E + 1), s>>>(c, nchunks);
  return cudaGetLastError();
}

cudaError_t launch_exchange(const DevCtx& c, int nchunks, cudaStream_t s) {
  exchange_kernel<<<1, 512, 0, s>>>(c, nchunks);
  return cudaGetLastError();
}

cudaError_t launch_assign(const DevCtx& c, int nchunks, int blocks, cudaStream_t s) {
  const int total = c.n * c.K;
  if (total <= 0) return cudaSuccess;
  if (c.has_scatter) {
    assign_kernel<<<min(blocks, (total + kThreads - 1) / kThreads), kThreads, 0, s>>>(c, nchunks, 0);
    return cudaGetLastError();
  }
  // Per-warp counters of E + 1 ints in shared memory: at most 48 KiB per block.
  int wpb = 4;
  while (wpb > 1 && (size_t)wpb * (c.E + 1) * sizeof(int) > 48 * 1024) --wpb;
  const int grid = min(blocks, (nchunks + wpb - 1) / wpb);
  assign_kernel<<<grid, 32 * wpb, sizeof(int) * wpb*(c.E + 1), s>>>(c, nchunks, wpb);
  return cudaGetLastError();
}

}  // namespace epa2a
