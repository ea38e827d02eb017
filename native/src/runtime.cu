// Runtime entry points: NVSHMEM bootstrap by unique id, symmetric memory, barriers, streams, events, copies,
// and the bounded collective barrier that guards the life cycle of layers.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "internal.h"

namespace {
bool g_ready = false;

constexpr int64_t kDefaultCollectiveTimeoutNs = 60LL * 1000 * 1000 * 1000;

// The life-cycle barrier (see collective_barrier). A signal value is
//   bit 63: the sender gave up at this barrier (a peer was missing)   bit 62: the sender failed before it
//   bits 8..61: the sender's barrier count (epoch)                      bits 0..7: which barrier (kBarrier*)
// Peer p writes only slot [epoch % 2][p] of every other rank. Two slots by parity: a peer can be one barrier
// ahead of this rank (it saw this rank arrive and went on) but never two, so the slot of this epoch holds
// exactly this epoch, an older one (not arrived yet) or a newer one (the ranks' counts diverged).
constexpr uint64_t kGaveUpBit = 1ull << 63;
constexpr uint64_t kFailedBit = 1ull << 62;
constexpr uint64_t kEpochMask = (1ull << 54) - 1;
enum LifeState : int {
  kArrived = 0,
  kMissing = 1,
  kGaveUp = 2,
  kOtherBarrier = 3,
  kFailed = 4,
  kDiverged = 5
};

struct LifeBarrier {
  std::mutex gate;
  uint64_t* sig = nullptr;  // symmetric [2][W]
  int* host = nullptr;      // host-mapped [2 + 2W]: abort, unused, state[W], tag seen[W]
  int* dev_host = nullptr;  // device view of host
  cudaStream_t stream = nullptr;
  uint64_t epoch = 0;  // barriers this rank has entered
  int me = 0, W = 1;
  int64_t timeout_ns = kDefaultCollectiveTimeoutNs;
};
LifeBarrier g_life;

__host__ __device__ inline uint64_t life_value(uint64_t epoch, int tag) {
  return ((epoch & kEpochMask) << 8) | (uint64_t)(tag & 0xff);
}

// One block: signal every peer, then wait for each peer's signal of this epoch until the deadline (measured
// from the kernel's start, so the whole barrier is bounded) or the host's abort. A rank that fails locally
// only signals (kFailedBit) and leaves. A rank that ends without every peer gives up: it overwrites its
// signal with kGaveUpBit, so a peer that arrives late fails at once instead of passing on alone.
__global__ void life_barrier_kernel(uint64_t* sig, uint64_t epoch, int tag, int ok, int me, int W,
                                    int64_t timeout_ns, int* host) {
  volatile int* h = host;
  uint64_t* slot = sig + (size_t)(epoch & 1) * W;
  const uint64_t mine = life_value(epoch, tag) | (ok ? 0 : kFailedBit);
  for (int p = threadIdx.x; p < W; p += blockDim.x) {
    if (p != me) nvshmemx_signal_op(slot + me, mine, NVSHMEM_SIGNAL_SET, p);
  }
  if (!ok) return;
  const uint64_t t0 = epa2a::global_ns();
  int bad = 0;
  for (int p = threadIdx.x; p < W; p += blockDim.x) {
    int st = kArrived, seen = tag;
    if (p != me) {
      st = kMissing;
      seen = 0;
      unsigned sleep_ns = 64;
      for (unsigned spin = 0;; ++spin) {
        const uint64_t v = epa2a::ld_acquire_sys(slot + p);
        const uint64_t e = (v >> 8) & kEpochMask;
        if (e > (epoch & kEpochMask)) {
          st = kDiverged;
          break;
        }
        if (e == (epoch & kEpochMask)) {
          seen = (int)(v & 0xff);
          st = (v & kGaveUpBit)   ? kGaveUp
               : seen != tag      ? kOtherBarrier
               : (v & kFailedBit) ? kFailed
                                  : kArrived;
          break;
        }
        if ((spin & 15u) == 15u && (h[0] != 0 || (int64_t)(epa2a::global_ns() - t0) > timeout_ns)) break;
        __nanosleep(sleep_ns);
        if (sleep_ns < 4096) sleep_ns *= 2;
      }
    }
    h[2 + p] = st;
    h[2 + W + p] = seen;
    bad |= st != kArrived;
  }
  bad = __syncthreads_or(bad);
  if (!bad) {
    // A peer that found someone missing gives up right after its deadline, perhaps after this rank saw it
    // arrive: look once more, so that fewer ranks pass on alone.
    int late = 0;
    for (int p = threadIdx.x; p < W; p += blockDim.x) {
      if (p == me) continue;
      const uint64_t v = epa2a::ld_acquire_sys(slot + p);
      if ((v & kGaveUpBit) && ((v >> 8) & kEpochMask) == (epoch & kEpochMask)) {
        h[2 + p] = kGaveUp;
        late = 1;
      }
    }
    bad = __syncthreads_or(late);
  }
  if (bad) {
    for (int p = threadIdx.x; p < W; p += blockDim.x) {
      if (p != me) nvshmemx_signal_op(slot + me, mine | kGaveUpBit, NVSHMEM_SIGNAL_SET, p);
    }
  }
  __threadfence_system();
}

std::string rank_list(const std::vector<int>& v) {
  std::string s = v.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

void free_life() {
  if (g_life.stream) cudaStreamDestroy(g_life.stream);
  if (g_life.host) cudaFreeHost(g_life.host);
  g_life.stream = nullptr;
  g_life.host = nullptr;
  g_life.dev_host = nullptr;
}

// The life-cycle barrier's resources; collective (one symmetric allocation and an NVSHMEM barrier: epa2a_init
// is a collective without a deadline anyway).
int init_life(int rank, int world, const char* fn) {
  g_life.me = rank;
  g_life.W = world;
  g_life.epoch = 0;
  if (const char* ms = std::getenv("EPA2A_COLLECTIVE_TIMEOUT_MS")) {
    const long long v = std::atoll(ms);
    if (v > 0) g_life.timeout_ns = v * 1000000LL;
  }
  g_life.sig = static_cast<uint64_t*>(nvshmem_malloc(2 * sizeof(uint64_t) * world));
  if (!g_life.sig)
    return epa2a::fail(EPA2A_ERR_NVSHMEM, fn, "nvshmem_malloc of the life-cycle barrier signals failed");
  EPA2A_CUDA(fn, cudaMemset(g_life.sig, 0, 2 * sizeof(uint64_t) * world));
  const size_t host_bytes = sizeof(int) * (2 + 2 * (size_t)world);
  EPA2A_CUDA(fn, cudaHostAlloc(reinterpret_cast<void**>(&g_life.host), host_bytes,
                               cudaHostAllocMapped | cudaHostAllocPortable));
  std::memset(g_life.host, 0, host_bytes);
  EPA2A_CUDA(fn, cudaHostGetDevicePointer(reinterpret_cast<void**>(&g_life.dev_host), g_life.host, 0));
  EPA2A_CUDA(fn, cudaStreamCreateWithFlags(&g_life.stream, cudaStreamNonBlocking));
  EPA2A_CUDA(fn, cudaDeviceSynchronize());
  nvshmem_barrier_all();  // every rank's signals are zero before any rank signals
  return EPA2A_OK;
}

}  // namespace

namespace epa2a {
bool runtime_ready() {
  return g_ready;
}

bool context_dead(cudaError_t* err) {
  cudaError_t e = cudaDeviceSynchronize();
  if (e == cudaSuccess) return false;
  (void)cudaGetLastError();
  e = cudaDeviceSynchronize();  // a sticky error comes back; any other was cleared by cudaGetLastError
  if (e == cudaSuccess) return false;
  if (err) *err = e;
  return true;
}

const char* barrier_name(int tag) {
  switch (tag) {
    case kBarrierCreateBegin:
      return "layer-create (begin)";
    case kBarrierCreateEnd:
      return "layer-create (end)";
    case kBarrierDestroy:
      return "layer-destroy";
    case kBarrierGrowBegin:
      return "layer-grow (begin)";
    case kBarrierGrowEnd:
      return "layer-grow (end)";
    case kBarrierResetBegin:
      return "layer-reset (begin)";
    case kBarrierResetEnd:
      return "layer-reset (end)";
    case kBarrierFinalize:
      return "finalize";
    default:
      return "unknown";
  }
}

int collective_barrier(int tag, bool ok, CollectiveOutcome* out, int64_t at_least_ns) {
  std::lock_guard<std::mutex> lock(g_life.gate);
  out->first_bad = -1;
  out->waited_ns = 0;
  out->detail.clear();
  const int W = g_life.W, me = g_life.me;
  const char* name = barrier_name(tag);
  const int64_t timeout_ns = std::max(g_life.timeout_ns, at_least_ns);
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) {
    out->detail = std::string("rank ") + std::to_string(me) + " cannot enter the " + name +
                  " barrier: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) +
                  "); its peers time out there naming it";
    return EPA2A_ERR_CUDA;
  }
  const uint64_t epoch = ++g_life.epoch;
  volatile int* h = g_life.host;
  h[0] = 0;
  for (int p = 0; p < W; ++p) {
    h[2 + p] = p == me ? kArrived : kMissing;
    h[2 + W + p] = 0;
  }
  std::atomic_thread_fence(std::memory_order_seq_cst);
  const auto t0 = std::chrono::steady_clock::now();
  life_barrier_kernel<<<1, 128, 0, g_life.stream>>>(g_life.sig, epoch, tag, ok ? 1 : 0, me, W, timeout_ns,
                                                    g_life.dev_host);
  e = cudaGetLastError();
  if (e != cudaSuccess) {
    out->detail = std::string("the ") + name + " barrier kernel did not launch: " + cudaGetErrorName(e) +
                  " (" + cudaGetErrorString(e) + ")";
    return EPA2A_ERR_CUDA;
  }
  // The kernel ends at its own deadline; the host waits a little longer, then aborts it (it may not have
  // started: another process's kernel can hold the GPU).
  const int64_t host_deadline_ns = timeout_ns + 5000000000LL;
  for (;;) {
    e = cudaStreamQuery(g_life.stream);
    if (e == cudaSuccess) break;
    const int64_t waited =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    if (e != cudaErrorNotReady) {
      out->detail = std::string("the ") + name + " barrier kernel failed: " + cudaGetErrorName(e) + " (" +
                    cudaGetErrorString(e) + ")";
      return EPA2A_ERR_CUDA;
    }
    if (waited > host_deadline_ns) {
      h[0] = 1;
      std::atomic_thread_fence(std::memory_order_seq_cst);
      char b[256];
      snprintf(
          b, sizeof(b),
          "rank %d: the %s barrier kernel had not ended %.0f ms after it was launched (its deadline is %.0f "
          "ms); it was told to stop",
          me, name, waited / 1e6, timeout_ns / 1e6);
      out->detail = b;
      out->waited_ns = waited;
      return EPA2A_ERR_TIMEOUT;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  out->waited_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
  if (!ok) return EPA2A_OK;  // the caller reports its own failure; the peers were told
  std::vector<int> missing, gave_up, failed, diverged;
  std::string other;
  for (int p = 0; p < W; ++p) {
    const int st = h[2 + p];
    if (st != kArrived && out->first_bad < 0) out->first_bad = p;
    switch (st) {
      case kMissing:
        missing.push_back(p);
        break;
      case kGaveUp:
        gave_up.push_back(p);
        break;
      case kFailed:
        failed.push_back(p);
        break;
      case kDiverged:
        diverged.push_back(p);
        break;
      case kOtherBarrier:
        other +=
            "; rank " + std::to_string(p) + " is at the " + barrier_name(h[2 + W + p]) + " barrier instead";
        break;
      default:
        break;
    }
  }
  if (out->first_bad < 0) return EPA2A_OK;
  char head[256];
  snprintf(head, sizeof(head), "rank %d left the %s barrier after %.1f ms (collective deadline %.0f ms)", me,
           name, out->waited_ns / 1e6, timeout_ns / 1e6);
  std::string d = head;
  if (!missing.empty()) d += "; " + rank_list(missing) + " did not arrive";
  if (!failed.empty()) d += "; " + rank_list(failed) + " failed before it (see their errors)";
  if (!gave_up.empty()) d += "; " + rank_list(gave_up) + " gave up there (a rank was missing)";
  if (!diverged.empty())
    d += "; " + rank_list(diverged) +
         " passed more life-cycle barriers than this rank (a rank skipped one): restart the NVSHMEM job";
  d += other;
  out->detail = d;
  return missing.empty() && gave_up.empty() ? EPA2A_ERR_STATE : EPA2A_ERR_TIMEOUT;
}

}  // namespace epa2a

using epa2a::fail;

#define REQUIRE_INIT(fn) \
  if (!g_ready) return fail(EPA2A_ERR_NOT_INITIALIZED, fn, "epa2a_init has not succeeded on this process")

extern "C" {

EPA2A_API int epa2a_device_count(int32_t* count) {
  if (!count) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_device_count", "count is NULL");
  int n = 0;
  EPA2A_CUDA("epa2a_device_count", cudaGetDeviceCount(&n));
  *count = n;
  return EPA2A_OK;
}

EPA2A_API int epa2a_use_device(int32_t device) {
  EPA2A_CUDA("epa2a_use_device", cudaSetDevice(device));
  return EPA2A_OK;
}

EPA2A_API int epa2a_uid_size(int32_t* bytes) {
  if (!bytes) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_uid_size", "bytes is NULL");
  *bytes = (int32_t)sizeof(nvshmemx_uniqueid_t);
  return EPA2A_OK;
}

EPA2A_API int epa2a_uid_create(void* uid, int32_t bytes) {
  if (!uid || bytes != (int32_t)sizeof(nvshmemx_uniqueid_t))
    return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_uid_create", "uid must be a buffer of %d bytes (got %d)",
                (int)sizeof(nvshmemx_uniqueid_t), bytes);
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  int rc = nvshmemx_get_uniqueid(&id);
  if (rc != 0) return fail(EPA2A_ERR_NVSHMEM, "epa2a_uid_create", "nvshmemx_get_uniqueid returned %d", rc);
  std::memcpy(uid, &id, sizeof(id));
  return EPA2A_OK;
}

EPA2A_API int epa2a_init(const void* uid, int32_t bytes, int32_t rank, int32_t world_size,
                         int32_t cuda_device) {
  const char* fn = "epa2a_init";
  if (g_ready) return fail(EPA2A_ERR_STATE, fn, "already initialized");
  if (!uid || bytes != (int32_t)sizeof(nvshmemx_uniqueid_t))
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "uid must be %d bytes (got %d)",
                (int)sizeof(nvshmemx_uniqueid_t), bytes);
  if (world_size < 1 || rank < 0 || rank >= world_size)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "rank %d is outside [0, world_size=%d)", rank, world_size);
  int ndev = 0;
  EPA2A_CUDA(fn, cudaGetDeviceCount(&ndev));
  if (cuda_device < 0 || cuda_device >= ndev)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "cuda_device %d is outside [0, %d)", cuda_device, ndev);
  EPA2A_CUDA(fn, cudaSetDevice(cuda_device));
  EPA2A_CUDA(fn, cudaFree(nullptr));  // create the context before NVSHMEM looks for it
  nvshmemx_uniqueid_t id = NVSHMEMX_UNIQUEID_INITIALIZER;
  std::memcpy(&id, uid, sizeof(id));
  nvshmemx_init_attr_t attr = NVSHMEMX_INIT_ATTR_INITIALIZER;
  int rc = nvshmemx_set_attr_uniqueid_args(rank, world_size, &id, &attr);
  if (rc != 0) return fail(EPA2A_ERR_NVSHMEM, fn, "nvshmemx_set_attr_uniqueid_args returned %d", rc);
  rc = nvshmemx_init_attr(NVSHMEMX_INIT_WITH_UNIQUEID, &attr);
  if (rc != 0) return fail(EPA2A_ERR_NVSHMEM, fn, "nvshmemx_init_attr returned %d", rc);
  if (nvshmem_my_pe() != rank || nvshmem_n_pes() != world_size)
    return fail(EPA2A_ERR_NVSHMEM, fn, "NVSHMEM reports PE %d of %d, expected %d of %d", nvshmem_my_pe(),
                nvshmem_n_pes(), rank, world_size);
  if ((rc = init_life(rank, world_size, fn))) {
    free_life();
    return rc;
  }
  g_ready = true;
  return EPA2A_OK;
}

EPA2A_API int epa2a_set_collective_timeout(int64_t timeout_ns) {
  std::lock_guard<std::mutex> lock(g_life.gate);
  g_life.timeout_ns = timeout_ns > 0 ? timeout_ns : kDefaultCollectiveTimeoutNs;
  return EPA2A_OK;
}

EPA2A_API int epa2a_finalize(void) {
  const char* fn = "epa2a_finalize";
  REQUIRE_INIT(fn);
  // nvshmem_finalize is a collective without a deadline: meet at a bounded barrier first, and skip it when
  // the context is dead or a rank is missing (NVSHMEM's resources then go with the process).
  cudaError_t dead = cudaSuccess;
  if (epa2a::context_dead(&dead)) {
    g_ready = false;
    const int rc =
        fail(EPA2A_ERR_CUDA, fn,
             "rank %d: the CUDA context is dead (%s: %s): nvshmem_finalize (collective) was skipped; its "
             "peers time out at their finalize barrier naming this rank",
             g_life.me, cudaGetErrorName(dead), cudaGetErrorString(dead));
    fprintf(stderr, "epa2a: %s\n", epa2a_last_error());
    return rc;
  }
  epa2a::CollectiveOutcome o;
  const int brc = epa2a::collective_barrier(epa2a::kBarrierFinalize, true, &o);
  if (brc) {
    g_ready = false;
    const int rc = fail(brc, fn, "%s; nvshmem_finalize (collective) was skipped", o.detail.c_str());
    fprintf(stderr, "epa2a: %s\n", epa2a_last_error());
    return rc;
  }
  free_life();
  nvshmem_free(g_life.sig);
  g_life.sig = nullptr;
  nvshmem_finalize();
  g_ready = false;
  return EPA2A_OK;
}

EPA2A_API int epa2a_rank(int32_t* rank, int32_t* world_size) {
  REQUIRE_INIT("epa2a_rank");
  if (rank) *rank = nvshmem_my_pe();
  if (world_size) *world_size = nvshmem_n_pes();
  return EPA2A_OK;
}

EPA2A_API int epa2a_sym_malloc(size_t bytes, void** ptr) {
  REQUIRE_INIT("epa2a_sym_malloc");
  if (!ptr) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_sym_malloc", "ptr is NULL");
  *ptr = nvshmem_malloc(bytes);
  if (!*ptr && bytes)
    return fail(EPA2A_ERR_NVSHMEM, "epa2a_sym_malloc",
                "nvshmem_malloc(%zu) failed (symmetric heap exhausted? raise NVSHMEM_SYMMETRIC_SIZE)", bytes);
  return EPA2A_OK;
}

EPA2A_API int epa2a_sym_free(void* ptr) {
  REQUIRE_INIT("epa2a_sym_free");
  nvshmem_free(ptr);
  return EPA2A_OK;
}

EPA2A_API int epa2a_sym_peer_ptr(void* ptr, int32_t peer, void** peer_ptr) {
  REQUIRE_INIT("epa2a_sym_peer_ptr");
  if (!peer_ptr) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_sym_peer_ptr", "peer_ptr is NULL");
  if (peer < 0 || peer >= nvshmem_n_pes())
    return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_sym_peer_ptr", "peer %d is outside [0, %d)", peer,
                nvshmem_n_pes());
  *peer_ptr = nvshmem_ptr(ptr, peer);
  return EPA2A_OK;
}

EPA2A_API int epa2a_barrier_all(void* stream) {
  REQUIRE_INIT("epa2a_barrier_all");
  nvshmemx_barrier_all_on_stream((cudaStream_t)stream);
  EPA2A_CUDA("epa2a_barrier_all", cudaGetLastError());
  return EPA2A_OK;
}

EPA2A_API int epa2a_barrier_node(void* stream) {
  REQUIRE_INIT("epa2a_barrier_node");
  int rc = nvshmemx_barrier_on_stream(NVSHMEMX_TEAM_NODE, (cudaStream_t)stream);
  if (rc != 0)
    return fail(EPA2A_ERR_NVSHMEM, "epa2a_barrier_node", "nvshmemx_barrier_on_stream returned %d", rc);
  return EPA2A_OK;
}

EPA2A_API int epa2a_stream_create(void** stream) {
  if (!stream) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_stream_create", "stream is NULL");
  cudaStream_t s = nullptr;
  EPA2A_CUDA("epa2a_stream_create", cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  *stream = s;
  return EPA2A_OK;
}

EPA2A_API int epa2a_stream_destroy(void* stream) {
  EPA2A_CUDA("epa2a_stream_destroy", cudaStreamDestroy((cudaStream_t)stream));
  return EPA2A_OK;
}

EPA2A_API int epa2a_stream_sync(void* stream) {
  EPA2A_CUDA("epa2a_stream_sync", cudaStreamSynchronize((cudaStream_t)stream));
  return EPA2A_OK;
}

EPA2A_API int epa2a_event_create(void** event) {
  if (!event) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_event_create", "event is NULL");
  cudaEvent_t e = nullptr;
  EPA2A_CUDA("epa2a_event_create", cudaEventCreate(&e));
  *event = e;
  return EPA2A_OK;
}

EPA2A_API int epa2a_event_record(void* event, void* stream) {
  EPA2A_CUDA("epa2a_event_record", cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream));
  return EPA2A_OK;
}

EPA2A_API int epa2a_event_sync(void* event) {
  EPA2A_CUDA("epa2a_event_sync", cudaEventSynchronize((cudaEvent_t)event));
  return EPA2A_OK;
}

EPA2A_API int epa2a_event_elapsed_ms(void* start, void* end, float* ms) {
  if (!ms) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_event_elapsed_ms", "ms is NULL");
  EPA2A_CUDA("epa2a_event_elapsed_ms", cudaEventElapsedTime(ms, (cudaEvent_t)start, (cudaEvent_t)end));
  return EPA2A_OK;
}

EPA2A_API int epa2a_event_destroy(void* event) {
  EPA2A_CUDA("epa2a_event_destroy", cudaEventDestroy((cudaEvent_t)event));
  return EPA2A_OK;
}

EPA2A_API int epa2a_memcpy_async(void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return EPA2A_OK;
  if (!dst || !src) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_memcpy_async", "dst or src is NULL");
  EPA2A_CUDA("epa2a_memcpy_async", cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)stream));
  return EPA2A_OK;
}

EPA2A_API int epa2a_memset_async(void* dst, int32_t byte_value, size_t bytes, void* stream) {
  if (bytes == 0) return EPA2A_OK;
  if (!dst) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_memset_async", "dst is NULL");
  EPA2A_CUDA("epa2a_memset_async", cudaMemsetAsync(dst, byte_value, bytes, (cudaStream_t)stream));
  return EPA2A_OK;
}

EPA2A_API int epa2a_host_alloc_pinned(size_t bytes, void** ptr) {
  if (!ptr) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_host_alloc_pinned", "ptr is NULL");
  EPA2A_CUDA("epa2a_host_alloc_pinned",
             cudaHostAlloc(ptr, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
  return EPA2A_OK;
}

EPA2A_API int epa2a_host_free_pinned(void* ptr) {
  EPA2A_CUDA("epa2a_host_free_pinned", cudaFreeHost(ptr));
  return EPA2A_OK;
}

EPA2A_API int epa2a_device_alloc(size_t bytes, void** ptr) {
  if (!ptr) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_device_alloc", "ptr is NULL");
  EPA2A_CUDA("epa2a_device_alloc", cudaMalloc(ptr, bytes));
  return EPA2A_OK;
}

EPA2A_API int epa2a_device_free(void* ptr) {
  EPA2A_CUDA("epa2a_device_free", cudaFree(ptr));
  return EPA2A_OK;
}

EPA2A_API int epa2a_device_sync(void) {
  EPA2A_CUDA("epa2a_device_sync", cudaDeviceSynchronize());
  return EPA2A_OK;
}

}  // extern "C"
