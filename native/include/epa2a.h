/*
 * EpA2A native data plane: a flat C ABI over CUDA and NVSHMEM.
 *
 * Every function returns an int status (EPA2A_OK = 0). On failure, epa2a_last_error() returns a message that
 * names the call and the cause; it is per thread and valid until the next failing call on that thread.
 * Streams and events are opaque pointers (cudaStream_t / cudaEvent_t); a NULL stream is the legacy default.
 *
 * Flow of one step (every rank, in the same order):
 *   epa2a_dispatch_prepare   count, exchange counts, offsets, deterministic row assignment (device)
 *   epa2a_dispatch_wait_sizes  host polls the pinned receive sizes with a deadline
 *   [epa2a_layer_grow_output]  collective, only when the largest receive size exceeds the buffers
 *   epa2a_dispatch_send      tokens to their rows (intra: peer stores; inter: one put per token per node)
 *   epa2a_dispatch_finish    barrier with the peers that write here, local expansion, padding
 *   ... experts run on buffers.output rows [0, recv_rows) ...
 *   epa2a_combine            fp32 sum of each token's rows, one rounding
 * Every device wait on a peer has a deadline (config.timeout_ns) and observes epa2a_layer_abort(); a failed
 * wait records an epa2a_status naming the peer and the signal, and the kernels return instead of hanging.
 */
#ifndef EPA2A_H_
#define EPA2A_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define EPA2A_API __attribute__((visibility("default")))
#else
#define EPA2A_API
#endif

#define EPA2A_VERSION_MAJOR 0
#define EPA2A_VERSION_MINOR 3

/* Status codes. */
#define EPA2A_OK 0
#define EPA2A_ERR_INVALID_ARGUMENT 1
#define EPA2A_ERR_CUDA 2
#define EPA2A_ERR_NVSHMEM 3
#define EPA2A_ERR_NOT_INITIALIZED 4
#define EPA2A_ERR_STATE 5         /* call out of order, or the layer failed and needs epa2a_layer_reset */
#define EPA2A_ERR_CAPACITY 6      /* receive rows exceed the output buffers: grow them (collective) */
#define EPA2A_ERR_TIMEOUT 7       /* a device wait or a host poll passed its deadline */
#define EPA2A_ERR_ABORTED 8       /* epa2a_layer_abort was called while a kernel waited */
#define EPA2A_ERR_BAD_EXPERT_ID 9 /* an expert id outside [0, num_experts] (the entry was dropped) */
#define EPA2A_ERR_BAD_SCATTER_INDEX 10 /* a scatter index outside the destination rank's rows */
#define EPA2A_ERR_BAD_ROW 11           /* an internal row index failed its bounds check */
#define EPA2A_ERR_PEER_REJECTED \
  12 /* a peer rejected its input for this step (epa2a_dispatch_reject,
                                          epa2a_combine_reject; peer: the rank); not fatal: no reset needed */

/* Where a device error was recorded (epa2a_status.phase). */
#define EPA2A_PHASE_NONE 0
#define EPA2A_PHASE_COUNT 1          /* bincount of expert ids */
#define EPA2A_PHASE_EXCHANGE 2       /* waiting for a peer's per-expert counts */
#define EPA2A_PHASE_ASSIGN 3         /* row assignment */
#define EPA2A_PHASE_DISPATCH 4       /* sending tokens */
#define EPA2A_PHASE_FORWARD 5        /* inter-node: waiting for a token put from another node */
#define EPA2A_PHASE_BARRIER 6        /* a layer barrier (index = barrier slot) */
#define EPA2A_PHASE_EXPAND 7         /* local-combine expansion and padding */
#define EPA2A_PHASE_COMBINE 8        /* intra-node combine */
#define EPA2A_PHASE_COMBINE_REMOTE 9 /* inter-node: waiting for a partial sum from another node */

/* Barrier slots (epa2a_status.index when phase is EPA2A_PHASE_BARRIER). */
#define EPA2A_SLOT_COUNTS 0
#define EPA2A_SLOT_DISPATCH_DONE 1
#define EPA2A_SLOT_COMBINE_READY 2
#define EPA2A_SLOT_BARRIER_ALL 3
#define EPA2A_SLOT_BARRIER_NODE 4
#define EPA2A_SLOT_LIFECYCLE 5 /* a life-cycle barrier of grow or reset (host record; peer: the rank) */

/* Token element types. */
#define EPA2A_TOKEN_BF16 0
#define EPA2A_TOKEN_FP16 1
#define EPA2A_TOKEN_FP32 2

/* epa2a_layer_config.version: changes whenever the struct does (1: size and version first, 0.2). */
#define EPA2A_LAYER_CONFIG_VERSION 1

/* One layer configuration; the same on every rank except rank. 72 bytes, no implicit padding. size and version
 * come first and are checked before any other field is read: a caller built against another header fails with
 * an error naming both versions instead of being read with the wrong layout. */
typedef struct epa2a_layer_config {
  int32_t size;                 /* sizeof(epa2a_layer_config) */
  int32_t version;              /* EPA2A_LAYER_CONFIG_VERSION */
  int64_t timeout_ns;           /* deadline of every device wait on a peer; <= 0 selects 10 s */
  int32_t max_tokens;           /* tokens one rank dispatches per step, at most */
  int32_t hidden;               /* elements per token row */
  int32_t topk;                 /* experts per token, 1..32 */
  int32_t num_experts;          /* total; a multiple of world_size; an id equal to it marks a dropped slot */
  int32_t rank;                 /* this rank = the NVSHMEM PE */
  int32_t world_size;           /* ranks = NVSHMEM PEs */
  int32_t local_world_size;     /* ranks per node; divides world_size; < world_size: inter-node algorithm */
  int32_t token_bytes;          /* 2 or 4; must match token_type */
  int32_t token_type;           /* EPA2A_TOKEN_* */
  int32_t num_sms;              /* blocks of the token kernels */
  int32_t enable_local_combine; /* 0/1; single node only */
  int32_t expert_alignment;     /* each local expert's rows start at a multiple of it (power of two) */
  int32_t capacity;             /* initial output rows = capacity * max_tokens * topk (+ alignment padding) */
  int32_t flags;                /* EPA2A_LAYER_* bits, else 0 */
} epa2a_layer_config;

/* epa2a_layer_config.flags: the output rows are fixed at creation (capacity * max_tokens * topk + padding;
 * capacity = world_size is the true worst case) and never grow. A step then needs no host wait:
 * epa2a_dispatch_enqueue + epa2a_combine only enqueue work, so they can be captured in a CUDA graph. A step
 * whose largest receive exceeds the rows fails on every rank together with EPA2A_ERR_CAPACITY (reset needed). */
#define EPA2A_LAYER_FIXED_CAPACITY 1

/* A device error record (host-visible, written by the first failing device thread). 48 bytes. */
typedef struct epa2a_status {
  int32_t code;      /* EPA2A_OK when nothing failed */
  int32_t phase;     /* EPA2A_PHASE_* */
  int32_t rank;      /* the rank that recorded it */
  int32_t peer;      /* the peer rank waited for, or -1 */
  int32_t index;     /* token / entry / barrier slot, or -1 */
  int32_t value;     /* the offending value (bad id, row), or -1 */
  int64_t expected;  /* the signal value waited for */
  int64_t observed;  /* the signal value seen at the deadline */
  int64_t waited_ns; /* how long the wait lasted */
} epa2a_status;

/* Device pointers owned by a layer. Valid until the next epa2a_layer_grow_output / destroy. */
typedef struct epa2a_layer_buffers {
  void* output;          /* symmetric [output_rows, hidden] tokens: dispatch output and combine input */
  float* weights;        /* symmetric [output_rows]: routing weight of each row (1 when none; 0 padding) */
  int32_t* row_origin;   /* symmetric [output_rows][4]: source rank, source token, k, next row of the same
                            token on this rank (local combine) or -1; all -1 for padding rows */
  int32_t* scatter_rows; /* [max_tokens * topk]: global row of each (token, k) of this rank, -1 dropped */
  int32_t output_rows;   /* rows the symmetric buffers hold */
  int32_t reserved;
} epa2a_layer_buffers;

typedef struct epa2a_layer epa2a_layer;

EPA2A_API const char* epa2a_last_error(void);
EPA2A_API int epa2a_version(int32_t* major, int32_t* minor);

/* ---- runtime ---- */
EPA2A_API int epa2a_device_count(int32_t* count);
/* Makes device the calling thread's current CUDA device (for calls from a thread other than the one that ran
 * epa2a_init). */
EPA2A_API int epa2a_use_device(int32_t device);
EPA2A_API int epa2a_uid_size(int32_t* bytes);
/* Rank 0 only: writes a fresh NVSHMEM unique id of epa2a_uid_size bytes. */
EPA2A_API int epa2a_uid_create(void* uid, int32_t bytes);
/* Collective: selects the CUDA device, then joins the NVSHMEM job described by the unique id. */
EPA2A_API int epa2a_init(const void* uid, int32_t bytes, int32_t rank, int32_t world_size,
                         int32_t cuda_device);
EPA2A_API int epa2a_finalize(void);
EPA2A_API int epa2a_rank(int32_t* rank, int32_t* world_size);
EPA2A_API int epa2a_sym_malloc(size_t bytes, void** ptr); /* collective */
EPA2A_API int epa2a_sym_free(void* ptr);                  /* collective */
/* A load/store pointer to the peer's copy of a symmetric object; NULL when the peer is not reachable. */
EPA2A_API int epa2a_sym_peer_ptr(void* ptr, int32_t peer, void** peer_ptr);
/* NVSHMEM barriers on a stream (no deadline: for setup; layers use epa2a_layer_barrier). */
EPA2A_API int epa2a_barrier_all(void* stream);
EPA2A_API int epa2a_barrier_node(void* stream);
/* Deadline of the collective barriers in layer create, destroy, grow and reset and in epa2a_finalize: a rank
 * missing there makes the others fail with EPA2A_ERR_TIMEOUT naming it. <= 0 selects the default: 60 s, or
 * EPA2A_COLLECTIVE_TIMEOUT_MS from the environment at epa2a_init. */
EPA2A_API int epa2a_set_collective_timeout(int64_t timeout_ns);
EPA2A_API int epa2a_stream_create(void** stream);
EPA2A_API int epa2a_stream_destroy(void* stream);
EPA2A_API int epa2a_stream_sync(void* stream);
EPA2A_API int epa2a_event_create(void** event);
EPA2A_API int epa2a_event_record(void* event, void* stream);
EPA2A_API int epa2a_event_sync(void* event);
EPA2A_API int epa2a_event_elapsed_ms(void* start, void* end, float* ms);
EPA2A_API int epa2a_event_destroy(void* event);
EPA2A_API int epa2a_memcpy_async(void* dst, const void* src, size_t bytes, void* stream);
EPA2A_API int epa2a_memset_async(void* dst, int32_t byte_value, size_t bytes, void* stream);
EPA2A_API int epa2a_host_alloc_pinned(size_t bytes, void** ptr);
EPA2A_API int epa2a_host_free_pinned(void* ptr);
EPA2A_API int epa2a_device_alloc(size_t bytes, void** ptr);
EPA2A_API int epa2a_device_free(void* ptr);
EPA2A_API int epa2a_device_sync(void);

/* ---- layer ---- */
/* Collective. Local allocations come first; a rank that fails there tells the others at the first barrier. */
EPA2A_API int epa2a_layer_create(const epa2a_layer_config* config, epa2a_layer** layer);
/* Collective; always releases the layer. When the barrier fails (a rank missing) or the CUDA context is dead
 * (a sticky error such as cudaErrorIllegalAddress), the symmetric buffers are not freed (that is collective:
 * they go with the process), the rest is, and the error says so. */
EPA2A_API int epa2a_layer_destroy(epa2a_layer* layer);
EPA2A_API int epa2a_layer_get_buffers(epa2a_layer* layer, epa2a_layer_buffers* buffers);
/* Collective: every rank passes the same rows (the maximum receive size over ranks). */
EPA2A_API int epa2a_layer_grow_output(epa2a_layer* layer, int32_t rows);
EPA2A_API int epa2a_layer_set_timeout(epa2a_layer* layer, int64_t timeout_ns);
/* Makes every device wait of this layer give up now (thread-safe; host-mapped flag). */
EPA2A_API int epa2a_layer_abort(epa2a_layer* layer);
EPA2A_API int epa2a_layer_status(epa2a_layer* layer, epa2a_status* status);
/* Synchronizes the stream, then returns the recorded device error (if any) as a status + message. */
EPA2A_API int epa2a_layer_sync(epa2a_layer* layer, void* stream);
/* Collective: after a failed step, clears signals, status and abort flag on every rank. */
EPA2A_API int epa2a_layer_reset(epa2a_layer* layer);
/* Barrier with a deadline among all ranks, or among the ranks of this node. */
EPA2A_API int epa2a_layer_barrier(epa2a_layer* layer, int32_t intra_node_only, void* stream);

/* ---- dispatch / combine ---- */
/* tokens [n, hidden], expert_ids [n, topk] (int32), weights [n, topk] fp32 or NULL, scatter_indices [n, topk]
 * (int32 global rows) or NULL. All device pointers; tokens must stay valid until dispatch_send has run. */
EPA2A_API int epa2a_dispatch_prepare(epa2a_layer* layer, const void* tokens, const int32_t* expert_ids,
                                     const float* weights, const int32_t* scatter_indices, int32_t num_tokens,
                                     void* stream);
/* Polls the pinned receive sizes (no stream sync) until every rank's is known, a device error is recorded,
 * or timeout_ns passes (then the layer is aborted). max_recv_rows: the largest receive size over ranks. */
EPA2A_API int epa2a_dispatch_wait_sizes(epa2a_layer* layer, int64_t timeout_ns, int32_t* max_recv_rows);
/* After wait_sizes. Any pointer may be NULL. Arrays: [world], [world], [experts per rank] x 3. */
EPA2A_API int epa2a_dispatch_get_layout(epa2a_layer* layer, int32_t* recv_rows_per_rank,
                                        int32_t* tokens_per_rank, int32_t* rows_per_local_expert,
                                        int32_t* padded_rows_per_local_expert, int32_t* expert_row_starts);
EPA2A_API int epa2a_dispatch_send(epa2a_layer* layer, void* stream);
EPA2A_API int epa2a_dispatch_finish(epa2a_layer* layer, void* stream);
/* Fixed-capacity layers only: prepare + send + finish, enqueued without any host wait (capturable). The layout
 * (epa2a_dispatch_get_layout) is valid once the stream has been synchronized. The captured graph replays the
 * same pointers and num_tokens. */
EPA2A_API int epa2a_dispatch_enqueue(epa2a_layer* layer, const void* tokens, const int32_t* expert_ids,
                                     const float* weights, const int32_t* scatter_indices, int32_t num_tokens,
                                     void* stream);
/* This rank rejected its input for the coming dispatch (the caller's check failed): takes part in the counts
 * exchange with no tokens and a rejection mark instead of dispatching, so that every rank's
 * epa2a_dispatch_wait_sizes fails at once with EPA2A_ERR_PEER_REJECTED naming the lowest rejecting rank. Nothing is
 * sent; every rank is ready for the next dispatch with no reset. Enqueues only. (Fixed capacity: the peers' record
 * is fatal, since no host stops their send, and they need epa2a_layer_reset.) */
EPA2A_API int epa2a_dispatch_reject(epa2a_layer* layer, void* stream);
/* After a dispatch, this rank rejected its combine input: marks the rejection on every rank, then takes part in the
 * combine's barrier (and, across nodes, sends its proxy partials) without writing its own output. A rank of this node
 * fails with EPA2A_ERR_PEER_REJECTED naming it (epa2a_layer_sync) and does not write its output; a rank of another
 * node fails so when any of its tokens went through this node (otherwise its result does not depend on this rank).
 * Not fatal: every rank is ready for the next dispatch with no reset. Enqueues only. */
EPA2A_API int epa2a_combine_reject(epa2a_layer* layer, void* stream);
/* expert_output [recv_rows, hidden] device rows, or NULL when they are already in buffers.output.
 * out [num_tokens, hidden]. weighted: multiply each row by its routing weight (needs weights at dispatch). */
EPA2A_API int epa2a_combine(epa2a_layer* layer, const void* expert_output, void* out, int32_t weighted,
                            void* stream);

/* ---- CUDA graphs of enqueued steps (fixed-capacity layers) ---- */
/* Starts a thread-local capture on stream (a created stream, not the legacy default). */
EPA2A_API int epa2a_graph_begin(void* stream);
/* Ends the capture and instantiates it. */
EPA2A_API int epa2a_graph_end(void* stream, void** graph_exec);
EPA2A_API int epa2a_graph_launch(void* graph_exec, void* stream);
EPA2A_API int epa2a_graph_destroy(void* graph_exec);
/* Free and total device memory of the current device (cudaMemGetInfo). */
EPA2A_API int epa2a_mem_info(size_t* free_bytes, size_t* total_bytes);

/* ---- low-latency layer (decode: 1-256 tokens a rank) ----
 * A second layer object beside epa2a_layer, intra-node only (every rank reachable by load/store). Capacity is
 * fixed at creation (max_tokens a rank) and every buffer is allocated once. Per rank R (Epr = num_experts /
 * world_size local experts, M = max_tokens, W = world_size):
 *   tokens          [Epr, W*M, hidden]        bf16, or fp8 e4m3 bytes (row stride hidden bytes)
 *   scales          [Epr, W*M, hidden/128]    fp32, fp8 only: one scale per 128 channels of a row
 *   rows_per_expert [Epr]                     int32 rows received per local expert
 *   combine_input   [Epr, W*M, hidden]        bf16, symmetric: the combine's send buffer (zero-copy target)
 * Inside local expert j's block the rows are compact from row 0, ordered by (source rank, source token, k);
 * rows past rows_per_expert[j] are not written. No atomic decides a position.
 * A step, in this order on every rank (one stream; each call only enqueues, none waits on the host):
 *   epa2a_ll_dispatch_send   quantize (or copy) the tokens, route, announce to every rank      (1 kernel)
 *   epa2a_ll_dispatch_recv   wait for every rank, pull the rows into the compact layout       (1 kernel)
 *   ... experts read tokens/scales, write combine_input (or their own buffer) ...
 *   epa2a_ll_combine_send    copy expert rows into combine_input (skipped for NULL), announce (1 kernel)
 *   epa2a_ll_combine_recv    wait for every rank, pull each token's rows, weight, fp32 sum, round once
 * Each call can be captured in a CUDA graph (epochs live in device memory). Every device wait has the layer's
 * deadline and observes epa2a_ll_layer_abort; a failure is reported by epa2a_ll_layer_sync / _status. */
#define EPA2A_LL_CONFIG_VERSION 1

/* Token formats of a low-latency dispatch. */
#define EPA2A_LL_FORMAT_BF16 0
#define EPA2A_LL_FORMAT_FP8 1      /* e4m3, scale = amax / 448 per 128 channels (1 when amax = 0) */
#define EPA2A_LL_FORMAT_FP8_POW2 2 /* e4m3, scale = the smallest power of two >= amax / 448 (UE8M0) */

/* Where a low-latency device error was recorded (epa2a_status.phase). */
#define EPA2A_PHASE_LL_DISPATCH_SEND 20 /* routing a low-latency dispatch (bad expert id) */
#define EPA2A_PHASE_LL_DISPATCH_RECV 21 /* waiting for a peer's low-latency dispatch */
#define EPA2A_PHASE_LL_COMBINE_RECV 22  /* waiting for a peer's low-latency combine */
#define EPA2A_PHASE_LL_BARRIER 23       /* waiting at the low-latency layer's barrier */

/* The same on every rank except rank. 56 bytes, no implicit padding. */
typedef struct epa2a_ll_config {
  int32_t size;             /* sizeof(epa2a_ll_config) */
  int32_t version;          /* EPA2A_LL_CONFIG_VERSION */
  int64_t timeout_ns;       /* deadline of every device wait on a peer; <= 0 selects 10 s */
  int32_t max_tokens;       /* tokens one rank dispatches per step, at most */
  int32_t hidden;           /* bf16 elements per token; a multiple of 8 (of 128 for fp8) */
  int32_t topk;             /* experts per token, 1..32 */
  int32_t num_experts;      /* a multiple of world_size; an id equal to it marks a dropped slot */
  int32_t rank;             /* this rank = the NVSHMEM PE */
  int32_t world_size;       /* ranks = NVSHMEM PEs, at most 32 */
  int32_t local_world_size; /* must equal world_size: the low-latency layer is intra-node */
  int32_t num_sms;          /* SM budget: blocks of each kernel; <= 0 selects 16. Capped at creation so that
                               the grids of every rank on this GPU are resident at once
                               (epa2a_ll_buffers.blocks) */
  int32_t flags;            /* 0 */
  int32_t reserved;         /* 0 */
} epa2a_ll_config;

/* Device pointers owned by a low-latency layer, valid until it is destroyed. */
typedef struct epa2a_ll_buffers {
  void* tokens;             /* [local_experts, expert_capacity, hidden] bf16 or fp8 bytes */
  float* scales;            /* [local_experts, expert_capacity, hidden / 128] fp32 (fp8 dispatches) */
  int32_t* rows_per_expert; /* [local_experts] */
  void* combine_input;      /* symmetric [local_experts, expert_capacity, hidden] bf16 */
  int32_t local_experts;    /* num_experts / world_size */
  int32_t expert_capacity;  /* world_size * max_tokens rows a local expert */
  int32_t hidden;
  int32_t blocks; /* of every kernel: num_sms, capped so that the grids of all ranks on this GPU
                    fit at once */
} epa2a_ll_buffers;

typedef struct epa2a_ll_layer epa2a_ll_layer;

EPA2A_API int epa2a_ll_layer_create(const epa2a_ll_config* config, epa2a_ll_layer** layer); /* collective */
EPA2A_API int epa2a_ll_layer_destroy(epa2a_ll_layer* layer);                                /* collective */
EPA2A_API int epa2a_ll_get_buffers(epa2a_ll_layer* layer, epa2a_ll_buffers* buffers);
EPA2A_API int epa2a_ll_layer_set_timeout(epa2a_ll_layer* layer, int64_t timeout_ns);
/* Makes every device wait of this layer give up now (thread-safe; host-mapped flag). */
EPA2A_API int epa2a_ll_layer_abort(epa2a_ll_layer* layer);
/* Diagnostic: epochs, arrival counters and held signals (5 + 3 * world_size values); synchronizes the device. */
EPA2A_API int epa2a_ll_debug_epochs(epa2a_ll_layer* layer, uint64_t* out, int32_t capacity);
EPA2A_API int epa2a_ll_layer_status(epa2a_ll_layer* layer, epa2a_status* status);
/* Synchronizes the stream, then returns the recorded device error (if any) as a status + message. */
EPA2A_API int epa2a_ll_layer_sync(epa2a_ll_layer* layer, void* stream);
/* Collective: after a failed step, clears signals, epochs, status and abort flag on every rank. */
EPA2A_API int epa2a_ll_layer_reset(epa2a_ll_layer* layer);
/* Launches one empty kernel on stream (times the launch path alone, e.g. inside a CUDA graph). */
EPA2A_API int epa2a_noop_kernel(void* stream);
/* A barrier of all ranks on the device with the layer's deadline (enqueued; capturable); touches no step state. */
EPA2A_API int epa2a_ll_layer_barrier(epa2a_ll_layer* layer, void* stream);
/* x [n, hidden] bf16, expert_ids [n, topk] int32, weights [n, topk] fp32 or NULL (then every weight is 1);
 * device pointers, 16-byte aligned, read by this call's kernel only. 0 <= n <= max_tokens; format
 * EPA2A_LL_FORMAT_*. An id outside [0, num_experts] is dropped and recorded as EPA2A_ERR_BAD_EXPERT_ID. */
EPA2A_API int epa2a_ll_dispatch_send(epa2a_ll_layer* layer, const void* x, const int32_t* expert_ids,
                                     const float* weights, int32_t num_tokens, int32_t format, void* stream);
EPA2A_API int epa2a_ll_dispatch_recv(epa2a_ll_layer* layer, void* stream);
/* expert_output [local_experts, expert_capacity, hidden] bf16 device rows (only rows < rows_per_expert are
 * read), or NULL when the experts wrote combine_input themselves (zero-copy). */
EPA2A_API int epa2a_ll_combine_send(epa2a_ll_layer* layer, const void* expert_output, void* stream);
/* out [n, hidden] bf16 (n of the latest dispatch); weighted: multiply each row by its routing weight. */
EPA2A_API int epa2a_ll_combine_recv(epa2a_ll_layer* layer, void* out, int32_t weighted, void* stream);
/* One-kernel forms (send and receive in one launch, one launch less a phase; no compute can overlap the exchange):
 * epa2a_ll_dispatch = dispatch_send + dispatch_recv, epa2a_ll_combine = combine_send + combine_recv, same arguments.
 * Each needs all its blocks resident at once (epa2a_ll_buffers.blocks blocks of 256 threads a rank: the layer caps
 * num_sms so that they are, for every rank on the GPU). */
EPA2A_API int epa2a_ll_dispatch(epa2a_ll_layer* layer, const void* x, const int32_t* expert_ids,
                                const float* weights, int32_t num_tokens, int32_t format, void* stream);
EPA2A_API int epa2a_ll_combine(epa2a_ll_layer* layer, const void* expert_output, void* out, int32_t weighted,
                               void* stream);

#ifdef __cplusplus
}
#endif

#endif /* EPA2A_H_ */
