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
  int max_recv = 0;
  std::vector<int> info;  // host copy of the receive layout (info_len)
};
