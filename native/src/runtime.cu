// Runtime entry points: NVSHMEM bootstrap by unique id, symmetric memory, barriers, streams, events, copies.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstring>

#include "internal.h"

namespace {
bool g_ready = false;
}

namespace epa2a {
bool runtime_ready() {
  return g_ready;
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
  g_ready = true;
  return EPA2A_OK;
}

EPA2A_API int epa2a_finalize(void) {
  REQUIRE_INIT("epa2a_finalize");
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
