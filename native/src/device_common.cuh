// Device-side context and helpers shared by every kernel: the layer's view passed by value, bounded waits
// that record who waited for what, error records, and typed row loads/stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "epa2a.h"

namespace epa2a {

constexpr int kThreads = 256;  // threads per block of the token kernels
constexpr int kChunk = 1024;   // (token, k) entries per counting chunk
constexpr int kUnroll = 4;     // vectors (or rows) a lane loads before it stores (or sums): loads in flight
constexpr int kSlots = 5;      // barrier / signal slots (EPA2A_SLOT_*)
constexpr unsigned kFullMask = 0xffffffffu;

// Everything a kernel needs, by value. Pointers are this rank's unless named peer_*.
struct DevCtx {
  int W, L, N, E, Epr, K, H;
  int me, node, lrank;
  int row_bytes, out_rows, max_tokens, align, local_combine, has_weights, has_scatter, n;
  int meta_bytes, rec_bytes;
  int fixed_capacity;  // output rows fixed at creation: no host wait, the capacity is checked on the device
  int rejecting;       // this call: this rank rejected its input and takes part only to tell its peers
  int64_t timeout_ns;
  // Epochs live in device memory so that a captured CUDA graph replays correctly: [0] dispatch step (bumped by
  // the exchange kernel), [1] combine call, [2] all-rank barrier, [3] node barrier (bumped by barrier kernels),
  // [4] the dispatch step in which a rank's rejection was seen (the later kernels of that step stop), [5] the
  // combine in which the node barrier saw a rank's rejection (the combine kernel then writes nothing).
  uint64_t* dep;
  // symmetric
  char* out;
  float* out_w;
  int4* origin;
  int* lcsrc;
  float* partial;
  int* table;        // [W][E + 2]: counts per expert, dropped, tokens
  int* my_counts;    // [E + 2]
  uint64_t* sig;     // [kSlots][W]
  char* x_send;      // [max_tokens][rec_bytes]
  char* x_recv;      // [N][max_tokens][rec_bytes]
  uint64_t* x_sig;   // [N][max_tokens]
  float* c_stage;    // [N][max_tokens][H]
  float* c_recv;     // [N][max_tokens][H]
  uint64_t* c_sig;   // [N][max_tokens]
  uint64_t* reject;  // [W]: reject[p] = the combine epoch for which rank p rejected its combine input
  // local
  const char* tokens;
  const int* ids;
  const float* wts;
  const int* user_scatter;
  int* send_row;
  int* scatter;
  int* chunk_hist;   // [chunks][E + 1]
  int* send_base;    // [E]
  int* expert_rows;  // [E]
  int* estart;       // [E]
  int* dinfo;        // see info offsets
  int* lc_head;      // [out_rows]
  char* const* peer_out;
  float* const* peer_w;
  int4* const* peer_origin;
  int* const* peer_lcsrc;
  float* const* peer_partial;
  // status
  int* fatal;
  int* claim;
  epa2a_status* status;   // host-mapped
  const int* abort_flag;  // host-mapped
  int* hinfo;             // host-mapped
};

// Offsets into dinfo / hinfo.
__host__ __device__ inline int info_recv(int) {
  return 0;
}
__host__ __device__ inline int info_tokens(int W) {
  return W;
}
__host__ __device__ inline int info_offset(int W) {
  return 2 * W;
}
__host__ __device__ inline int info_rows(int W, int) {
  return 3 * W;
}
__host__ __device__ inline int info_padded(int W, int Epr) {
  return 3 * W + Epr;
}
__host__ __device__ inline int info_start(int W, int Epr) {
  return 3 * W + 2 * Epr;
}
__host__ __device__ inline int info_len(int W, int Epr) {
  return 3 * W + 3 * Epr;
}

__host__ __device__ inline int round_up(int v, int m) {
  return (v + m - 1) / m * m;
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

constexpr int kEpochDispatch = 0;
constexpr int kEpochCombine = 1;
constexpr int kEpochBarrierAll = 2;
constexpr int kEpochBarrierNode = 3;
constexpr int kEpochRejected = 4;
constexpr int kEpochCombineRejected = 5;
constexpr int kEpochs = 6;

// The current step's epochs, written by an earlier kernel of the same stream.
__device__ __forceinline__ uint64_t step_epoch(const DevCtx& c) {
  return __ldcg(c.dep + kEpochDispatch);
}
__device__ __forceinline__ uint64_t combine_epoch(const DevCtx& c) {
  return __ldcg(c.dep + kEpochCombine);
}

// failed / record_error / wait_signal take any context with the status fields of DevCtx (me,
// timeout_ns, fatal, claim, status, abort_flag): the normal layer's DevCtx and the low-latency LLCtx.
template <typename Ctx>
__device__ __forceinline__ bool failed(const Ctx& c) {
  return *(volatile int*)c.fatal != 0;
}

// The first error of a layer wins the record; a fatal one also stops every later kernel and wait.
template <typename Ctx>
__device__ inline void record_error(const Ctx& c, int code, int phase, int peer, int index, int value,
                                    int64_t expected, int64_t observed, int64_t waited_ns, bool fatal) {
  if (fatal) {
    *(volatile int*)c.fatal = 1;
    __threadfence();
  }
  if (atomicCAS(c.claim, 0, 1) == 0) {
    volatile epa2a_status* s = c.status;
    s->phase = phase;
    s->rank = c.me;
    s->peer = peer;
    s->index = index;
    s->value = value;
    s->expected = expected;
    s->observed = observed;
    s->waited_ns = waited_ns;
    __threadfence_system();
    s->code = code;
    __threadfence_system();
  }
}

__device__ __forceinline__ uint64_t ld_relaxed_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.relaxed.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

// Waits until *sig >= expect. Gives up at the layer's deadline or on abort, recording who waited for what;
// returns silently false when another thread of this rank already failed. Polls with relaxed loads and an
// exponential sleep up to 2 us, and checks the failure flag, abort flag and clock only every 8th poll:
// thousands of warps polling neighbouring signals (and one failure word) slowed every other kernel on the GPU
// tenfold. One acquire load of the signal then orders the data it guards. kMaxSleepNs caps the backoff (the
// low-latency layer, with few waiters, keeps it short).
// A poll that is performed at the L2 (an atomic add of 0): never served from a stale copy.
__device__ __forceinline__ uint64_t ld_atomic_sys(const uint64_t* p) {
  uint64_t v;
  asm volatile("atom.relaxed.sys.global.add.u64 %0, [%1], 0;" : "=l"(v) : "l"(p) : "memory");
  return v;
}

template <typename Ctx, unsigned kMaxSleepNs = 2048, bool kAtomicPoll = false>
__device__ inline bool wait_signal(const Ctx& c, const uint64_t* sig, uint64_t expect, int peer, int phase,
                                   int index) {
  uint64_t v = ld_acquire_sys(sig);
  if (v >= expect) return true;
  const uint64_t t0 = global_ns();
  unsigned sleep_ns = 32;
  for (unsigned spins = 1;; ++spins) {
    __nanosleep(sleep_ns);
    if (sleep_ns < kMaxSleepNs) sleep_ns *= 2;
    v = kAtomicPoll ? ld_atomic_sys(sig) : ld_relaxed_sys(sig);
    if (v >= expect) {
      if (kAtomicPoll)
        asm volatile("fence.acq_rel.sys;" ::: "memory");  // the acquire half of the atomic read
      else
        (void)ld_acquire_sys(sig);
      return true;
    }
    if ((spins & 7u) == 0) {
      if (failed(c)) return false;
      const uint64_t dt = global_ns() - t0;
      if ((spins & 63u) == 0 && *(volatile const int*)c.abort_flag) {  // host memory: read it rarely
        record_error(c, EPA2A_ERR_ABORTED, phase, peer, index, -1, (int64_t)expect, (int64_t)v, (int64_t)dt,
                     true);
        return false;
      }
      if ((int64_t)dt > c.timeout_ns) {
        record_error(c, EPA2A_ERR_TIMEOUT, phase, peer, index, -1, (int64_t)expect, (int64_t)v, (int64_t)dt,
                     true);
        return false;
      }
    }
  }
}

// The lowest rank that marked a rejection of the combine with this epoch (epa2a_combine_reject), or -1. Its mark
// is written (and, across nodes, completed) before it signals the combine barrier, so a rank that waited for it,
// directly or through a proxy, sees the mark.
__device__ inline int rejected_peer(const DevCtx& c, uint64_t epoch, int first = 0, int count = -1) {
  const int end = count < 0 ? c.W : first + count;
  for (int p = first; p < end; ++p)
    if (p != c.me && ld_relaxed_sys(c.reject + p) == epoch) return p;
  return -1;
}

// Token element types as raw bits, so that loads and stores stay plain integer moves.
template <int TK>
struct Tok;
template <>
struct Tok<EPA2A_TOKEN_BF16> {
  using bits = unsigned short;
  static __device__ __forceinline__ float to(bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
  static __device__ __forceinline__ bits from(float f) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
  }
};
template <>
struct Tok<EPA2A_TOKEN_FP16> {
  using bits = unsigned short;
  static __device__ __forceinline__ float to(bits b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ bits from(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
template <>
struct Tok<EPA2A_TOKEN_FP32> {
  using bits = unsigned int;
  static __device__ __forceinline__ float to(bits b) { return __uint_as_float(b); }
  static __device__ __forceinline__ bits from(float f) { return __float_as_uint(f); }
};

__device__ __forceinline__ unsigned short ldcg_bits(const unsigned short* p) {
  return __ldcg(p);
}
__device__ __forceinline__ unsigned int ldcg_bits(const unsigned int* p) {
  return __ldcg(p);
}

// acc[0..G) += scale * row[0..G), row of token type TK, bypassing L1 (peers write these rows).
template <int TK, int G>
__device__ __forceinline__ void acc_row(const typename Tok<TK>::bits* p, float scale, float* acc) {
  using B = typename Tok<TK>::bits;
  if constexpr (G * sizeof(B) == 16) {
    int4 raw = __ldcg(reinterpret_cast<const int4*>(p));
    const B* v = reinterpret_cast<const B*>(&raw);
#pragma unroll
    for (int i = 0; i < G; ++i) acc[i] += scale * Tok<TK>::to(v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) acc[i] += scale * Tok<TK>::to(ldcg_bits(p + i));
  }
}

// acc[0..G) += scale * the G elements of token type TK packed in raw (16 bytes). A zero scale adds nothing.
template <int TK, int G>
__device__ __forceinline__ void acc_raw(const int4& raw, float scale, float* acc) {
  using B = typename Tok<TK>::bits;
  static_assert(G * sizeof(B) == 16, "acc_raw needs 16-byte groups");
  const B* v = reinterpret_cast<const B*>(&raw);
#pragma unroll
  for (int i = 0; i < G; ++i) acc[i] += scale * Tok<TK>::to(v[i]);
}

template <int G>
__device__ __forceinline__ void acc_f32(const float* p, float scale, float* acc) {
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int i = 0; i < G / 4; ++i) {
      float4 v = __ldcg(reinterpret_cast<const float4*>(p) + i);
      acc[4 * i + 0] += scale * v.x;
      acc[4 * i + 1] += scale * v.y;
      acc[4 * i + 2] += scale * v.z;
      acc[4 * i + 3] += scale * v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) acc[i] += scale * __ldcg(p + i);
  }
}

template <int G>
__device__ __forceinline__ void store_f32(float* p, const float* acc) {
  if constexpr (G % 4 == 0) {
#pragma unroll
    for (int i = 0; i < G / 4; ++i)
      reinterpret_cast<float4*>(p)[i] =
          make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]);
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) p[i] = acc[i];
  }
}

template <int TK, int G>
__device__ __forceinline__ void store_row(typename Tok<TK>::bits* p, const float* acc) {
  using B = typename Tok<TK>::bits;
  if constexpr (G * sizeof(B) == 16) {
    int4 raw;
    B* v = reinterpret_cast<B*>(&raw);
#pragma unroll
    for (int i = 0; i < G; ++i) v[i] = Tok<TK>::from(acc[i]);
    *reinterpret_cast<int4*>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < G; ++i) p[i] = Tok<TK>::from(acc[i]);
  }
}

// Copies `bytes` (a multiple of sizeof(V)) with a whole warp, kUnroll loads in flight per lane; src may be
// written by a peer (L1 bypassed).
template <typename V>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  const V* s = reinterpret_cast<const V*>(src);
  const int units = bytes / (int)sizeof(V);
  for (int base = 0; base < units; base += 32 * kUnroll) {
    V r[kUnroll];
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int u = base + i * 32 + lane;
      if (u < units) r[i] = __ldcg(s + u);
    }
#pragma unroll
    for (int i = 0; i < kUnroll; ++i) {
      const int u = base + i * 32 + lane;
      if (u < units) d[u] = r[i];
    }
  }
}

template <typename V>
__device__ __forceinline__ void warp_zero(void* dst, int bytes, int lane) {
  V* d = reinterpret_cast<V*>(dst);
  const int units = bytes / (int)sizeof(V);
  const V z{};
  for (int u = lane; u < units; u += 32) d[u] = z;
}

}  // namespace epa2a
