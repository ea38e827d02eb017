// The layer object: symmetric buffers for one configuration, and the host side of each phase of a step.
#include <nvshmem.h>
#include <nvshmemx.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "internal.h"

using epa2a::fail;
using epa2a::Step;

namespace {

constexpr int64_t kDefaultTimeoutNs = 10LL * 1000 * 1000 * 1000;

// EPA2A_TRACE=1: synchronize after each kernel of the send and combine phases and print its time (debugging).
bool trace_on() {
  static const bool on = std::getenv("EPA2A_TRACE") != nullptr;
  return on;
}

struct KernelTrace {
  const char* phase;
  int rank;
  cudaStream_t s;
  std::chrono::steady_clock::time_point t;
  std::string line;
  KernelTrace(const char* p, int r, cudaStream_t st) : phase(p), rank(r), s(st) {
    if (trace_on()) {
      cudaStreamSynchronize(s);
      t = std::chrono::steady_clock::now();
    }
  }
  void mark(const char* what) {
    if (!trace_on()) return;
    cudaStreamSynchronize(s);
    const auto now = std::chrono::steady_clock::now();
    char b[96];
    snprintf(b, sizeof(b), " %s %.1f us", what, std::chrono::duration<double, std::micro>(now - t).count());
    line += b;
    t = now;
  }
  ~KernelTrace() {
    if (trace_on()) fprintf(stderr, "epa2a trace rank %d %s:%s\n", rank, phase, line.c_str());
  }
};

int check_layer(epa2a_layer* l, const char* fn) {
  if (!epa2a::runtime_ready()) return fail(EPA2A_ERR_NOT_INITIALIZED, fn, "epa2a_init has not succeeded");
  if (!l) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "layer is NULL");
  return EPA2A_OK;
}

const char* step_name(Step s) {
  switch (s) {
    case Step::Idle:
      return "idle";
    case Step::Prepared:
      return "prepared";
    case Step::Sized:
      return "sized";
    case Step::Sent:
      return "sent";
    case Step::Dispatched:
      return "dispatched";
  }
  return "?";
}

int expect_step(epa2a_layer* l, const char* fn, Step want) {
  if (l->step != want)
    return fail(EPA2A_ERR_STATE, fn, "called in state '%s'; it needs state '%s'", step_name(l->step),
                step_name(want));
  return EPA2A_OK;
}

bool fatal_code(int code);
// A peer's rejection is fatal on a fixed-capacity layer: no host stood between the kernels, so the exchange kernel
// set the fatal flag to stop every later kernel, and only the collective reset clears it.
bool fatal_record(const epa2a_layer* l, int code) {
  return fatal_code(code) || (code == EPA2A_ERR_PEER_REJECTED && l->ctx.fixed_capacity);
}

bool fatal_code(int code) {
  return code == EPA2A_ERR_TIMEOUT || code == EPA2A_ERR_ABORTED || code == EPA2A_ERR_BAD_ROW ||
         code == EPA2A_ERR_CAPACITY;
}

// A copy unit that divides the row and keeps every pointer aligned.
int vec_bytes_for(int row_bytes, const void* p = nullptr) {
  for (int v = 16; v > 2; v /= 2) {
    if (row_bytes % v == 0 && reinterpret_cast<uintptr_t>(p) % v == 0) return v;
  }
  return 2;
}

epa2a_status read_status(const epa2a_layer* l) {
  epa2a_status s;
  const volatile epa2a_status* h = l->h_status;
  s.code = h->code;
  std::atomic_thread_fence(std::memory_order_acquire);
  s.phase = h->phase;
  s.rank = h->rank;
  s.peer = h->peer;
  s.index = h->index;
  s.value = h->value;
  s.expected = h->expected;
  s.observed = h->observed;
  s.waited_ns = h->waited_ns;
  return s;
}

// Symmetric and device allocations, and the peer-pointer tables, sized by the output rows.
int alloc_sym(std::vector<void*>& list, size_t bytes, void** out, const char* fn, const char* what) {
  void* p = nvshmem_malloc(std::max<size_t>(bytes, 16));
  if (!p)
    return fail(EPA2A_ERR_NVSHMEM, fn,
                "nvshmem_malloc of %zu bytes for %s failed (raise NVSHMEM_SYMMETRIC_SIZE)", bytes, what);
  list.push_back(p);
  *out = p;
  return EPA2A_OK;
}

int alloc_dev(std::vector<void*>& list, size_t bytes, void** out, const char* fn) {
  void* p = nullptr;
  EPA2A_CUDA(fn, cudaMalloc(&p, std::max<size_t>(bytes, 16)));
  list.push_back(p);
  *out = p;
  return EPA2A_OK;
}

int alloc_rows(epa2a_layer* l, int rows, const char* fn) {
  epa2a::DevCtx& c = l->ctx;
  const size_t R = (size_t)rows;
  void* p = nullptr;
  int rc;
  if ((rc = alloc_sym(l->sym_rows, R * c.row_bytes, &p, fn, "output rows"))) return rc;
  c.out = static_cast<char*>(p);
  if ((rc = alloc_sym(l->sym_rows, R * sizeof(float), &p, fn, "output weights"))) return rc;
  c.out_w = static_cast<float*>(p);
  if ((rc = alloc_sym(l->sym_rows, R * sizeof(int4), &p, fn, "row origins"))) return rc;
  c.origin = static_cast<int4*>(p);
  if ((rc = alloc_sym(l->sym_rows, R * sizeof(int), &p, fn, "local-combine sources"))) return rc;
  c.lcsrc = static_cast<int*>(p);
  c.partial = nullptr;
  if (c.local_combine) {
    if ((rc = alloc_sym(l->sym_rows, R * c.H * sizeof(float), &p, fn, "local-combine partials"))) return rc;
    c.partial = static_cast<float*>(p);
  }
  EPA2A_CUDA(fn, cudaMalloc(&l->lc_head, std::max<size_t>(R * sizeof(int), 16)));
  c.lc_head = static_cast<int*>(l->lc_head);
  c.out_rows = rows;
  EPA2A_CUDA(fn, cudaMemset(c.out, 0, R * c.row_bytes));
  EPA2A_CUDA(fn, cudaMemset(c.out_w, 0, R * sizeof(float)));
  EPA2A_CUDA(fn, cudaMemset(c.origin, 0xff, R * sizeof(int4)));
  EPA2A_CUDA(fn, cudaMemset(c.lcsrc, 0xff, R * sizeof(int)));
  EPA2A_CUDA(fn, cudaMemset(c.lc_head, 0, R * sizeof(int)));
  // Peer pointers for the ranks of this node; other nodes are reached by puts only.
  const int W = c.W;
  std::vector<void*> tab(5 * (size_t)W, nullptr);
  for (int p2 = c.node * c.L; p2 < (c.node + 1) * c.L; ++p2) {
    tab[0 * W + p2] = nvshmem_ptr(c.out, p2);
    tab[1 * W + p2] = nvshmem_ptr(c.out_w, p2);
    tab[2 * W + p2] = nvshmem_ptr(c.origin, p2);
    tab[3 * W + p2] = nvshmem_ptr(c.lcsrc, p2);
    tab[4 * W + p2] = c.partial ? nvshmem_ptr(c.partial, p2) : nullptr;
    if (!tab[0 * W + p2] || !tab[1 * W + p2] || !tab[2 * W + p2] || !tab[3 * W + p2])
      return fail(EPA2A_ERR_NVSHMEM, fn,
                  "rank %d of this node is not reachable by load/store (nvshmem_ptr returned NULL); "
                  "local_world_size must only group ranks that share NVLink",
                  p2);
  }
  if (!l->peer_tab) EPA2A_CUDA(fn, cudaMalloc(&l->peer_tab, sizeof(void*) * 5 * W));
  EPA2A_CUDA(fn, cudaMemcpy(l->peer_tab, tab.data(), sizeof(void*) * 5 * W, cudaMemcpyHostToDevice));
  c.peer_out = reinterpret_cast<char* const*>(l->peer_tab);
  c.peer_w = reinterpret_cast<float* const*>(l->peer_tab + W);
  c.peer_origin = reinterpret_cast<int4* const*>(l->peer_tab + 2 * W);
  c.peer_lcsrc = reinterpret_cast<int* const*>(l->peer_tab + 3 * W);
  c.peer_partial = reinterpret_cast<float* const*>(l->peer_tab + 4 * W);
  return EPA2A_OK;
}

void free_rows(epa2a_layer* l) {
  for (auto it = l->sym_rows.rbegin(); it != l->sym_rows.rend(); ++it) nvshmem_free(*it);
  l->sym_rows.clear();
  if (l->lc_head) cudaFree(l->lc_head);
  l->lc_head = nullptr;
}

// Everything but the symmetric buffers (freeing those is collective), and the layer object.
void free_local(epa2a_layer* l) {
  if (l->lc_head) cudaFree(l->lc_head);
  for (void* p : l->dev_fixed) cudaFree(p);
  if (l->peer_tab) cudaFree(l->peer_tab);
  if (l->h_status) cudaFreeHost(l->h_status);
  if (l->h_abort) cudaFreeHost(l->h_abort);
  if (l->h_info) cudaFreeHost(l->h_info);
  delete l;
}

// Collective when the layer holds symmetric buffers: every rank must be here.
void free_all(epa2a_layer* l) {
  free_rows(l);
  for (auto it = l->sym_fixed.rbegin(); it != l->sym_fixed.rend(); ++it) nvshmem_free(*it);
  l->sym_fixed.clear();
  free_local(l);
}

// A failed life-cycle barrier of grow or reset, recorded like a device wait that timed out: the layer refuses
// steps until every rank has called epa2a_layer_reset.
void record_barrier_failure(epa2a_layer* l, int code, const epa2a::CollectiveOutcome& o) {
  volatile epa2a_status* s = l->h_status;
  s->phase = EPA2A_PHASE_BARRIER;
  s->rank = l->ctx.me;
  s->peer = o.first_bad;
  s->index = EPA2A_SLOT_LIFECYCLE;
  s->value = -1;
  s->expected = 0;
  s->observed = 0;
  s->waited_ns = o.waited_ns;
  std::atomic_thread_fence(std::memory_order_release);
  s->code = code == EPA2A_ERR_TIMEOUT ? EPA2A_ERR_TIMEOUT : EPA2A_ERR_ABORTED;
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

// Adds a sentence to fn's last error (which starts with "fn: ").
int amend_error(int rc, const char* fn, const char* more) {
  std::string why = epa2a_last_error();
  const std::string head = std::string(fn) + ": ";
  if (why.compare(0, head.size(), head) == 0) why.erase(0, head.size());
  return fail(rc, fn, "%s%s", why.c_str(), more);
}

// Runs a life-cycle barrier of layer l; on failure sets the last error to "fn: <detail><then>" and returns
// its code. Each rank synchronizes its device first, so a peer may arrive as late as its longest device wait
// (twice the layer's timeout, as the host poll of receive sizes) after this rank: the barrier waits at least
// that.
int life_barrier(const epa2a_layer* l, const char* fn, int tag, epa2a::CollectiveOutcome* o,
                 const char* then) {
  const int rc = epa2a::collective_barrier(tag, true, o, 2 * l->cfg.timeout_ns + 1000000000LL);
  if (rc) return fail(rc, fn, "%s%s", o->detail.c_str(), then);
  return EPA2A_OK;
}

#define CHECK_CFG(cond, ...) \
  if (!(cond)) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, __VA_ARGS__)

int validate(const epa2a_layer_config& k, const char* fn) {
  const int pes = nvshmem_n_pes(), me = nvshmem_my_pe();
  CHECK_CFG(k.world_size == pes, "config.world_size = %d must equal the NVSHMEM job size %d", k.world_size,
            pes);
  CHECK_CFG(k.rank == me, "config.rank = %d must equal this NVSHMEM PE %d", k.rank, me);
  CHECK_CFG(k.max_tokens >= 1, "config.max_tokens = %d must be at least 1", k.max_tokens);
  CHECK_CFG(k.hidden >= 1, "config.hidden = %d must be at least 1", k.hidden);
  CHECK_CFG(k.topk >= 1 && k.topk <= 32, "config.topk = %d must be in [1, 32]", k.topk);
  CHECK_CFG(
      k.local_world_size >= 1 && k.local_world_size <= k.world_size && k.world_size % k.local_world_size == 0,
      "config.local_world_size = %d must divide world_size = %d", k.local_world_size, k.world_size);
  CHECK_CFG(k.world_size / k.local_world_size <= 64,
            "config: at most 64 nodes (world_size / local_world_size)");
  CHECK_CFG(k.num_experts >= k.world_size && k.num_experts % k.world_size == 0,
            "config.num_experts = %d must be a positive multiple of world_size = %d", k.num_experts,
            k.world_size);
  CHECK_CFG(k.topk <= k.num_experts, "config.topk = %d must not exceed num_experts = %d", k.topk,
            k.num_experts);
  CHECK_CFG(k.num_experts < 12 * 1024,
            "config.num_experts = %d must be below 12288 (shared-memory histograms)", k.num_experts);
  CHECK_CFG(k.token_type >= EPA2A_TOKEN_BF16 && k.token_type <= EPA2A_TOKEN_FP32,
            "config.token_type = %d must be 0 (bf16), 1 (fp16) or 2 (fp32)", k.token_type);
  const int want_bytes = k.token_type == EPA2A_TOKEN_FP32 ? 4 : 2;
  CHECK_CFG(k.token_bytes == want_bytes, "config.token_bytes = %d must be %d for token_type %d",
            k.token_bytes, want_bytes, k.token_type);
  CHECK_CFG(k.num_sms >= 1, "config.num_sms = %d must be at least 1", k.num_sms);
  CHECK_CFG(k.enable_local_combine == 0 || k.enable_local_combine == 1,
            "config.enable_local_combine must be 0 or 1");
  CHECK_CFG(!k.enable_local_combine || k.world_size == k.local_world_size,
            "config.enable_local_combine needs a single node (world_size == local_world_size)");
  CHECK_CFG(k.expert_alignment >= 1 && (k.expert_alignment & (k.expert_alignment - 1)) == 0,
            "config.expert_alignment = %d must be a power of two", k.expert_alignment);
  CHECK_CFG(k.capacity >= 1, "config.capacity = %d must be at least 1", k.capacity);
  CHECK_CFG((k.flags & ~EPA2A_LAYER_FIXED_CAPACITY) == 0, "config.flags = %d has unknown bits", k.flags);
  CHECK_CFG(!(k.flags & EPA2A_LAYER_FIXED_CAPACITY) || (k.hidden * k.token_bytes) % 16 == 0,
            "config: EPA2A_LAYER_FIXED_CAPACITY needs rows of a multiple of 16 bytes (hidden = %d)",
            k.hidden);
  const int64_t worst = (int64_t)k.max_tokens * k.topk * k.world_size +
                        (int64_t)(k.num_experts / k.world_size) * (k.expert_alignment - 1);
  CHECK_CFG(worst <= INT_MAX, "config: max_tokens * topk * world_size (+ padding) = %lld rows exceeds int32",
            (long long)worst);
  const int64_t rows0 = (int64_t)k.capacity * k.max_tokens * k.topk;
  CHECK_CFG(rows0 <= INT_MAX, "config: capacity * max_tokens * topk = %lld rows exceeds int32",
            (long long)rows0);
  return EPA2A_OK;
}

// The host's own record of a failure it found (the device record was empty or held something else).
void record_host_error(epa2a_layer* l, int code, int phase, int peer) {
  volatile epa2a_status* s = l->h_status;
  s->phase = phase;
  s->rank = l->ctx.me;
  s->peer = peer;
  s->index = -1;
  s->value = -1;
  s->expected = 0;
  s->observed = 0;
  s->waited_ns = 0;
  std::atomic_thread_fence(std::memory_order_release);
  s->code = code;
}

// After epa2a_dispatch_reject: waits for its exchange kernel (bounded by the layer's deadline), which writes the
// host-polled sizes when it ends.
int drain_rejection(epa2a_layer* l, const char* fn, cudaStream_t s) {
  if (!l->reject_pending) return EPA2A_OK;
  l->reject_pending = false;
  EPA2A_CUDA(fn, cudaStreamSynchronize(s));
  return EPA2A_OK;
}

// Clears a non-fatal record of an earlier call (an input error with dropped entries, a peer's rejection) so that
// this call can report its own.
int clear_input_error(epa2a_layer* l, const char* fn, cudaStream_t s) {
  const int code = read_status(l).code;
  if (code == EPA2A_OK || fatal_record(l, code)) return EPA2A_OK;  // a fatal record stays until the reset
  std::memset(l->h_status, 0, sizeof(epa2a_status));
  EPA2A_CUDA(fn, cudaMemsetAsync(l->ctx.claim, 0, sizeof(int), s));
  return EPA2A_OK;
}

// A dispatch (or its rejection) may begin: no dispatch in progress, no fatal record waiting for the reset.
int check_dispatch_start(epa2a_layer* l, const char* fn) {
  if (l->step != Step::Idle && l->step != Step::Dispatched)
    return fail(EPA2A_ERR_STATE, fn, "a dispatch is already in progress (state '%s')", step_name(l->step));
  const epa2a_status st = read_status(l);
  if (fatal_record(l, st.code)) {
    epa2a::status_fail(st, fn);
    return fail(EPA2A_ERR_STATE, fn, "the layer failed earlier and needs epa2a_layer_reset (collective): %s",
                epa2a_last_error());
  }
  return EPA2A_OK;
}

// The start both share: the rejected exchange before (if any) has ended, an earlier non-fatal record is cleared,
// the step's inputs are set, and the host-polled sizes are unknown again.
int start_dispatch(epa2a_layer* l, const char* fn, cudaStream_t s, const void* tokens, const float* weights,
                   const int32_t* scatter_indices, int num_tokens) {
  int rc;
  if ((rc = drain_rejection(l, fn, s))) return rc;
  if ((rc = clear_input_error(l, fn, s))) return rc;  // an earlier step's: this step reports its own
  epa2a::DevCtx& c = l->ctx;
  c.n = num_tokens;
  c.tokens = static_cast<const char*>(tokens);
  c.has_weights = weights != nullptr;
  c.has_scatter = scatter_indices != nullptr;
  c.user_scatter = scatter_indices;
  for (int d = 0; d < c.W; ++d) reinterpret_cast<volatile int*>(l->h_info)[d] = -1;
  return EPA2A_OK;
}

}  // namespace

extern "C" {

EPA2A_API int epa2a_layer_create(const epa2a_layer_config* config, epa2a_layer** layer) {
  const char* fn = "epa2a_layer_create";
  if (!epa2a::runtime_ready()) return fail(EPA2A_ERR_NOT_INITIALIZED, fn, "epa2a_init has not succeeded");
  if (!config || !layer) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "config and layer must not be NULL");
  *layer = nullptr;
  // The caller's struct may be another header's: read its first two fields only until they match this one.
  if (config->size != (int32_t)sizeof(epa2a_layer_config) || config->version != EPA2A_LAYER_CONFIG_VERSION)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn,
                "config.size = %d / version = %d: this library (%d.%d) expects %d / %d (the caller was built "
                "against another epa2a.h)",
                config->size, config->version, EPA2A_VERSION_MAJOR, EPA2A_VERSION_MINOR,
                (int)sizeof(epa2a_layer_config), EPA2A_LAYER_CONFIG_VERSION);
  int rc = validate(*config, fn);
  if (rc) return rc;
  auto* l = new epa2a_layer();
  l->cfg = *config;
  if (l->cfg.timeout_ns <= 0) l->cfg.timeout_ns = kDefaultTimeoutNs;
  const epa2a_layer_config& k = l->cfg;
  epa2a::DevCtx& c = l->ctx;
  c.W = k.world_size;
  c.L = k.local_world_size;
  c.N = c.W / c.L;
  c.E = k.num_experts;
  c.Epr = c.E / c.W;
  c.K = k.topk;
  c.H = k.hidden;
  c.me = k.rank;
  c.node = c.me / c.L;
  c.lrank = c.me % c.L;
  c.row_bytes = k.hidden * k.token_bytes;
  c.max_tokens = k.max_tokens;
  c.align = k.expert_alignment;
  c.local_combine = k.enable_local_combine;
  c.timeout_ns = k.timeout_ns;
  c.fixed_capacity = (k.flags & EPA2A_LAYER_FIXED_CAPACITY) ? 1 : 0;
  c.meta_bytes = epa2a::round_up(12 * c.K, 16);
  c.rec_bytes = c.meta_bytes + epa2a::round_up(c.row_bytes, 16);
  l->num_sms = k.num_sms;
  const size_t entries = (size_t)k.max_tokens * k.topk;
  l->max_chunks = (int)((entries + epa2a::kChunk - 1) / epa2a::kChunk);
  const int info_len = epa2a::info_len(c.W, c.Epr);
  l->info.assign(info_len, 0);

  void* p = nullptr;
  epa2a::CollectiveOutcome o;
  const size_t W = c.W, MT = c.max_tokens, N = c.N;
  // 1. Local memory first: a rank that fails here tells its peers at the first barrier, before anything
  // collective was allocated, so every rank returns and nobody waits in nvshmem_malloc.
  auto local = [&]() -> int {
    int r;
    if ((r = alloc_dev(l->dev_fixed, entries * sizeof(int), &p, fn))) return r;
    c.ids = static_cast<const int*>(p);
    if ((r = alloc_dev(l->dev_fixed, entries * sizeof(float), &p, fn))) return r;
    c.wts = static_cast<const float*>(p);
    if ((r = alloc_dev(l->dev_fixed, entries * sizeof(int), &p, fn))) return r;
    c.send_row = static_cast<int*>(p);
    if ((r = alloc_dev(l->dev_fixed, entries * sizeof(int), &p, fn))) return r;
    c.scatter = static_cast<int*>(p);
    if ((r = alloc_dev(l->dev_fixed, (size_t)std::max(l->max_chunks, 1) * (c.E + 1) * sizeof(int), &p, fn)))
      return r;
    c.chunk_hist = static_cast<int*>(p);
    if ((r = alloc_dev(l->dev_fixed, 3 * (size_t)c.E * sizeof(int), &p, fn))) return r;
    c.send_base = static_cast<int*>(p);
    c.expert_rows = c.send_base + c.E;
    c.estart = c.send_base + 2 * c.E;
    if ((r = alloc_dev(l->dev_fixed, info_len * sizeof(int), &p, fn))) return r;
    c.dinfo = static_cast<int*>(p);
    if ((r = alloc_dev(l->dev_fixed, epa2a::kEpochs * sizeof(uint64_t), &p, fn))) return r;
    c.dep = static_cast<uint64_t*>(p);
    if ((r = alloc_dev(l->dev_fixed, 2 * sizeof(int), &p, fn))) return r;
    c.fatal = static_cast<int*>(p);
    c.claim = c.fatal + 1;
    auto host_mapped = [&](size_t bytes, void** hp, void** dp) -> int {
      EPA2A_CUDA(fn, cudaHostAlloc(hp, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
      std::memset(*hp, 0, bytes);
      EPA2A_CUDA(fn, cudaHostGetDevicePointer(dp, *hp, 0));
      return EPA2A_OK;
    };
    void* dp = nullptr;
    if ((r = host_mapped(sizeof(epa2a_status), reinterpret_cast<void**>(&l->h_status), &dp))) return r;
    c.status = static_cast<epa2a_status*>(dp);
    if ((r = host_mapped(sizeof(int), reinterpret_cast<void**>(&l->h_abort), &dp))) return r;
    c.abort_flag = static_cast<const int*>(dp);
    if ((r = host_mapped(info_len * sizeof(int), reinterpret_cast<void**>(&l->h_info), &dp))) return r;
    c.hinfo = static_cast<int*>(dp);
    for (int i = 0; i < info_len; ++i) l->h_info[i] = -1;
    return EPA2A_OK;
  };
  if ((rc = local())) {
    epa2a::collective_barrier(epa2a::kBarrierCreateBegin, false, &o);  // tells the peers; they fail at once
    free_local(l);
    return amend_error(rc, fn, " (the peers were told at the layer-create barrier)");
  }
  if ((rc = life_barrier(l, fn, epa2a::kBarrierCreateBegin, &o, "; nothing collective was allocated"))) {
    free_local(l);
    return rc;
  }

  // 2. Symmetric memory (every nvshmem_malloc is a collective of its own). An allocation fails on every rank
  // alike (the same sizes from the same heap), so the frees below stay collective.
#define TRY(expr)      \
  if ((rc = (expr))) { \
    free_all(l);       \
    return rc;         \
  }
  TRY(alloc_sym(l->sym_fixed, W * (c.E + 2) * sizeof(int), &p, fn, "count table"));
  c.table = static_cast<int*>(p);
  TRY(alloc_sym(l->sym_fixed, (c.E + 2) * sizeof(int), &p, fn, "own counts"));
  c.my_counts = static_cast<int*>(p);
  TRY(alloc_sym(l->sym_fixed, epa2a::kSlots * W * sizeof(uint64_t), &p, fn, "signals"));
  c.sig = static_cast<uint64_t*>(p);
  TRY(alloc_sym(l->sym_fixed, W * sizeof(uint64_t), &p, fn, "reject marks"));
  c.reject = static_cast<uint64_t*>(p);
  if (c.N > 1) {
    TRY(alloc_sym(l->sym_fixed, MT * c.rec_bytes, &p, fn, "inter-node send records"));
    c.x_send = static_cast<char*>(p);
    TRY(alloc_sym(l->sym_fixed, N * MT * c.rec_bytes, &p, fn, "inter-node receive records"));
    c.x_recv = static_cast<char*>(p);
    TRY(alloc_sym(l->sym_fixed, N * MT * sizeof(uint64_t), &p, fn, "inter-node token signals"));
    c.x_sig = static_cast<uint64_t*>(p);
    TRY(alloc_sym(l->sym_fixed, N * MT * c.H * sizeof(float), &p, fn, "inter-node partial staging"));
    c.c_stage = static_cast<float*>(p);
    TRY(alloc_sym(l->sym_fixed, N * MT * c.H * sizeof(float), &p, fn, "inter-node partials"));
    c.c_recv = static_cast<float*>(p);
    TRY(alloc_sym(l->sym_fixed, N * MT * sizeof(uint64_t), &p, fn, "inter-node partial signals"));
    c.c_sig = static_cast<uint64_t*>(p);
  }

  const int64_t rows0 = (int64_t)k.capacity * k.max_tokens * k.topk + (int64_t)c.Epr * (c.align - 1);
  TRY(alloc_rows(l, (int)std::min<int64_t>(rows0, INT_MAX), fn));
#undef TRY
  auto init = [&]() -> int {
    EPA2A_CUDA(fn, cudaMemset(c.table, 0, W * (c.E + 2) * sizeof(int)));
    EPA2A_CUDA(fn, cudaMemset(c.sig, 0, epa2a::kSlots * W * sizeof(uint64_t)));
    EPA2A_CUDA(fn, cudaMemset(c.reject, 0, W * sizeof(uint64_t)));
    if (c.N > 1) {
      EPA2A_CUDA(fn, cudaMemset(c.x_sig, 0, N * MT * sizeof(uint64_t)));
      EPA2A_CUDA(fn, cudaMemset(c.c_sig, 0, N * MT * sizeof(uint64_t)));
    }
    EPA2A_CUDA(fn, cudaMemset(c.fatal, 0, 2 * sizeof(int)));
    EPA2A_CUDA(fn, cudaMemset(c.dep, 0, epa2a::kEpochs * sizeof(uint64_t)));
    EPA2A_CUDA(fn, cudaDeviceSynchronize());
    return EPA2A_OK;
  };
  if ((rc = init())) {
    // The peers go on to the last barrier and fail there naming this rank; freeing the symmetric buffers
    // would wait for them in nvshmem_free forever.
    epa2a::collective_barrier(epa2a::kBarrierCreateEnd, false, &o);
    free_local(l);
    return amend_error(
        rc, fn,
        " (the peers were told at the layer-create barrier; the symmetric buffers were left to the process)");
  }
  if (trace_on() && c.N > 1) {
    const int peer = ((c.node + 1) % c.N) * c.L + c.lrank;
    fprintf(stderr, "epa2a trace rank %d: proxy rank %d load/store reachable: %s\n", c.me, peer,
            nvshmem_ptr(c.x_recv, peer) ? "yes" : "no (puts go through the proxy)");
  }
  // No rank may signal another before that rank's signals are zeroed.
  if ((rc = life_barrier(l, fn, epa2a::kBarrierCreateEnd, &o,
                         "; the layer was not created (its symmetric buffers were left to the process)"))) {
    free_local(l);
    return rc;
  }
  *layer = l;
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_destroy(epa2a_layer* layer) {
  const char* fn = "epa2a_layer_destroy";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  const int me = layer->ctx.me;
  cudaError_t dead = cudaSuccess;
  if (epa2a::context_dead(&dead)) {
    // No kernel can run, so no barrier; nvshmem_free would wait for a barrier that never completes.
    rc =
        fail(EPA2A_ERR_CUDA, fn,
             "rank %d: the CUDA context is dead (%s: %s): the collective destroy was skipped (the peers time "
             "out at their layer-destroy barrier naming this rank); the layer's memory goes with the process",
             me, cudaGetErrorName(dead), cudaGetErrorString(dead));
    fprintf(stderr, "epa2a: %s\n", epa2a_last_error());
    delete layer;
    return rc;
  }
  epa2a::CollectiveOutcome o;
  if ((rc = life_barrier(
           layer, fn, epa2a::kBarrierDestroy, &o,
           "; the collective destroy was skipped: the symmetric buffers were left to the process, "
           "the rest was freed"))) {
    fprintf(stderr, "epa2a: %s\n", epa2a_last_error());
    free_local(layer);
    return rc;
  }
  free_all(layer);
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_get_buffers(epa2a_layer* layer, epa2a_layer_buffers* buffers) {
  const char* fn = "epa2a_layer_get_buffers";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  if (!buffers) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "buffers is NULL");
  const epa2a::DevCtx& c = layer->ctx;
  buffers->output = c.out;
  buffers->weights = c.out_w;
  buffers->row_origin = reinterpret_cast<int32_t*>(c.origin);
  buffers->scatter_rows = c.scatter;
  buffers->output_rows = c.out_rows;
  buffers->reserved = 0;
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_grow_output(epa2a_layer* layer, int32_t rows) {
  const char* fn = "epa2a_layer_grow_output";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  if (layer->step == Step::Sent)
    return fail(EPA2A_ERR_STATE, fn, "cannot grow while a dispatch is being sent; finish it first");
  if (rows <= layer->ctx.out_rows) return EPA2A_OK;  // every rank passes the same rows: all skip together
  if (layer->ctx.fixed_capacity)
    return fail(EPA2A_ERR_CAPACITY, fn,
                "the layer was created with EPA2A_LAYER_FIXED_CAPACITY (%d rows); it cannot grow to %d rows: "
                "create it with a larger capacity",
                layer->ctx.out_rows, rows);
  epa2a::CollectiveOutcome o;
  // No peer may still read or write the old buffers. A failed barrier leaves them as they were.
  if ((rc = life_barrier(layer, fn, epa2a::kBarrierGrowBegin, &o,
                         "; the buffers were not grown; every rank must call epa2a_layer_reset"))) {
    record_barrier_failure(layer, rc, o);
    return rc;
  }
  free_rows(layer);
  if ((rc = alloc_rows(layer, rows, fn))) return rc;
  EPA2A_CUDA(fn, cudaDeviceSynchronize());
  if ((rc = life_barrier(layer, fn, epa2a::kBarrierGrowEnd, &o,
                         "; this rank's buffers were grown; every rank must call epa2a_layer_reset"))) {
    record_barrier_failure(layer, rc, o);
    return rc;
  }
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_set_timeout(epa2a_layer* layer, int64_t timeout_ns) {
  int rc = check_layer(layer, "epa2a_layer_set_timeout");
  if (rc) return rc;
  layer->cfg.timeout_ns = timeout_ns > 0 ? timeout_ns : kDefaultTimeoutNs;
  layer->ctx.timeout_ns = layer->cfg.timeout_ns;
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_abort(epa2a_layer* layer) {
  if (!layer) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_layer_abort", "layer is NULL");
  *reinterpret_cast<volatile int*>(layer->h_abort) = 1;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_status(epa2a_layer* layer, epa2a_status* status) {
  const char* fn = "epa2a_layer_status";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  if (!status) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "status is NULL");
  *status = read_status(layer);
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_sync(epa2a_layer* layer, void* stream) {
  const char* fn = "epa2a_layer_sync";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  EPA2A_CUDA(fn, cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  const epa2a_status s = read_status(layer);
  if (s.code != EPA2A_OK) return epa2a::status_fail(s, fn);
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_reset(epa2a_layer* layer) {
  const char* fn = "epa2a_layer_reset";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a::DevCtx& c = layer->ctx;
  epa2a::CollectiveOutcome o;
  // Every rank's kernels have ended (each synchronized its device first): no signal is in flight.
  if ((rc = life_barrier(layer, fn, epa2a::kBarrierResetBegin, &o, "; the layer was not reset"))) {
    record_barrier_failure(layer, rc, o);
    return rc;
  }
  const size_t W = c.W, MT = c.max_tokens, N = c.N;
  EPA2A_CUDA(fn, cudaMemset(c.sig, 0, epa2a::kSlots * W * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaMemset(c.reject, 0, W * sizeof(uint64_t)));  // the combine epochs start again
  if (c.N > 1) {
    EPA2A_CUDA(fn, cudaMemset(c.x_sig, 0, N * MT * sizeof(uint64_t)));
    EPA2A_CUDA(fn, cudaMemset(c.c_sig, 0, N * MT * sizeof(uint64_t)));
  }
  EPA2A_CUDA(fn, cudaMemset(c.lcsrc, 0xff, (size_t)c.out_rows * sizeof(int)));
  EPA2A_CUDA(fn, cudaMemset(c.fatal, 0, 2 * sizeof(int)));
  EPA2A_CUDA(fn, cudaMemset(c.dep, 0, epa2a::kEpochs * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaDeviceSynchronize());
  std::memset(layer->h_status, 0, sizeof(epa2a_status));
  *reinterpret_cast<volatile int*>(layer->h_abort) = 0;
  layer->step = Step::Idle;
  // No rank may signal another before every rank has cleared its signals.
  if ((rc = life_barrier(layer, fn, epa2a::kBarrierResetEnd, &o,
                         "; this rank was cleared but its peers may not be: call epa2a_layer_reset again on "
                         "every rank"))) {
    record_barrier_failure(layer, rc, o);
    return rc;
  }
  return EPA2A_OK;
}

EPA2A_API int epa2a_layer_barrier(epa2a_layer* layer, int32_t intra_node_only, void* stream) {
  const char* fn = "epa2a_layer_barrier";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  const epa2a::DevCtx& c = layer->ctx;
  cudaError_t err;
  if (intra_node_only) {
    err = epa2a::launch_barrier(c, EPA2A_SLOT_BARRIER_NODE, epa2a::kEpochBarrierNode, true, c.node * c.L, c.L,
                                static_cast<cudaStream_t>(stream));
  } else {
    err = epa2a::launch_barrier(c, EPA2A_SLOT_BARRIER_ALL, epa2a::kEpochBarrierAll, true, 0, c.W,
                                static_cast<cudaStream_t>(stream));
  }
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "barrier kernel launch");
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_prepare(epa2a_layer* layer, const void* tokens, const int32_t* expert_ids,
                                     const float* weights, const int32_t* scatter_indices, int32_t num_tokens,
                                     void* stream) {
  const char* fn = "epa2a_dispatch_prepare";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = check_dispatch_start(l, fn))) return rc;
  epa2a::DevCtx& c = l->ctx;
  if (num_tokens < 0 || num_tokens > c.max_tokens)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "num_tokens = %d must be in [0, max_tokens = %d]", num_tokens,
                c.max_tokens);
  if (num_tokens > 0 && (!tokens || !expert_ids))
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "tokens and expert_ids must not be NULL");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((rc = start_dispatch(l, fn, s, tokens, weights, scatter_indices, num_tokens))) return rc;
  const size_t entries = (size_t)num_tokens * c.K;
  if (entries) {
    EPA2A_CUDA(fn, cudaMemcpyAsync(const_cast<int*>(c.ids), expert_ids, entries * sizeof(int),
                                   cudaMemcpyDefault, s));
    if (weights)
      EPA2A_CUDA(fn, cudaMemcpyAsync(const_cast<float*>(c.wts), weights, entries * sizeof(float),
                                     cudaMemcpyDefault, s));
  }
  const int nchunks = (int)((entries + epa2a::kChunk - 1) / epa2a::kChunk);
  cudaError_t err = epa2a::launch_count(c, nchunks, std::max(l->num_sms, 1) * 4, s);
  if (err == cudaSuccess) err = epa2a::launch_exchange(c, nchunks, s);
  if (err == cudaSuccess) err = epa2a::launch_assign(c, nchunks, std::max(l->num_sms, 1) * 4, s);
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "counting kernels launch");
  l->step = Step::Prepared;
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_wait_sizes(epa2a_layer* layer, int64_t timeout_ns, int32_t* max_recv_rows) {
  const char* fn = "epa2a_dispatch_wait_sizes";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = expect_step(l, fn, Step::Prepared))) return rc;
  const epa2a::DevCtx& c = l->ctx;
  if (timeout_ns <= 0) timeout_ns = 2 * c.timeout_ns + 1000000000LL;  // past every device deadline
  const auto t0 = std::chrono::steady_clock::now();
  const volatile int* h = l->h_info;
  for (unsigned spin = 0;; ++spin) {
    const epa2a_status st = read_status(l);
    if (fatal_code(st.code)) return epa2a::status_fail(st, fn);
    bool all = true;
    for (int d = 0; d < c.W && all; ++d) all = h[d] >= 0;
    if (all) break;
    const int64_t waited =
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
    if (waited > timeout_ns) {
      epa2a_layer_abort(l);
      return fail(EPA2A_ERR_TIMEOUT, fn,
                  "rank %d: receive sizes unknown after %.1f ms (no device error recorded); the layer was "
                  "aborted and needs epa2a_layer_reset",
                  c.me, waited / 1e6);
    }
    // Spin (with a pause) for the first 2 ms: a yield hands the core to any runnable thread on it, and the poller
    // may then wait a whole scheduler tick (4 ms) for a size that arrived microseconds later. Past 2 ms the peers
    // are late anyway: yield now and then.
    if ((spin & 1023u) == 1023u && waited > 2000000) sched_yield();
#if defined(__x86_64__)
    __builtin_ia32_pause();
#endif
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  for (size_t i = 0; i < l->info.size(); ++i) l->info[i] = h[i];
  for (int d = 0; d < c.W; ++d) {
    if (l->info[epa2a::info_tokens(c.W) + d] >= 0) continue;
    // The exchange kernel stopped the step on every rank (nothing was sent): the layer is ready for the next
    // dispatch. The record names the rank even where an input error of this rank's own took the device record.
    l->step = Step::Idle;
    if (read_status(l).code != EPA2A_ERR_PEER_REJECTED)
      record_host_error(l, EPA2A_ERR_PEER_REJECTED, EPA2A_PHASE_EXCHANGE, d);
    return fail(
        EPA2A_ERR_PEER_REJECTED, fn,
        "rank %d: rank %d rejected its input for this dispatch and told every rank in the counts exchange; "
        "nothing was sent and the step failed on every rank; the layer is ready for the next dispatch",
        c.me, d);
  }
  int mx = 0;
  for (int d = 0; d < c.W; ++d) mx = std::max(mx, l->info[d]);
  l->max_recv = mx;
  if (max_recv_rows) *max_recv_rows = mx;
  l->step = Step::Sized;
  const epa2a_status st = read_status(l);
  if (st.code != EPA2A_OK) return epa2a::status_fail(st, fn);  // input error: entries were dropped
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_get_layout(epa2a_layer* layer, int32_t* recv_rows_per_rank,
                                        int32_t* tokens_per_rank, int32_t* rows_per_local_expert,
                                        int32_t* padded_rows_per_local_expert, int32_t* expert_row_starts) {
  const char* fn = "epa2a_dispatch_get_layout";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  if (!layer->ctx.fixed_capacity && (layer->step == Step::Idle || layer->step == Step::Prepared))
    return fail(EPA2A_ERR_STATE, fn, "call after epa2a_dispatch_wait_sizes (state '%s')",
                step_name(layer->step));
  const int W = layer->ctx.W, Epr = layer->ctx.Epr;
  if (layer->ctx.fixed_capacity) {
    // No host wait happened: the exchange kernel's host-mapped copy is complete once the stream was synced.
    std::atomic_thread_fence(std::memory_order_acquire);
    const volatile int* h = layer->h_info;
    for (size_t i = 0; i < layer->info.size(); ++i) layer->info[i] = h[i];
  }
  const int* in = layer->info.data();
  auto copy = [](int32_t* dst, const int* src, int n) {
    if (dst) std::memcpy(dst, src, sizeof(int32_t) * n);
  };
  copy(recv_rows_per_rank, in + epa2a::info_recv(W), W);
  copy(tokens_per_rank, in + epa2a::info_tokens(W), W);
  copy(rows_per_local_expert, in + epa2a::info_rows(W, Epr), Epr);
  copy(padded_rows_per_local_expert, in + epa2a::info_padded(W, Epr), Epr);
  copy(expert_row_starts, in + epa2a::info_start(W, Epr), Epr);
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_send(epa2a_layer* layer, void* stream) {
  const char* fn = "epa2a_dispatch_send";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = expect_step(l, fn, Step::Sized))) return rc;
  const epa2a::DevCtx& c = l->ctx;
  if (l->max_recv > c.out_rows)
    return fail(
        EPA2A_ERR_CAPACITY, fn,
        "a rank receives %d rows but the buffers hold %d: call epa2a_layer_grow_output(%d) on every rank",
        l->max_recv, c.out_rows, l->max_recv);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int vec = vec_bytes_for(c.row_bytes, c.tokens);
  KernelTrace tr("send", c.me, s);
  cudaError_t err = epa2a::launch_dispatch(c, l->num_sms, vec, s);
  tr.mark("dispatch");
  if (err == cudaSuccess && c.N > 1) err = epa2a::launch_internode_send(c, l->num_sms, vec, s);
  tr.mark("internode_send");
  if (err == cudaSuccess && c.N > 1)
    err = epa2a::launch_forward(c, l->num_sms, vec_bytes_for(c.row_bytes), s);
  tr.mark("forward");
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "dispatch kernels launch");
  l->step = Step::Sent;
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_finish(epa2a_layer* layer, void* stream) {
  const char* fn = "epa2a_dispatch_finish";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = expect_step(l, fn, Step::Sent))) return rc;
  const epa2a::DevCtx& c = l->ctx;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // Every rank that writes into this rank's rows is on this node (sources or proxies).
  cudaError_t err =
      epa2a::launch_barrier(c, EPA2A_SLOT_DISPATCH_DONE, epa2a::kEpochDispatch, false, c.node * c.L, c.L, s);
  if (err == cudaSuccess) err = epa2a::launch_expand(c, l->num_sms, vec_bytes_for(c.row_bytes), s);
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "dispatch postprocess launch");
  l->step = Step::Dispatched;
  return EPA2A_OK;
}

EPA2A_API int epa2a_combine(epa2a_layer* layer, const void* expert_output, void* out, int32_t weighted,
                            void* stream) {
  const char* fn = "epa2a_combine";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = expect_step(l, fn, Step::Dispatched))) return rc;
  epa2a::DevCtx& c = l->ctx;
  if (c.n > 0 && !out) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "out must not be NULL");
  if (weighted && !c.has_weights)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "weighted combine needs routing weights at dispatch");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((rc = clear_input_error(l, fn, s)))
    return rc;  // the dispatch reported it: this combine records its own
  if (expert_output && expert_output != c.out) {
    if (c.fixed_capacity && reinterpret_cast<uintptr_t>(expert_output) % 16 != 0)
      return fail(EPA2A_ERR_INVALID_ARGUMENT, fn,
                  "expert_output must be 16-byte aligned in fixed-capacity mode");
    if (c.fixed_capacity) {
      // The receive size is known on the device only (no host wait): a kernel copies that many rows.
      const cudaError_t e = epa2a::launch_copy_rows(c, expert_output, l->num_sms, s);
      if (e != cudaSuccess) return epa2a::cuda_fail(e, fn, "expert output copy launch");
    } else {
      const int recv = l->info[epa2a::info_recv(c.W) + c.me];
      if (recv > 0)
        EPA2A_CUDA(fn,
                   cudaMemcpyAsync(c.out, expert_output, (size_t)recv * c.row_bytes, cudaMemcpyDefault, s));
    }
  }
  const bool wide = c.row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int tt = l->cfg.token_type;
  cudaError_t err = cudaSuccess;
  KernelTrace tr("combine", c.me, s);
  if (c.local_combine) err = epa2a::launch_presum(c, l->num_sms, tt, c.row_bytes % 16 == 0, weighted, s);
  tr.mark("copy-in+presum");
  if (err == cudaSuccess)
    err =
        epa2a::launch_barrier(c, EPA2A_SLOT_COMBINE_READY, epa2a::kEpochCombine, true, c.node * c.L, c.L, s);
  tr.mark("barrier");
  if (err == cudaSuccess) {
    if (c.N == 1) {
      err = epa2a::launch_combine(c, out, l->num_sms, tt, wide, weighted, s);
    } else {
      err = epa2a::launch_combine_proxy(c, l->num_sms, tt, c.row_bytes % 16 == 0, weighted, s);
      tr.mark("proxy");
      if (err == cudaSuccess) err = epa2a::launch_combine_final(c, out, l->num_sms, tt, wide, weighted, s);
    }
  }
  tr.mark("pull/final");
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "combine kernels launch");
  // One combine per dispatch: the next dispatch's count exchange orders every peer's reads before reuse.
  l->step = Step::Idle;
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_reject(epa2a_layer* layer, void* stream) {
  const char* fn = "epa2a_dispatch_reject";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = check_dispatch_start(l, fn))) return rc;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((rc = start_dispatch(l, fn, s, nullptr, nullptr, nullptr, 0))) return rc;
  epa2a::DevCtx& c = l->ctx;
  // No tokens to count: the exchange alone, with -1 tokens in this rank's row.
  c.rejecting = 1;
  const cudaError_t err = epa2a::launch_exchange(c, 0, s);
  c.rejecting = 0;
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "exchange kernel launch");
  l->reject_pending = true;
  l->step = Step::Idle;
  return EPA2A_OK;
}

EPA2A_API int epa2a_combine_reject(epa2a_layer* layer, void* stream) {
  const char* fn = "epa2a_combine_reject";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  epa2a_layer* l = layer;
  if ((rc = expect_step(l, fn, Step::Dispatched))) return rc;
  epa2a::DevCtx& c = l->ctx;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((rc = clear_input_error(l, fn, s))) return rc;
  // The mark first (completed), then this node's combine barrier; across nodes this rank still serves as a proxy
  // (its partials are wrong, and every rank that reads them sees the mark first). Its own output is not written.
  c.rejecting = 1;
  cudaError_t err = epa2a::launch_reject_mark(c, s);
  if (err == cudaSuccess)
    err =
        epa2a::launch_barrier(c, EPA2A_SLOT_COMBINE_READY, epa2a::kEpochCombine, true, c.node * c.L, c.L, s);
  if (err == cudaSuccess && c.N > 1)
    err = epa2a::launch_combine_proxy(c, l->num_sms, l->cfg.token_type, c.row_bytes % 16 == 0, 0, s);
  c.rejecting = 0;
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "combine rejection kernels launch");
  l->step = Step::Idle;
  return EPA2A_OK;
}

EPA2A_API int epa2a_dispatch_enqueue(epa2a_layer* layer, const void* tokens, const int32_t* expert_ids,
                                     const float* weights, const int32_t* scatter_indices, int32_t num_tokens,
                                     void* stream) {
  const char* fn = "epa2a_dispatch_enqueue";
  int rc = check_layer(layer, fn);
  if (rc) return rc;
  if (!layer->ctx.fixed_capacity)
    return fail(
        EPA2A_ERR_STATE, fn,
        "needs a layer created with EPA2A_LAYER_FIXED_CAPACITY (otherwise the host must size the buffers "
        "between prepare and send)");
  if ((rc = epa2a_dispatch_prepare(layer, tokens, expert_ids, weights, scatter_indices, num_tokens, stream)))
    return rc;
  layer->max_recv = 0;  // unknown on the host; the exchange kernel checks the capacity on the device
  layer->step = Step::Sized;
  if ((rc = epa2a_dispatch_send(layer, stream))) return rc;
  return epa2a_dispatch_finish(layer, stream);
}

EPA2A_API int epa2a_graph_begin(void* stream) {
  EPA2A_CUDA("epa2a_graph_begin",
             cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeThreadLocal));
  return EPA2A_OK;
}

EPA2A_API int epa2a_graph_end(void* stream, void** graph_exec) {
  const char* fn = "epa2a_graph_end";
  if (!graph_exec) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "graph_exec is NULL");
  *graph_exec = nullptr;
  cudaGraph_t g = nullptr;
  EPA2A_CUDA(fn, cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &g));
  cudaGraphExec_t e = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&e, g, 0);
  cudaGraphDestroy(g);
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "cudaGraphInstantiate");
  *graph_exec = e;
  return EPA2A_OK;
}

EPA2A_API int epa2a_graph_launch(void* graph_exec, void* stream) {
  if (!graph_exec) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_graph_launch", "graph_exec is NULL");
  EPA2A_CUDA("epa2a_graph_launch",
             cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph_exec), static_cast<cudaStream_t>(stream)));
  return EPA2A_OK;
}

EPA2A_API int epa2a_graph_destroy(void* graph_exec) {
  if (graph_exec)
    EPA2A_CUDA("epa2a_graph_destroy", cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph_exec)));
  return EPA2A_OK;
}

EPA2A_API int epa2a_mem_info(size_t* free_bytes, size_t* total_bytes) {
  size_t f = 0, t = 0;
  EPA2A_CUDA("epa2a_mem_info", cudaMemGetInfo(&f, &t));
  if (free_bytes) *free_bytes = f;
  if (total_bytes) *total_bytes = t;
  return EPA2A_OK;
}

}  // extern "C"
