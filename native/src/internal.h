// Host-side internals: error reporting, the layer object, and the kernel launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "device_common.cuh"
#include "epa2a.h"

namespace epa2a {

// Sets the calling thread's last error to "fn: message" and returns code.
int fail(int code, const char* fn, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
int cuda_fail(cudaError_t err, const char* fn, const char* expr);
// Formats a device error record into the last error; returns its code.
int status_fail(const epa2a_status& s, const char* fn);
const char* phase_name(int phase);

bool runtime_ready();

// True when this process's CUDA context is dead: a sticky error (cudaErrorIllegalAddress, a launch failure,
// ...) that every later call returns again. Synchronizes the device; puts the error into *err.
bool context_dead(cudaError_t* err);

// The collective barriers of the life cycle (epa2a_layer_create/destroy/grow_output/reset, epa2a_finalize).
// NVSHMEM's host barriers have no deadline; this one is bounded by the runtime's collective timeout
// (epa2a_set_collective_timeout) and names the ranks that did not arrive.
constexpr int kBarrierCreateBegin = 1;
constexpr int kBarrierCreateEnd = 2;
constexpr int kBarrierDestroy = 3;
constexpr int kBarrierGrowBegin = 4;
constexpr int kBarrierGrowEnd = 5;
constexpr int kBarrierResetBegin = 6;
constexpr int kBarrierResetEnd = 7;
constexpr int kBarrierFinalize = 8;
const char* barrier_name(int tag);

struct CollectiveOutcome {
  int first_bad = -1;  // the lowest rank that did not arrive, gave up, failed or is elsewhere; -1 when none
  int64_t waited_ns = 0;  // time in the barrier
  std::string detail;     // what went wrong, naming the ranks (empty on success)
};

// Every rank calls it with the same tag, in the same order. ok = false: this rank failed before the barrier;
// it only tells its peers (they fail at once, naming it) and returns EPA2A_OK. Otherwise returns EPA2A_OK
// when every rank arrived ok, else EPA2A_ERR_TIMEOUT (a rank missing, or one that gave up waiting for it),
// EPA2A_ERR_STATE (a rank failed before, is at another barrier, or the ranks' barrier counts diverged) or
// EPA2A_ERR_CUDA (this rank's context), with out->detail. Synchronizes the device first. After a failure
// every rank that reaches the same barrier fails too, so the counts stay in step; only a rank that arrives
// within microseconds of a peer's deadline can pass while that peer fails (then it hangs in the next NVSHMEM
// collective: a missing rank means a restart anyway).
// The deadline is the collective timeout, or at_least_ns when that is longer (a layer's barrier waits as long
// as a peer's device wait may still run before that peer gets here).
int collective_barrier(int tag, bool ok, CollectiveOutcome* out, int64_t at_least_ns = 0);

#define EPA2A_CUDA(fn, expr)                                                         \
  do {                                                                               \
    cudaError_t epa2a_err_ = (expr);                                                 \
    if (epa2a_err_ != cudaSuccess) return ::epa2a::cuda_fail(epa2a_err_, fn, #expr); \
  } while (0)

enum class Step { Idle, Prepared, Sized, Sent, Dispatched };

// Kernel launchers (one per kernel). They return the launch error, if any.
cudaError_t launch_count(const DevCtx& c, int nchunks, int blocks, cudaStream_t s);
cudaError_t launch_exchange(const DevCtx& c, int nchunks, cudaStream_t s);
cudaError_t launch_assign(const DevCtx& c, int nchunks, int blocks, cudaStream_t s);
cudaError_t launch_dispatch(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s);
cudaError_t launch_internode_send(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s);
cudaError_t launch_forward(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s);
cudaError_t launch_barrier(const DevCtx& c, int slot, int counter, bool bump, int first, int count,
                           cudaStream_t s);
cudaError_t launch_copy_rows(const DevCtx& c, const void* src, int blocks, cudaStream_t s);
cudaError_t launch_reject_mark(const DevCtx& c, cudaStream_t s);
cudaError_t launch_expand(const DevCtx& c, int blocks, int vec_bytes, cudaStream_t s);
cudaError_t launch_presum(const DevCtx& c, int blocks, int token_type, bool wide, int weighted,
                          cudaStream_t s);
cudaError_t launch_combine(const DevCtx& c, void* out, int blocks, int token_type, bool wide, int weighted,
                           cudaStream_t s);
cudaError_t launch_combine_proxy(const DevCtx& c, int blocks, int token_type, bool wide, int weighted,
                                 cudaStream_t s);
cudaError_t launch_combine_final(const DevCtx& c, void* out, int blocks, int token_type, bool wide,
                                 int weighted, cudaStream_t s);

}  // namespace epa2a

struct epa2a_layer {
  epa2a_layer_config cfg{};
  epa2a::DevCtx ctx{};  // pointers and sizes; per-call fields are set before each launch
  int num_sms = 1;
  int max_chunks = 0;
  int assign_blocks = 1;
  // allocations
  std::vector<void*> sym_fixed;  // symmetric, sized by the config
  std::vector<void*> sym_rows;   // symmetric, sized by output rows (regrown)
  std::vector<void*> dev_fixed;  // device local
  void* lc_head = nullptr;       // device local, sized by output rows
  void** peer_tab = nullptr;     // device [5][W]
  epa2a_status* h_status = nullptr;
  int* h_abort = nullptr;
  int* h_info = nullptr;
  // step state
  epa2a::Step step = epa2a::Step::Idle;
  // epa2a_dispatch_reject enqueued an exchange that is still to write the host-polled sizes: the next dispatch
  // waits for the stream first, so that it polls its own sizes, not the rejected step's.
  bool reject_pending = false;
  int max_recv = 0;
  std::vector<int> info;  // host copy of the receive layout (info_len)
};
