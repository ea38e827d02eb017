// Low-latency kernels (decode sizes), pull-based, one kernel per half phase, no host in the loop.
//
// dispatch_send: block 0 routes: each (token, k) entry's slot among this rank's entries for its expert, in
// (token, k) order, from per-warp counts in shared memory (atomics decide nothing), written with the counts
// into every destination's meta section of this rank. The other blocks quantize (or copy) the tokens into
// this rank's symmetric send rows. The last block to finish sets every rank's dispatch signal [me].
// dispatch_recv: waits for every source's signal, prefixes the counts per local expert over sources, pulls
// each row (16-byte loads, kLLUnroll in flight) from its source's send rows into the compact layout, and
// stores the row it landed at into the source's pos. combine_send: copies the expert rows into the symmetric
// combine buffer (nothing for zero-copy), then the last block sets every rank's combine signal [me].
// combine_recv: waits for every rank's signal, then each token pulls its K rows at pos, weights them, sums in
// fp32 in k order and rounds once. Signals are monotonic epochs kept in device memory, bumped by the send
// kernels, so graph replays stay fresh.
#include <cuda_fp8.h>

#include <algorithm>

#include "ll_internal.h"

namespace epa2a {

namespace {

constexpr unsigned kLLMaxSleepNs = 256;  // few waiters: poll often

// Signals are stored by a release atomic max and polled by atomics, both performed at the L2. With plain
// release stores and relaxed-load polls, a receiver on the H100 under MPS once in about 15,000 replays kept
// reading a signal's previous epoch for the whole 5 s deadline while the memory already held the new one (a
// dump taken after the timeout showed it; the sender had long finished). Same latency either way (measured).
__device__ __forceinline__ void ll_signal(uint64_t* p, uint64_t v) {
  asm volatile("red.release.sys.global.max.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ bool ll_wait(const LLCtx& c, const uint64_t* sig, uint64_t epoch, int peer,
                                        int phase) {
  return wait_signal<LLCtx, kLLMaxSleepNs, true>(c, sig, epoch, peer, phase, peer);
}

template <typename T>
__device__ __forceinline__ T* peer_ptr(const LLCtx& c, int kind, int rank) {
  return reinterpret_cast<T*>(
      __ldg(reinterpret_cast<const unsigned long long*>(c.peers) + (size_t)kind * c.W + rank));
}

__device__ __forceinline__ int row_bytes(const LLCtx& c) {
  return c.format == EPA2A_LL_FORMAT_BF16 ? c.H * 2 : c.H;
}

// Every block calls this after its work. The last block to arrive bumps the epoch and stores it into slot
// `me` of every rank's signal array `kind`; the counter wraps back to 0 for the next launch (graph replays).
__device__ void finish_and_signal(const LLCtx& c, unsigned* counter, uint64_t* epoch_slot, int kind) {
  __shared__ int last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();  // this block's stores (local and peer, system scope) before its arrival
    last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  const uint64_t epoch = __ldcg(epoch_slot) + 1;
  __threadfence_system();  // every block's stores before any signal
  for (int r = threadIdx.x; r < c.W; r += blockDim.x) ll_signal(peer_ptr<uint64_t>(c, kind, r) + c.me, epoch);
  __syncthreads();
  if (threadIdx.x == 0) *epoch_slot = epoch;  // for this rank's receive kernel
}

// Block 0 of dispatch_send: the slot of every entry and the counts, into each destination's meta[me].
__device__ void route_entries(const LLCtx& c) {
  extern __shared__ int smem[];  // wcnt[warps][E], base[E], ids[M * K]
  const int E = c.E, Epr = c.Epr, MK = c.M * c.K;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nwarps = blockDim.x >> 5;
  int* wcnt = smem;
  int* base = smem + nwarps * E;
  int* sid = base + E;
  const int total = c.n * c.K;
  // Every id (and weight) first, all loads in flight at once; then the chunks work from shared memory.
#pragma unroll 8
  for (int i = tid; i < total; i += blockDim.x) {
    sid[i] = __ldg(c.ids + i);
    c.wts[i] = c.weights ? __ldg(c.weights + i) : 1.f;
  }
  for (int e = tid; e < E; e += blockDim.x) base[e] = 0;
  __syncthreads();
  for (int c0 = 0; c0 < total; c0 += blockDim.x) {
    const int i = c0 + tid;
    const bool in = i < total;
    int e = in ? sid[i] : E;
    if (in && (e < 0 || e > E)) {
      record_error(c, EPA2A_ERR_BAD_EXPERT_ID, EPA2A_PHASE_LL_DISPATCH_SEND, -1, i, e, 0, 0, 0, false);
      e = E;  // dropped
    }
    const bool valid = in && e < E;
    const unsigned same = __match_any_sync(kFullMask, valid ? e : -1);
    const unsigned below = same & ((1u << lane) - 1u);
    for (int x = lane; x < E; x += 32) wcnt[warp * E + x] = 0;
    __syncwarp();
    if (valid && below == 0) wcnt[warp * E + e] = __popc(same);
    __syncthreads();
    if (in) {
      if (valid) {
        int slot = base[e] + __popc(below);
        for (int w = 0; w < warp; ++w) slot += wcnt[w * E + e];
        const int d = e / Epr, j = e - d * Epr;
        int* m = peer_ptr<int>(c, kPeerMeta, d) + (size_t)c.me * c.meta_stride + Epr + (size_t)j * MK;
        m[slot] = i;
      }
      c.route[i] = valid ? e : -1;
    }
    __syncthreads();
    for (int x = tid; x < E; x += blockDim.x) {
      int sum = 0;
      for (int w = 0; w < nwarps; ++w) sum += wcnt[w * E + x];
      base[x] += sum;
    }
    __syncthreads();
  }
  for (int e = tid; e < E; e += blockDim.x) {
    const int d = e / Epr;
    peer_ptr<int>(c, kPeerMeta, d)[(size_t)c.me * c.meta_stride + (e - d * Epr)] = base[e];
  }
}

// bf16: the tokens into the send rows, kLLUnroll 16-byte loads in flight per thread.
__device__ void copy_tokens(const LLCtx& c, int qb, int nqb) {
  const size_t units = (size_t)c.n * c.H / 8;
  const int4* src = reinterpret_cast<const int4*>(c.x);
  int4* dst = reinterpret_cast<int4*>(c.send_x);
  const size_t nt = (size_t)nqb * blockDim.x;
  for (size_t b = (size_t)qb * blockDim.x + threadIdx.x; b < units; b += nt * kLLUnroll) {
    int4 r[kLLUnroll];
#pragma unroll
    for (int u = 0; u < kLLUnroll; ++u) {
      const size_t q = b + u * nt;
      if (q < units) r[u] = __ldg(src + q);
    }
#pragma unroll
    for (int u = 0; u < kLLUnroll; ++u) {
      const size_t q = b + u * nt;
      if (q < units) dst[q] = r[u];
    }
  }
}

__device__ __forceinline__ float bf16_bits_to_float(unsigned short b) {
  return __uint_as_float((unsigned)b << 16);
}

// fp8: a half-warp per 128-channel group (8 channels a lane), kLLUnroll groups per half-warp in flight.
__device__ void quantize_tokens(const LLCtx& c, int qb, int nqb) {
  const int G = c.H / kLLGroup;
  const int pairs = (G + 1) / 2;
  const int items = c.n * pairs;
  const int lane = threadIdx.x & 31, half = lane >> 4, hl = lane & 15;
  const int wpb = blockDim.x >> 5;
  const int gw = qb * wpb + (threadIdx.x >> 5), nw = nqb * wpb;
  const bool pow2 = c.format == EPA2A_LL_FORMAT_FP8_POW2;
  for (int b = gw * kLLUnroll; b < items; b += nw * kLLUnroll) {
    int4 v[kLLUnroll];
#pragma unroll
    for (int u = 0; u < kLLUnroll; ++u) {
      const int it = b + u, t = it / pairs, g = (it - t * pairs) * 2 + half;
      v[u] = make_int4(0, 0, 0, 0);
      if (it < items && g < G)
        v[u] =
            __ldg(reinterpret_cast<const int4*>(c.x + ((size_t)t * c.H + (size_t)g * kLLGroup + hl * 8) * 2));
    }
#pragma unroll
    for (int u = 0; u < kLLUnroll; ++u) {
      const int it = b + u, t = it / pairs, g = (it - t * pairs) * 2 + half;
      const unsigned short* h = reinterpret_cast<const unsigned short*>(&v[u]);
      float f[8];
      float a = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        f[i] = bf16_bits_to_float(h[i]);
        a = fmaxf(a, fabsf(f[i]));
      }
      a = fmaxf(a, __shfl_xor_sync(kFullMask, a, 8));
      a = fmaxf(a, __shfl_xor_sync(kFullMask, a, 4));
      a = fmaxf(a, __shfl_xor_sync(kFullMask, a, 2));
      a = fmaxf(a, __shfl_xor_sync(kFullMask, a, 1));
      float scale = 1.f;
      if (a > 0.f) {
        scale = __fdiv_rn(a, 448.f);
        if (pow2) {
          unsigned bits = __float_as_uint(scale);
          if (bits & 0x7fffffu) bits = (bits & 0xff800000u) + 0x800000u;
          scale = __uint_as_float(bits);
        }
      }
      if (it < items && g < G) {
        uint2 q;
        unsigned char* qb8 = reinterpret_cast<unsigned char*>(&q);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float y = __fdiv_rn(f[i], scale);
          qb8[i] = isnan(y) ? (unsigned char)0x7F
                            : (unsigned char)__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
        }
        *reinterpret_cast<uint2*>(c.send_x + (size_t)t * c.H + (size_t)g * kLLGroup + hl * 8) = q;
        if (hl == 0) c.send_scales[(size_t)t * G + g] = scale;
      }
    }
  }
}

// Route (block 0) and quantize or copy (the others) this rank's tokens.
__device__ void dispatch_send_body(const LLCtx& c) {
  if (blockIdx.x == 0) route_entries(c);
  if (gridDim.x == 1 || blockIdx.x > 0) {
    const int qb = gridDim.x == 1 ? 0 : blockIdx.x - 1, nqb = gridDim.x == 1 ? 1 : gridDim.x - 1;
    if (c.format == EPA2A_LL_FORMAT_BF16)
      copy_tokens(c, qb, nqb);
    else
      quantize_tokens(c, qb, nqb);
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_dispatch_send_kernel(LLCtx c) {
  if (failed(c)) return;
  dispatch_send_body(c);
  finish_and_signal(c, c.done + 0, c.dep + 0, kPeerDispSig);
}

// Largest index i in [0, n) with a[i] <= v (a non-decreasing, a[0] <= v).
__device__ __forceinline__ int last_at_most(const int* a, int n, int v) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (a[mid] <= v)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Waits for every source's dispatch signal `epoch`, then pulls the rows into the compact layout.
__device__ void dispatch_recv_body(const LLCtx& c, uint64_t epoch) {
  extern __shared__ int smem[];  // pre[Epr][W + 1], erow[Epr + 1]
  __shared__ const char* s_x[kLLMaxRanks];
  __shared__ const float* s_sc[kLLMaxRanks];
  __shared__ int* s_pos[kLLMaxRanks];
  if (failed(c)) return;
  const int W = c.W, Epr = c.Epr, WM = W * c.M, MK = c.M * c.K, G = c.H / kLLGroup;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wpb = blockDim.x >> 5;
  int* pre = smem;
  int* erow = smem + Epr * (W + 1);
  for (int r = tid; r < W; r += blockDim.x) {
    s_x[r] = peer_ptr<const char>(c, kPeerSendX, r);
    s_sc[r] = peer_ptr<const float>(c, kPeerSendScales, r);
    s_pos[r] = peer_ptr<int>(c, kPeerPos, r);
  }
  for (int r = tid; r < W; r += blockDim.x)
    ll_wait(c, c.disp_sig + r, epoch, r, EPA2A_PHASE_LL_DISPATCH_RECV);
  __syncthreads();
  if (failed(c)) return;
  // Every (source, local expert) count in parallel (one round trip), then prefixed over sources in shared
  // memory.
  for (int q = tid; q < W * Epr; q += blockDim.x) {
    const int s = q / Epr, j = q - s * Epr;
    pre[j * (W + 1) + s] = min(max(__ldcg(c.meta + (size_t)s * c.meta_stride + j), 0), MK);
  }
  __syncthreads();
  for (int j = tid; j < Epr; j += blockDim.x) {
    int run = 0;
    for (int s = 0; s < W; ++s) {
      const int v = pre[j * (W + 1) + s];
      pre[j * (W + 1) + s] = run;
      run += v;
    }
    pre[j * (W + 1) + W] = run;
  }
  __syncthreads();
  if (tid == 0) {
    int acc = 0;
    for (int j = 0; j < Epr; ++j) {
      erow[j] = acc;
      acc += min(pre[j * (W + 1) + W], WM);
    }
    erow[Epr] = acc;
  }
  __syncthreads();
  if (blockIdx.x == 0)
    for (int j = tid; j < Epr; j += blockDim.x) c.rows[j] = erow[j + 1] - erow[j];
  // Work items: (row, part of the row). Few rows (1 token) spread a row over several warps; many rows give a
  // warp whole rows, and each item's entry is loaded while the previous item's data is in flight.
  const int rb = row_bytes(c), units = rb / 16, seg_units = 32 * kLLUnroll;
  const int segs = (units + seg_units - 1) / seg_units;
  const int R = erow[Epr];
  const int nw = gridDim.x * wpb;
  const int parts = R > 0 ? max(1, min(segs, nw / R)) : 1;
  const int per_part = (segs + parts - 1) / parts;
  const int items = R * parts;
  const bool fp8 = c.format != EPA2A_LL_FORMAT_BF16;
  auto entry_of = [&](int it, int& j, int& r, int& s, int& slot) {
    const int g = it / parts;
    j = last_at_most(erow, Epr, g);
    r = g - erow[j];
    const int* pj = pre + j * (W + 1);
    s = last_at_most(pj, W, r);
    slot = r - pj[s];
    return __ldcg(c.meta + (size_t)s * c.meta_stride + Epr + (size_t)j * MK + slot);
  };
  int it = blockIdx.x * wpb + warp;
  int j = 0, r = 0, s = 0, slot = 0, i = -1;
  if (it < items) i = entry_of(it, j, r, s, slot);
  while (it < items) {
    const int next = it + nw;
    int jn = 0, rn = 0, sn = 0, slotn = 0, in = -1;
    if (next < items) in = entry_of(next, jn, rn, sn, slotn);  // in flight during this item's copy
    const int part = it - (it / parts) * parts;
    if ((unsigned)i >= (unsigned)MK) {
      if (lane == 0)
        record_error(c, EPA2A_ERR_BAD_ROW, EPA2A_PHASE_LL_DISPATCH_RECV, s, slot, i, 0, 0, 0, true);
    } else {
      const int t = i / c.K;
      const size_t orow = (size_t)j * WM + r;
      const int4* src = reinterpret_cast<const int4*>(s_x[s] + (size_t)t * rb);
      int4* dst = reinterpret_cast<int4*>(c.out_x + orow * rb);
      const int u_end = min(units, (part + 1) * per_part * seg_units);
      for (int u0 = part * per_part * seg_units; u0 < u_end; u0 += seg_units) {
        int4 v[kLLUnroll];
#pragma unroll
        for (int u = 0; u < kLLUnroll; ++u) {
          const int q = u0 + u * 32 + lane;
          if (q < u_end) v[u] = __ldcg(src + q);
        }
#pragma unroll
        for (int u = 0; u < kLLUnroll; ++u) {
          const int q = u0 + u * 32 + lane;
          if (q < u_end) dst[q] = v[u];
        }
      }
      if (part == 0) {
        if (lane == 0) s_pos[s][i] = (int)orow;
        if (fp8)
          for (int x = lane; x < G; x += 32) c.out_scales[orow * G + x] = __ldcg(s_sc[s] + (size_t)t * G + x);
      }
    }
    it = next;
    j = jn, r = rn, s = sn, slot = slotn, i = in;
  }
  // Rows past an expert's capacity (only a token that lists one expert many times can cause it): dropped, and
  // their sources told so (pos -1), so the step still completes on every rank.
  if (blockIdx.x == 0) {
    for (int j = warp; j < Epr; j += wpb) {
      const int* pj = pre + j * (W + 1);
      if (pj[W] <= WM) continue;
      for (int s = 0; s < W; ++s) {
        const int* entries = c.meta + (size_t)s * c.meta_stride + Epr + (size_t)j * MK;
        for (int slot = lane; slot < pj[s + 1] - pj[s]; slot += 32) {
          if (pj[s] + slot < WM) continue;
          const int i = __ldcg(entries + slot);
          if ((unsigned)i < (unsigned)MK) s_pos[s][i] = -1;
        }
      }
      if (lane == 0)
        record_error(c, EPA2A_ERR_CAPACITY, EPA2A_PHASE_LL_DISPATCH_RECV, -1, j, pj[W], WM, 0, 0, false);
    }
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_dispatch_recv_kernel(LLCtx c) {
  dispatch_recv_body(c, __ldcg(c.dep + 0));
}

// Copies the expert rows below rows_per_expert into the combine buffer (nothing for zero-copy: src NULL).
__device__ void combine_send_body(const LLCtx& c, const int4* src) {
  extern __shared__ int erow[];  // [Epr + 1]
  if (src) {
    const int Epr = c.Epr, WM = c.W * c.M;
    const int lane = threadIdx.x & 31, wpb = blockDim.x >> 5;
    for (int j = threadIdx.x; j < Epr; j += blockDim.x) erow[j + 1] = min(max(__ldcg(c.rows + j), 0), WM);
    __syncthreads();
    if (threadIdx.x == 0) {
      erow[0] = 0;
      for (int j = 0; j < Epr; ++j) erow[j + 1] += erow[j];
    }
    __syncthreads();
    const int units = c.H / 8, seg_units = 32 * kLLUnroll, segs = (units + seg_units - 1) / seg_units;
    const int items = erow[Epr] * segs;
    int4* dst = reinterpret_cast<int4*>(c.comb);
    for (int it = blockIdx.x * wpb + (threadIdx.x >> 5); it < items; it += gridDim.x * wpb) {
      const int g = it / segs, sg = it - g * segs;
      const int j = last_at_most(erow, Epr, g);
      const size_t row = (size_t)j * WM + (g - erow[j]);
      const int4* s = src + row * units;
      int4* d = dst + row * units;
      int4 v[kLLUnroll];
#pragma unroll
      for (int u = 0; u < kLLUnroll; ++u) {
        const int q = sg * seg_units + u * 32 + lane;
        if (q < units) v[u] = __ldg(s + q);
      }
#pragma unroll
      for (int u = 0; u < kLLUnroll; ++u) {
        const int q = sg * seg_units + u * 32 + lane;
        if (q < units) d[q] = v[u];
      }
    }
  }
}

__global__ void __launch_bounds__(kLLThreads) ll_combine_send_kernel(LLCtx c, const int4* src) {
  if (failed(c)) return;
  combine_send_body(c, src);
  finish_and_signal(c, c.done + 1, c.dep + 1, kPeerCombSig);
}

// Waits for every rank's combine signal `epoch`, then each token's weighted fp32 sum of its rows, rounded
// once.
__device__ void combine_recv_body(const LLCtx& c, unsigned short* out, int weighted, uint64_t epoch) {
  __shared__ const char* s_comb[kLLMaxRanks];
  if (failed(c)) return;
  const int W = c.W, K = c.K, H = c.H;
  const int tid = threadIdx.x, lane = tid & 31, wpb = blockDim.x >> 5;
  for (int r = tid; r < W; r += blockDim.x) s_comb[r] = peer_ptr<const char>(c, kPeerComb, r);
  for (int r = tid; r < W; r += blockDim.x) ll_wait(c, c.comb_sig + r, epoch, r, EPA2A_PHASE_LL_COMBINE_RECV);
  __syncthreads();
  if (failed(c)) return;
  // Work items: (token, part of its channels). One token spreads over many warps; many tokens give a warp a
  // whole token. Each item loads its K entries' destination, row and weight once (together), then sums two
  // 256-channel segments at a time with every row of both in flight.
  const int units = H / 8, segs = (units + 31) / 32;
  const int nw = gridDim.x * wpb;
  const int parts = c.n > 0 ? max(1, min(segs, nw / c.n)) : 1;
  const int per_part = (segs + parts - 1) / parts;
  const int items = c.n * parts;
  const int bound = c.Epr * W * c.M;
  for (int it = blockIdx.x * wpb + (tid >> 5); it < items; it += nw) {
    const int t = it / parts, part = it - t * parts;
    int d = -1, p = -1;
    float w = 0.f;
    if (lane < K) {
      const int e = __ldcg(c.route + t * K + lane);
      const int pp = __ldcg(c.pos + t * K + lane);
      const float ww = __ldcg(c.wts + t * K + lane);
      if (e >= 0) {
        p = pp;
        if (p >= bound) {
          record_error(c, EPA2A_ERR_BAD_ROW, EPA2A_PHASE_LL_COMBINE_RECV, e / c.Epr, t * K + lane, p, 0, 0, 0,
                       false);
          p = -1;
        }
        d = e / c.Epr;
        w = weighted ? ww : 1.f;
      }
    }
    const unsigned use = __ballot_sync(kFullMask, d >= 0 && p >= 0);
    const int sg_end = min(segs, (part + 1) * per_part);
    for (int sg = part * per_part; sg < sg_end; sg += 2) {
      const int u0 = sg * 32 + lane, u1 = u0 + 32;
      const bool a0 = u0 < units, a1 = sg + 1 < sg_end && u1 < units;
      float acc0[8], acc1[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc0[i] = acc1[i] = 0.f;
      for (unsigned m = use; m;) {
        int4 r0[kLLUnroll], r1[kLLUnroll];
        float sc[kLLUnroll];
        bool have[kLLUnroll];
#pragma unroll
        for (int q = 0; q < kLLUnroll; ++q) {
          sc[q] = 0.f;
          r0[q] = r1[q] = make_int4(0, 0, 0, 0);
          have[q] = m != 0;
          if (m) {
            const int kk = __ffs(m) - 1;
            m &= m - 1;
            const int d2 = __shfl_sync(kFullMask, d, kk), p2 = __shfl_sync(kFullMask, p, kk);
            sc[q] = __shfl_sync(kFullMask, w, kk);
            const int4* row = reinterpret_cast<const int4*>(s_comb[d2] + (size_t)p2 * H * 2);
            if (a0) r0[q] = __ldcg(row + u0);
            if (a1) r1[q] = __ldcg(row + u1);
          }
        }
        // In k order, one product and one sum each (no fused multiply-add), as the reference does.
#pragma unroll
        for (int q = 0; q < kLLUnroll; ++q) {
          if (!have[q]) continue;
          const unsigned short* h0 = reinterpret_cast<const unsigned short*>(&r0[q]);
          const unsigned short* h1 = reinterpret_cast<const unsigned short*>(&r1[q]);
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            acc0[i] = __fadd_rn(acc0[i], __fmul_rn(sc[q], bf16_bits_to_float(h0[i])));
            acc1[i] = __fadd_rn(acc1[i], __fmul_rn(sc[q], bf16_bits_to_float(h1[i])));
          }
        }
      }
      int4* dst = reinterpret_cast<int4*>(out + (size_t)t * H);
      int4 o;
      unsigned short* ob = reinterpret_cast<unsigned short*>(&o);
      if (a0) {
#pragma unroll
        for (int i = 0; i < 8; ++i) ob[i] = __bfloat16_as_ushort(__float2bfloat16_rn(acc0[i]));
        dst[u0] = o;
      }
      if (a1) {
#pragma unroll
        for (int i = 0; i < 8; ++i) ob[i] = __bfloat16_as_ushort(__float2bfloat16_rn(acc1[i]));
        dst[u1] = o;
      }
    }
  }
}

__global__ void __launch_bounds__(kLLThreads)
    ll_combine_recv_kernel(LLCtx c, unsigned short* out, int weighted) {
  combine_recv_body(c, out, weighted, __ldcg(c.dep + 1));
}

// One-kernel forms: send, then (every block, once it has arrived) receive. Each block reads this step's epoch
// before it arrives, so before the last block stores it. Needs every block of the grid resident at once (the
// receivers wait for the signals of their own last block), which the small grids of the decode sizes are.
__global__ void __launch_bounds__(kLLThreads) ll_dispatch_fused_kernel(LLCtx c) {
  if (failed(c)) return;
  const uint64_t epoch = __ldcg(c.dep + 0) + 1;
  dispatch_send_body(c);
  finish_and_signal(c, c.done + 0, c.dep + 0, kPeerDispSig);
  __syncthreads();
  dispatch_recv_body(c, epoch);
}

__global__ void __launch_bounds__(kLLThreads)
    ll_combine_fused_kernel(LLCtx c, const int4* src, unsigned short* out, int weighted) {
  if (failed(c)) return;
  const uint64_t epoch = __ldcg(c.dep + 1) + 1;
  combine_send_body(c, src);
  finish_and_signal(c, c.done + 1, c.dep + 1, kPeerCombSig);
  __syncthreads();
  combine_recv_body(c, out, weighted, epoch);
}

// Every rank stores this barrier's epoch into slot `me` of every rank's barrier signals, then waits for all.
__global__ void ll_barrier_kernel(LLCtx c) {
  if (failed(c)) return;
  const uint64_t epoch = __ldcg(c.dep + 2) + 1;
  __threadfence_system();
  for (int r = threadIdx.x; r < c.W; r += blockDim.x)
    ll_signal(peer_ptr<uint64_t>(c, kPeerBarSig, r) + c.me, epoch);
  for (int r = threadIdx.x; r < c.W; r += blockDim.x)
    ll_wait(c, c.bar_sig + r, epoch, r, EPA2A_PHASE_LL_BARRIER);
  __syncthreads();
  if (threadIdx.x == 0) c.dep[2] = epoch;
}

__global__ void noop_kernel() {}

}  // namespace

cudaError_t launch_noop(cudaStream_t s) {
  noop_kernel<<<1, 32, 0, s>>>();
  return cudaGetLastError();
}

static size_t fused_dispatch_smem(const LLCtx& c) {
  return std::max(ll_dispatch_send_smem(c.E, c.M * c.K), ll_dispatch_recv_smem(c.W, c.Epr));
}

cudaError_t ll_launch_dispatch_fused(const LLCtx& c, int blocks, cudaStream_t s) {
  ll_dispatch_fused_kernel<<<blocks, kLLThreads, fused_dispatch_smem(c), s>>>(c);
  return cudaGetLastError();
}

cudaError_t ll_launch_combine_fused(const LLCtx& c, const void* expert_output, void* out, int weighted,
                                    int blocks, cudaStream_t s) {
  ll_combine_fused_kernel<<<blocks, kLLThreads, ((size_t)c.Epr + 1) * sizeof(int), s>>>(
      c, static_cast<const int4*>(expert_output), static_cast<unsigned short*>(out), weighted);
  return cudaGetLastError();
}

cudaError_t ll_launch_barrier(const LLCtx& c, cudaStream_t s) {
  ll_barrier_kernel<<<1, 32, 0, s>>>(c);
  return cudaGetLastError();
}

size_t ll_dispatch_send_smem(int E, int MK) {
  return ((size_t)(kLLThreads / 32 + 1) * E + MK) * sizeof(int);
}

size_t ll_dispatch_recv_smem(int W, int Epr) {
  return ((size_t)Epr * (W + 1) + Epr + 1) * sizeof(int);
}

static size_t combine_send_smem(int Epr) {
  return ((size_t)Epr + 1) * sizeof(int);
}

cudaError_t ll_prepare_kernels(int W, int E, int MK) {
  const int Epr = E / W;
  cudaError_t e = cudaFuncSetAttribute(ll_dispatch_send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)ll_dispatch_send_smem(E, MK));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(ll_dispatch_recv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)ll_dispatch_recv_smem(W, Epr));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(ll_combine_send_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)combine_send_smem(Epr));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(ll_combine_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)combine_send_smem(Epr));
  if (e == cudaSuccess)
    e = cudaFuncSetAttribute(ll_dispatch_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)std::max(ll_dispatch_send_smem(E, MK), ll_dispatch_recv_smem(W, Epr)));
  return e;
}

cudaError_t ll_blocks_per_sm(const LLCtx& c, int* per_sm) {
  const int MK = c.M * c.K;
  const struct {
    const void* fn;
    size_t smem;
  } kernels[] = {
      {reinterpret_cast<const void*>(ll_dispatch_send_kernel), ll_dispatch_send_smem(c.E, MK)},
      {reinterpret_cast<const void*>(ll_dispatch_recv_kernel), ll_dispatch_recv_smem(c.W, c.Epr)},
      {reinterpret_cast<const void*>(ll_combine_send_kernel), combine_send_smem(c.Epr)},
      {reinterpret_cast<const void*>(ll_combine_recv_kernel), 0},
      {reinterpret_cast<const void*>(ll_dispatch_fused_kernel), fused_dispatch_smem(c)},
      {reinterpret_cast<const void*>(ll_combine_fused_kernel), combine_send_smem(c.Epr)},
  };
  int fewest = 1 << 30;
  for (const auto& k : kernels) {
    int n = 0;
    const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, k.fn, kLLThreads, k.smem);
    if (e != cudaSuccess) return e;
    fewest = std::min(fewest, n);
  }
  *per_sm = fewest;
  return cudaSuccess;
}

cudaError_t ll_launch_dispatch_send(const LLCtx& c, int blocks, cudaStream_t s) {
  ll_dispatch_send_kernel<<<blocks, kLLThreads, ll_dispatch_send_smem(c.E, c.M * c.K), s>>>(c);
  return cudaGetLastError();
}

cudaError_t ll_launch_dispatch_recv(const LLCtx& c, int blocks, cudaStream_t s) {
  ll_dispatch_recv_kernel<<<blocks, kLLThreads, ll_dispatch_recv_smem(c.W, c.Epr), s>>>(c);
  return cudaGetLastError();
}

cudaError_t ll_launch_combine_send(const LLCtx& c, const void* expert_output, int blocks, cudaStream_t s) {
  ll_combine_send_kernel<<<expert_output ? blocks : 1, kLLThreads, combine_send_smem(c.Epr), s>>>(
      c, static_cast<const int4*>(expert_output));
  return cudaGetLastError();
}

cudaError_t ll_launch_combine_recv(const LLCtx& c, void* out, int weighted, int blocks, cudaStream_t s) {
  ll_combine_recv_kernel<<<blocks, kLLThreads, 0, s>>>(c, static_cast<unsigned short*>(out), weighted);
  return cudaGetLastError();
}

}  // namespace epa2a
