// The low-latency layer object: buffers allocated once at creation (collective), the order of the four calls
// of a step, and the host side of errors recorded on the device.
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstring>

#include "internal.h"
#include "ll_internal.h"

using epa2a::fail;
using epa2a::LLStep;

namespace {

constexpr int64_t kDefaultTimeoutNs = 10LL * 1000 * 1000 * 1000;
constexpr int kDefaultBlocks = 16;

int check(epa2a_ll_layer* l, const char* fn) {
  if (!epa2a::runtime_ready()) return fail(EPA2A_ERR_NOT_INITIALIZED, fn, "epa2a_init has not succeeded");
  if (!l) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "layer is NULL");
  return EPA2A_OK;
}

const char* step_name(LLStep s) {
  switch (s) {
    case LLStep::Idle:
      return "idle (next: epa2a_ll_dispatch_send)";
    case LLStep::DispatchSent:
      return "dispatch sent (next: epa2a_ll_dispatch_recv)";
    case LLStep::Dispatched:
      return "dispatched (next: epa2a_ll_combine_send)";
    case LLStep::CombineSent:
      return "combine sent (next: epa2a_ll_combine_recv)";
  }
  return "?";
}

int expect_step(epa2a_ll_layer* l, const char* fn, LLStep want) {
  if (l->step != want)
    return fail(EPA2A_ERR_STATE, fn, "called out of order: the layer is %s", step_name(l->step));
  return EPA2A_OK;
}

bool fatal_code(int code) {
  return code == EPA2A_ERR_TIMEOUT || code == EPA2A_ERR_ABORTED || code == EPA2A_ERR_BAD_ROW;
}

epa2a_status read_status(const epa2a_ll_layer* l) {
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

const char* ll_phase_name(int phase) {
  switch (phase) {
    case EPA2A_PHASE_LL_DISPATCH_SEND:
      return "routing a low-latency dispatch";
    case EPA2A_PHASE_LL_DISPATCH_RECV:
      return "waiting for a peer's low-latency dispatch";
    case EPA2A_PHASE_LL_COMBINE_RECV:
      return "waiting for a peer's low-latency combine";
    case EPA2A_PHASE_LL_BARRIER:
      return "waiting at the low-latency layer's barrier";
    default:
      return nullptr;
  }
}

// The device record as an error message; the low-latency phases have their own words.
int ll_status_fail(const epa2a_status& s, const char* fn) {
  const char* phase = ll_phase_name(s.phase);
  if (!phase) return epa2a::status_fail(s, fn);
  switch (s.code) {
    case EPA2A_ERR_TIMEOUT:
    case EPA2A_ERR_ABORTED:
      return fail(s.code, fn,
                  "rank %d %s after %.1f ms waiting for rank %d while %s (signal expected %lld, saw %lld)",
                  s.rank, s.code == EPA2A_ERR_TIMEOUT ? "timed out" : "aborted", s.waited_ns / 1e6, s.peer,
                  phase, (long long)s.expected, (long long)s.observed);
    case EPA2A_ERR_CAPACITY:
      return fail(
          s.code, fn,
          "rank %d: local expert %d was sent %d rows but holds %lld (world_size * max_tokens); the rows "
          "past it were dropped (a token lists that expert more than once)",
          s.rank, s.index, s.value, (long long)s.expected);
    case EPA2A_ERR_BAD_EXPERT_ID:
      return fail(
          s.code, fn,
          "rank %d: expert id %d at (token, k) entry %d is outside [0, num_experts]; the entry was dropped",
          s.rank, s.value, s.index);
    case EPA2A_ERR_BAD_ROW:
      return fail(s.code, fn, "rank %d: index %d (entry %d, peer %d) failed its bounds check while %s",
                  s.rank, s.value, s.index, s.peer, phase);
    default:
      return fail(s.code, fn, "rank %d: device error %d while %s (peer %d, index %d, value %d)", s.rank,
                  s.code, phase, s.peer, s.index, s.value);
  }
}

// A failed step leaves the layer unusable until epa2a_ll_layer_reset; an input error of an earlier step (a
// dropped entry) is cleared so that this step reports its own.
int check_usable(epa2a_ll_layer* l, const char* fn, cudaStream_t s) {
  const epa2a_status st = read_status(l);
  if (st.code == EPA2A_OK) return EPA2A_OK;
  if (fatal_code(st.code)) {
    ll_status_fail(st, fn);
    return fail(EPA2A_ERR_STATE, fn,
                "the layer failed earlier and needs epa2a_ll_layer_reset (collective): %s",
                epa2a_last_error());
  }
  std::memset(l->h_status, 0, sizeof(epa2a_status));
  EPA2A_CUDA(fn, cudaMemsetAsync(l->ctx.claim, 0, sizeof(int), s));
  return EPA2A_OK;
}

#define CHECK_CFG(cond, ...) \
  if (!(cond)) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, __VA_ARGS__)

int validate(const epa2a_ll_config& k, const char* fn) {
  CHECK_CFG(k.size == (int32_t)sizeof(epa2a_ll_config) && k.version == EPA2A_LL_CONFIG_VERSION,
            "config.size = %d / version = %d: this library expects %d / %d (header and library differ)",
            k.size, k.version, (int)sizeof(epa2a_ll_config), EPA2A_LL_CONFIG_VERSION);
  const int pes = nvshmem_n_pes(), me = nvshmem_my_pe();
  CHECK_CFG(k.world_size == pes, "config.world_size = %d must equal the NVSHMEM job size %d", k.world_size,
            pes);
  CHECK_CFG(k.rank == me, "config.rank = %d must equal this NVSHMEM PE %d", k.rank, me);
  CHECK_CFG(k.world_size <= epa2a::kLLMaxRanks,
            "config.world_size = %d: the low-latency layer takes at most %d ranks", k.world_size,
            epa2a::kLLMaxRanks);
  CHECK_CFG(k.local_world_size == k.world_size,
            "config.local_world_size = %d < world_size = %d: the low-latency layer is intra-node only; the "
            "inter-node algorithm is the normal layer's (epa2a_layer_create)",
            k.local_world_size, k.world_size);
  CHECK_CFG(k.max_tokens >= 1, "config.max_tokens = %d must be at least 1", k.max_tokens);
  CHECK_CFG(k.hidden >= 8 && k.hidden % 8 == 0,
            "config.hidden = %d must be a positive multiple of 8 (16-byte rows)", k.hidden);
  CHECK_CFG(k.topk >= 1 && k.topk <= 32, "config.topk = %d must be in [1, 32]", k.topk);
  CHECK_CFG(k.num_experts >= k.world_size && k.num_experts % k.world_size == 0,
            "config.num_experts = %d must be a positive multiple of world_size = %d", k.num_experts,
            k.world_size);
  CHECK_CFG(k.num_experts <= 4096, "config.num_experts = %d must be at most 4096 (shared-memory counts)",
            k.num_experts);
  CHECK_CFG(k.flags == 0 && k.reserved == 0, "config.flags and config.reserved must be 0");
  const int64_t rows = (int64_t)k.num_experts * k.max_tokens;  // Epr * W * M
  CHECK_CFG(rows <= INT_MAX / 2, "config: num_experts * max_tokens = %lld receive rows exceeds int32",
            (long long)rows);
  CHECK_CFG(
      (int64_t)k.max_tokens * k.topk <= 16384,
      "config: max_tokens * topk = %lld must be at most 16384 (the routing block keeps every id in shared "
      "memory; the low-latency layer is for decode sizes)",
      (long long)k.max_tokens * k.topk);
  return EPA2A_OK;
}

int alloc_sym(epa2a_ll_layer* l, size_t bytes, void** out, const char* fn, const char* what) {
  void* p = nvshmem_malloc(std::max<size_t>(bytes, 16));
  if (!p)
    return fail(EPA2A_ERR_NVSHMEM, fn,
                "nvshmem_malloc of %zu bytes for %s failed (raise NVSHMEM_SYMMETRIC_SIZE)", bytes, what);
  l->sym.push_back(p);
  *out = p;
  return EPA2A_OK;
}

int alloc_dev(epa2a_ll_layer* l, size_t bytes, void** out, const char* fn) {
  void* p = nullptr;
  EPA2A_CUDA(fn, cudaMalloc(&p, std::max<size_t>(bytes, 16)));
  l->dev.push_back(p);
  *out = p;
  return EPA2A_OK;
}

void free_all(epa2a_ll_layer* l) {
  for (auto it = l->sym.rbegin(); it != l->sym.rend(); ++it) nvshmem_free(*it);
  for (void* p : l->dev) cudaFree(p);
  if (l->h_status) cudaFreeHost(l->h_status);
  if (l->h_abort) cudaFreeHost(l->h_abort);
  delete l;
}

// Signals, epochs, counters and the error record back to zero (creation and reset).
int clear_state(epa2a_ll_layer* l, const char* fn) {
  epa2a::LLCtx& c = l->ctx;
  EPA2A_CUDA(fn, cudaMemset(c.disp_sig, 0, c.W * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaMemset(c.comb_sig, 0, c.W * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaMemset(c.bar_sig, 0, c.W * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaMemset(c.dep, 0, epa2a::kLLEpochs * sizeof(uint64_t)));
  EPA2A_CUDA(fn, cudaMemset(c.done, 0, 2 * sizeof(unsigned)));
  EPA2A_CUDA(fn, cudaMemset(c.fatal, 0, 2 * sizeof(int)));
  EPA2A_CUDA(fn, cudaDeviceSynchronize());
  std::memset(l->h_status, 0, sizeof(epa2a_status));
  *reinterpret_cast<volatile int*>(l->h_abort) = 0;
  l->step = LLStep::Idle;
  return EPA2A_OK;
}

// This GPU's PCI address (domain, bus, device) plus one, the same in every process that uses it; 0 if unknown.
uint64_t this_gpu_key() {
  int dev = 0, domain = 0, bus = 0, slot = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&domain, cudaDevAttrPciDomainId, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus, cudaDevAttrPciBusId, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&slot, cudaDevAttrPciDeviceId, dev) != cudaSuccess)
    return 0;
  return 1 + (((uint64_t)domain << 32) | ((uint64_t)bus << 16) | (uint64_t)slot);
}

// Caps the blocks of every kernel so that the grids of all ranks on this GPU fit on it at once. Ranks that
// share a GPU (processes under MPS) run their kernels side by side, and a receive block that waits holds its
// SM until the senders it waits for have run: if the grids together need more blocks than the GPU keeps
// resident, a sender can sit in the queue behind the waiting receivers until their deadline (seen on the H200:
// 8 ranks of 20 blocks, one block an SM, waited 30 s). The one-kernel forms need their own grid resident too.
// After the creation barrier: every rank's key is stored.
int fit_blocks(epa2a_ll_layer* l, const uint64_t* gpu_key, const char* fn) {
  uint64_t mine = 0;
  EPA2A_CUDA(fn, cudaMemcpy(&mine, gpu_key, sizeof mine, cudaMemcpyDeviceToHost));
  int sharers = 0;
  for (int r = 0; r < l->ctx.W; ++r) {
    const void* peer = nvshmem_ptr(gpu_key, r);
    if (!peer) continue;  // not mapped here: another host's GPU
    uint64_t theirs = 0;
    EPA2A_CUDA(fn, cudaMemcpy(&theirs, peer, sizeof theirs, cudaMemcpyDeviceToHost));
    sharers += theirs == mine;
  }
  int dev = 0, sms = 0, per_sm = 0;
  EPA2A_CUDA(fn, cudaGetDevice(&dev));
  EPA2A_CUDA(fn, cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  EPA2A_CUDA(fn, epa2a::ll_blocks_per_sm(l->ctx, &per_sm));
  // One block an SM for all ranks together, although the registers allow two: on the H100 under MPS, with 8
  // ranks of 20 or 32 blocks (some SMs holding blocks of two ranks), about one run in three of 5000 1-token
  // replays ended with a receiver that never saw a signal the memory held; at 8 and 16 blocks (one an SM) none.
  const int fit = std::max(1, sms / std::max(sharers, 1));
  l->requested_blocks = l->blocks;
  l->blocks = std::min(l->blocks, fit);
  l->gpu_sharers = std::max(sharers, 1);
  l->resident_per_sm = per_sm;
  return EPA2A_OK;
}

// Checks a dispatch's arguments before anything is launched, then launches the send kernel (or, fused, the
// one-kernel send + receive).
int start_dispatch(epa2a_ll_layer* layer, const char* fn, const void* x, const int32_t* expert_ids,
                   const float* weights, int32_t num_tokens, int32_t format, void* stream, bool fused) {
  int rc = check(layer, fn);
  if (rc) return rc;
  epa2a_ll_layer* l = layer;
  if ((rc = expect_step(l, fn, LLStep::Idle))) return rc;
  epa2a::LLCtx& c = l->ctx;
  if (num_tokens < 0 || num_tokens > c.M)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "num_tokens = %d must be in [0, max_tokens = %d]", num_tokens,
                c.M);
  if (format < EPA2A_LL_FORMAT_BF16 || format > EPA2A_LL_FORMAT_FP8_POW2)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "format = %d must be EPA2A_LL_FORMAT_BF16, _FP8 or _FP8_POW2",
                format);
  if (format != EPA2A_LL_FORMAT_BF16 && c.H % epa2a::kLLGroup != 0)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "fp8 needs hidden to be a multiple of 128 (hidden = %d)",
                c.H);
  if (num_tokens > 0) {
    if (!x || !expert_ids) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "x and expert_ids must not be NULL");
    if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(expert_ids) % 4 != 0 ||
        reinterpret_cast<uintptr_t>(weights) % 4 != 0)
      return fail(EPA2A_ERR_INVALID_ARGUMENT, fn,
                  "x must be 16-byte aligned, expert_ids and weights 4-byte aligned");
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if ((rc = check_usable(l, fn, s))) return rc;
  c.n = num_tokens;
  c.format = format;
  c.x = static_cast<const char*>(x);
  c.ids = expert_ids;
  c.weights = weights;
  c.has_weights = weights != nullptr;
  const cudaError_t err = fused ? epa2a::ll_launch_dispatch_fused(c, l->blocks, s)
                                : epa2a::ll_launch_dispatch_send(c, l->blocks, s);
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "low-latency dispatch launch");
  l->step = fused ? LLStep::Dispatched : LLStep::DispatchSent;
  return EPA2A_OK;
}

}  // namespace

extern "C" {

EPA2A_API int epa2a_ll_layer_create(const epa2a_ll_config* config, epa2a_ll_layer** layer) {
  const char* fn = "epa2a_ll_layer_create";
  if (!epa2a::runtime_ready()) return fail(EPA2A_ERR_NOT_INITIALIZED, fn, "epa2a_init has not succeeded");
  if (!config || !layer) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "config and layer must not be NULL");
  *layer = nullptr;
  int rc = validate(*config, fn);
  if (rc) return rc;
  auto* l = new epa2a_ll_layer();
  l->cfg = *config;
  if (l->cfg.timeout_ns <= 0) l->cfg.timeout_ns = kDefaultTimeoutNs;
  l->blocks = config->num_sms > 0 ? config->num_sms : kDefaultBlocks;
  epa2a::LLCtx& c = l->ctx;
  c.W = config->world_size;
  c.E = config->num_experts;
  c.Epr = c.E / c.W;
  c.K = config->topk;
  c.H = config->hidden;
  c.M = config->max_tokens;
  c.me = config->rank;
  c.timeout_ns = l->cfg.timeout_ns;
  const size_t W = c.W, M = c.M, H = c.H, MK = M * c.K, Epr = c.Epr;
  const size_t groups = H % epa2a::kLLGroup == 0 ? H / epa2a::kLLGroup : 0;
  c.meta_stride = (int)(Epr + Epr * MK);
  const size_t rows = Epr * W * M;

  void* p = nullptr;
#define TRY(expr)      \
  if ((rc = (expr))) { \
    free_all(l);       \
    return rc;         \
  }
  TRY(alloc_sym(l, M * H * 2, &p, fn, "send rows"));
  c.send_x = static_cast<char*>(p);
  TRY(alloc_sym(l, M * groups * sizeof(float), &p, fn, "send scales"));
  c.send_scales = static_cast<float*>(p);
  TRY(alloc_sym(l, W * (size_t)c.meta_stride * sizeof(int), &p, fn, "routing meta"));
  c.meta = static_cast<int*>(p);
  TRY(alloc_sym(l, MK * sizeof(int), &p, fn, "landing rows"));
  c.pos = static_cast<int*>(p);
  TRY(alloc_sym(l, rows * H * 2, &p, fn, "combine send buffer"));
  c.comb = static_cast<char*>(p);
  TRY(alloc_sym(l, W * sizeof(uint64_t), &p, fn, "dispatch signals"));
  c.disp_sig = static_cast<uint64_t*>(p);
  TRY(alloc_sym(l, W * sizeof(uint64_t), &p, fn, "combine signals"));
  c.comb_sig = static_cast<uint64_t*>(p);
  TRY(alloc_sym(l, W * sizeof(uint64_t), &p, fn, "barrier signals"));
  c.bar_sig = static_cast<uint64_t*>(p);
  TRY(alloc_sym(l, sizeof(uint64_t), &p, fn, "GPU key"));
  uint64_t* const gpu_key = static_cast<uint64_t*>(p);
  TRY(alloc_dev(l, rows * H * 2, &p, fn));
  c.out_x = static_cast<char*>(p);
  TRY(alloc_dev(l, rows * groups * sizeof(float), &p, fn));
  c.out_scales = static_cast<float*>(p);
  TRY(alloc_dev(l, Epr * sizeof(int), &p, fn));
  c.rows = static_cast<int*>(p);
  TRY(alloc_dev(l, MK * sizeof(int), &p, fn));
  c.route = static_cast<int*>(p);
  TRY(alloc_dev(l, MK * sizeof(float), &p, fn));
  c.wts = static_cast<float*>(p);
  TRY(alloc_dev(l, epa2a::kLLEpochs * sizeof(uint64_t), &p, fn));
  c.dep = static_cast<uint64_t*>(p);
  TRY(alloc_dev(l, 2 * sizeof(unsigned), &p, fn));
  c.done = static_cast<unsigned*>(p);
  TRY(alloc_dev(l, 2 * sizeof(int), &p, fn));
  c.fatal = static_cast<int*>(p);
  c.claim = c.fatal + 1;
  TRY(alloc_dev(l, epa2a::kPeerKinds * W * sizeof(void*), &p, fn));
  c.peers = static_cast<void* const*>(p);
  auto host_mapped = [&](size_t bytes, void** hp, void** dp) -> int {
    EPA2A_CUDA(fn, cudaHostAlloc(hp, bytes, cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(*hp, 0, bytes);
    EPA2A_CUDA(fn, cudaHostGetDevicePointer(dp, *hp, 0));
    return EPA2A_OK;
  };
  void* dp = nullptr;
  TRY(host_mapped(sizeof(epa2a_status), reinterpret_cast<void**>(&l->h_status), &dp));
  c.status = static_cast<epa2a_status*>(dp);
  TRY(host_mapped(sizeof(int), reinterpret_cast<void**>(&l->h_abort), &dp));
  c.abort_flag = static_cast<const int*>(dp);
  // Peer pointers of every symmetric object, [kind][W].
  void* const mine[epa2a::kPeerKinds] = {c.meta, c.send_x,   c.send_scales, c.pos,
                                         c.comb, c.disp_sig, c.comb_sig,    c.bar_sig};
  std::vector<void*> tab(epa2a::kPeerKinds * W, nullptr);
  for (int kind = 0; kind < epa2a::kPeerKinds; ++kind) {
    for (int r = 0; r < c.W; ++r) {
      tab[kind * W + r] = nvshmem_ptr(mine[kind], r);
      if (!tab[kind * W + r]) {
        free_all(l);
        return fail(
            EPA2A_ERR_NVSHMEM, fn,
            "rank %d is not reachable by load/store (nvshmem_ptr returned NULL): the low-latency layer "
            "needs every rank on one NVLink domain",
            r);
      }
    }
  }
  auto init = [&]() -> int {
    EPA2A_CUDA(fn, cudaMemcpy(const_cast<void**>(c.peers), tab.data(), tab.size() * sizeof(void*),
                              cudaMemcpyHostToDevice));
    EPA2A_CUDA(fn, epa2a::ll_prepare_kernels(c.W, c.E, c.M * c.K));
    EPA2A_CUDA(fn, cudaMemset(c.rows, 0, Epr * sizeof(int)));
    const uint64_t key = this_gpu_key();
    if (!key) return fail(EPA2A_ERR_CUDA, fn, "could not read this GPU's PCI address");
    EPA2A_CUDA(fn, cudaMemcpy(gpu_key, &key, sizeof key, cudaMemcpyHostToDevice));
    return clear_state(l, fn);  // synchronizes the device: the key is stored before the barrier
  };
  TRY(init());
  nvshmem_barrier_all();  // no rank may signal another before that rank's signals are zeroed
  TRY(fit_blocks(l, gpu_key, fn));
#undef TRY
  *layer = l;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_destroy(epa2a_ll_layer* layer) {
  const char* fn = "epa2a_ll_layer_destroy";
  int rc = check(layer, fn);
  if (rc) return rc;
  cudaDeviceSynchronize();
  nvshmem_barrier_all();  // no peer still reads or writes this rank's buffers
  free_all(layer);
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_get_buffers(epa2a_ll_layer* layer, epa2a_ll_buffers* buffers) {
  const char* fn = "epa2a_ll_get_buffers";
  int rc = check(layer, fn);
  if (rc) return rc;
  if (!buffers) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "buffers is NULL");
  const epa2a::LLCtx& c = layer->ctx;
  buffers->tokens = c.out_x;
  buffers->scales = c.out_scales;
  buffers->rows_per_expert = c.rows;
  buffers->combine_input = c.comb;
  buffers->local_experts = c.Epr;
  buffers->expert_capacity = c.W * c.M;
  buffers->hidden = c.H;
  buffers->blocks = layer->blocks;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_set_timeout(epa2a_ll_layer* layer, int64_t timeout_ns) {
  int rc = check(layer, "epa2a_ll_layer_set_timeout");
  if (rc) return rc;
  layer->cfg.timeout_ns = timeout_ns > 0 ? timeout_ns : kDefaultTimeoutNs;
  layer->ctx.timeout_ns = layer->cfg.timeout_ns;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_abort(epa2a_ll_layer* layer) {
  if (!layer) return fail(EPA2A_ERR_INVALID_ARGUMENT, "epa2a_ll_layer_abort", "layer is NULL");
  *reinterpret_cast<volatile int*>(layer->h_abort) = 1;
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return EPA2A_OK;
}

// Diagnostic: this rank's epochs (dispatch, combine, barrier), arrival counters (dispatch, combine), then the
// dispatch, combine and barrier signals it holds from every rank. Synchronizes the device.
EPA2A_API int epa2a_ll_debug_epochs(epa2a_ll_layer* layer, uint64_t* out, int32_t capacity) {
  const char* fn = "epa2a_ll_debug_epochs";
  int rc = check(layer, fn);
  if (rc) return rc;
  const epa2a::LLCtx& c = layer->ctx;
  if (!out || capacity < 5 + 3 * c.W)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "out needs 5 + 3 * world_size");
  unsigned done[2] = {};
  EPA2A_CUDA(fn, cudaMemcpy(out, c.dep, 3 * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  EPA2A_CUDA(fn, cudaMemcpy(done, c.done, sizeof done, cudaMemcpyDeviceToHost));
  out[3] = done[0];
  out[4] = done[1];
  EPA2A_CUDA(fn, cudaMemcpy(out + 5, c.disp_sig, c.W * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  EPA2A_CUDA(fn, cudaMemcpy(out + 5 + c.W, c.comb_sig, c.W * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  EPA2A_CUDA(fn, cudaMemcpy(out + 5 + 2 * c.W, c.bar_sig, c.W * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_status(epa2a_ll_layer* layer, epa2a_status* status) {
  const char* fn = "epa2a_ll_layer_status";
  int rc = check(layer, fn);
  if (rc) return rc;
  if (!status) return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "status is NULL");
  *status = read_status(layer);
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_sync(epa2a_ll_layer* layer, void* stream) {
  const char* fn = "epa2a_ll_layer_sync";
  int rc = check(layer, fn);
  if (rc) return rc;
  EPA2A_CUDA(fn, cudaStreamSynchronize(static_cast<cudaStream_t>(stream)));
  const epa2a_status s = read_status(layer);
  if (s.code != EPA2A_OK) return ll_status_fail(s, fn);
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_reset(epa2a_ll_layer* layer) {
  const char* fn = "epa2a_ll_layer_reset";
  int rc = check(layer, fn);
  if (rc) return rc;
  EPA2A_CUDA(fn, cudaDeviceSynchronize());
  nvshmem_barrier_all();  // every rank's kernels have ended: no signal is in flight
  if ((rc = clear_state(layer, fn))) return rc;
  nvshmem_barrier_all();
  return EPA2A_OK;
}

EPA2A_API int epa2a_noop_kernel(void* stream) {
  const cudaError_t err = epa2a::launch_noop(static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, "epa2a_noop_kernel", "empty kernel launch");
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_layer_barrier(epa2a_ll_layer* layer, void* stream) {
  const char* fn = "epa2a_ll_layer_barrier";
  int rc = check(layer, fn);
  if (rc) return rc;
  const cudaError_t err = epa2a::ll_launch_barrier(layer->ctx, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "ll_barrier launch");
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_dispatch_send(epa2a_ll_layer* layer, const void* x, const int32_t* expert_ids,
                                     const float* weights, int32_t num_tokens, int32_t format, void* stream) {
  return start_dispatch(layer, "epa2a_ll_dispatch_send", x, expert_ids, weights, num_tokens, format, stream,
                        false);
}

EPA2A_API int epa2a_ll_dispatch(epa2a_ll_layer* layer, const void* x, const int32_t* expert_ids,
                                const float* weights, int32_t num_tokens, int32_t format, void* stream) {
  return start_dispatch(layer, "epa2a_ll_dispatch", x, expert_ids, weights, num_tokens, format, stream, true);
}

EPA2A_API int epa2a_ll_combine(epa2a_ll_layer* layer, const void* expert_output, void* out, int32_t weighted,
                               void* stream) {
  const char* fn = "epa2a_ll_combine";
  int rc = check(layer, fn);
  if (rc) return rc;
  if ((rc = expect_step(layer, fn, LLStep::Dispatched))) return rc;
  const epa2a::LLCtx& c = layer->ctx;
  if (expert_output == c.comb) expert_output = nullptr;
  if (reinterpret_cast<uintptr_t>(expert_output) % 16 != 0)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "expert_output must be 16-byte aligned");
  if (c.n > 0 && (!out || reinterpret_cast<uintptr_t>(out) % 16 != 0))
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "out must be a 16-byte aligned device pointer");
  if (weighted && !c.has_weights)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "a weighted combine needs routing weights at dispatch");
  const cudaError_t err = epa2a::ll_launch_combine_fused(c, expert_output, out, weighted ? 1 : 0,
                                                         layer->blocks, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "ll_combine (fused) launch");
  layer->step = LLStep::Idle;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_dispatch_recv(epa2a_ll_layer* layer, void* stream) {
  const char* fn = "epa2a_ll_dispatch_recv";
  int rc = check(layer, fn);
  if (rc) return rc;
  if ((rc = expect_step(layer, fn, LLStep::DispatchSent))) return rc;
  const cudaError_t err =
      epa2a::ll_launch_dispatch_recv(layer->ctx, layer->blocks, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "ll_dispatch_recv launch");
  layer->step = LLStep::Dispatched;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_combine_send(epa2a_ll_layer* layer, const void* expert_output, void* stream) {
  const char* fn = "epa2a_ll_combine_send";
  int rc = check(layer, fn);
  if (rc) return rc;
  if ((rc = expect_step(layer, fn, LLStep::Dispatched))) return rc;
  const epa2a::LLCtx& c = layer->ctx;
  if (expert_output == c.comb) expert_output = nullptr;  // the experts wrote the send buffer itself
  if (reinterpret_cast<uintptr_t>(expert_output) % 16 != 0)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "expert_output must be 16-byte aligned");
  const cudaError_t err =
      epa2a::ll_launch_combine_send(c, expert_output, layer->blocks, static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "ll_combine_send launch");
  layer->step = LLStep::CombineSent;
  return EPA2A_OK;
}

EPA2A_API int epa2a_ll_combine_recv(epa2a_ll_layer* layer, void* out, int32_t weighted, void* stream) {
  const char* fn = "epa2a_ll_combine_recv";
  int rc = check(layer, fn);
  if (rc) return rc;
  if ((rc = expect_step(layer, fn, LLStep::CombineSent))) return rc;
  const epa2a::LLCtx& c = layer->ctx;
  if (c.n > 0 && (!out || reinterpret_cast<uintptr_t>(out) % 16 != 0))
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "out must be a 16-byte aligned device pointer");
  if (weighted && !c.has_weights)
    return fail(EPA2A_ERR_INVALID_ARGUMENT, fn, "a weighted combine needs routing weights at dispatch");
  const cudaError_t err = epa2a::ll_launch_combine_recv(c, out, weighted ? 1 : 0, layer->blocks,
                                                        static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return epa2a::cuda_fail(err, fn, "ll_combine_recv launch");
  layer->step = LLStep::Idle;
  return EPA2A_OK;
}

}  // extern "C"
