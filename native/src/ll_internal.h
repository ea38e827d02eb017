// The low-latency layer's device context, its host object, and the launchers of its four kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "device_common.cuh"
#include "epa2a.h"

namespace epa2a {

constexpr int kLLThreads = 256;  // threads per block of every low-latency kernel
constexpr int kLLMaxRanks = 32;
constexpr int kLLGroup = 128;  // fp8: channels per scale
constexpr int kLLEpochs = 3;
// 16-byte vectors (or rows, in combine) a lane loads before it stores or sums: 8 keeps a 7 KB FP8 row in two
// warp loads and all top-8 rows of a token in flight at once.
constexpr int kLLUnroll = 8;

// Peer pointer tables, [kind][W] in device memory (symmetric objects through nvshmem_ptr).
enum LLPeer {
  kPeerMeta = 0,
  kPeerSendX,
  kPeerSendScales,
  kPeerPos,
  kPeerComb,
  kPeerDispSig,
  kPeerCombSig,
  kPeerBarSig,
  kPeerKinds
};

// Everything the low-latency kernels need, by value. Pointers are this rank's unless they come from `peers`.
struct LLCtx {
  int W, E, Epr, K, H, M;  // M = max_tokens
  int me;
  int n;       // tokens of the current dispatch
  int format;  // EPA2A_LL_FORMAT_*
  int has_weights;
  int meta_stride;  // ints of one source's section of meta: counts[Epr] + entries[Epr][M*K]
  int64_t timeout_ns;
  uint64_t* dep;   // [3]: dispatch, combine, barrier epochs (device memory, bumped by the kernels)
  unsigned* done;  // [2]: completion counters of the two send kernels (back to 0 after each launch)
  // symmetric (this rank's copies)
  char* send_x;        // [M, H * 2] bf16 or fp8 bytes
  float* send_scales;  // [M, H / 128]
  int* meta;           // [W][meta_stride]: section s written by source s
  int* pos;    // [M * K]: compact row of each of this rank's entries on its destination (written there)
  char* comb;  // [Epr, W*M, H] bf16
  uint64_t* disp_sig;  // [W]: dispatch signal of source s
  uint64_t* comb_sig;  // [W]: combine signal of destination d
  uint64_t* bar_sig;   // [W]: barrier signal of rank r
  void* const* peers;  // [kPeerKinds][W]
  // local
  char* out_x;           // [Epr, W*M, H] bf16 or [Epr, W*M, H] fp8
  float* out_scales;     // [Epr, W*M, H / 128]
  int* rows;             // [Epr]
  int* route;            // [M * K]: expert id of each entry of the current dispatch, -1 dropped
  float* wts;            // [M * K]: routing weight of each entry (1 without weights)
  const char* x;         // caller's tokens of the current dispatch
  const int* ids;        // caller's expert ids
  const float* weights;  // caller's weights or NULL
  // status (the fields wait_signal and record_error use)
  int* fatal;
  int* claim;
  epa2a_status* status;   // host-mapped
  const int* abort_flag;  // host-mapped
};

cudaError_t ll_launch_dispatch_send(const LLCtx& c, int blocks, cudaStream_t s);
cudaError_t ll_launch_dispatch_recv(const LLCtx& c, int blocks, cudaStream_t s);
cudaError_t ll_launch_combine_send(const LLCtx& c, const void* expert_output, int blocks, cudaStream_t s);
cudaError_t ll_launch_combine_recv(const LLCtx& c, void* out, int weighted, int blocks, cudaStream_t s);
cudaError_t ll_launch_barrier(const LLCtx& c, cudaStream_t s);
// One-kernel dispatch (send + receive) and combine (send + receive).
cudaError_t ll_launch_dispatch_fused(const LLCtx& c, int blocks, cudaStream_t s);
cudaError_t ll_launch_combine_fused(const LLCtx& c, const void* expert_output, void* out, int weighted,
                                    int blocks, cudaStream_t s);
cudaError_t launch_noop(cudaStream_t s);
// Raises the dynamic shared-memory limits of the kernels for this layer's sizes (once, at creation).
cudaError_t ll_prepare_kernels(int W, int E, int MK);
// Blocks of 256 threads one SM keeps resident for the kernel of this layer that needs the most (registers,
// shared memory).
cudaError_t ll_blocks_per_sm(const LLCtx& c, int* per_sm);
// Dynamic shared memory of the two dispatch kernels.
size_t ll_dispatch_send_smem(int E, int MK);
size_t ll_dispatch_recv_smem(int W, int Epr);

enum class LLStep { Idle, DispatchSent, Dispatched, CombineSent };

}  // namespace epa2a

struct epa2a_ll_layer {
  epa2a_ll_config cfg{};
  epa2a::LLCtx ctx{};
  int blocks = 16;            // of every kernel: the requested SM budget, capped by fit_blocks
  int requested_blocks = 16;  // config.num_sms (or the default)
  int gpu_sharers = 1;        // ranks (this one included) whose processes use this GPU
  int resident_per_sm = 0;    // blocks of the heaviest kernel one SM keeps resident
  std::vector<void*> sym;     // symmetric allocations
  std::vector<void*> dev;     // device allocations
  epa2a_status* h_status = nullptr;
  int* h_abort = nullptr;
  epa2a::LLStep step = epa2a::LLStep::Idle;
};
