// Multi-process smoke test of the low-latency layer: W rank processes (fork) on the GPU(s), NVSHMEM
// bootstrapped by a unique id through a file. Every checked step draws fresh seeded inputs, poisons the
// outputs, and compares with the CPU model in ll_reference.cpp: received rows bit for bit (bf16, fp8 +
// scales), rows per expert exact, rows past them untouched, and the combine within one bf16 rounding. Timed
// cases replay CUDA graphs of the split phases and print median and p99.
//   epa2a_ll_smoke [groups=2,4,8] [seed=42] [case-name filter] [timed iterations=1000]
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "epa2a.h"
#include "ll_reference.h"
#include "rank_process.h"

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define CK(call)                                                                             \
  do {                                                                                       \
    int rc_ = (call);                                                                        \
    if (rc_ != EPA2A_OK)                                                                     \
      throw Failure(std::string(#call).substr(0, 48) + " -> " + std::to_string(rc_) + ": " + \
                    epa2a_last_error());                                                     \
  } while (0)

#define EXPECT(cond, ...)                    \
  do {                                       \
    if (!(cond)) {                           \
      char b_[600];                          \
      snprintf(b_, sizeof(b_), __VA_ARGS__); \
      throw Failure(b_);                     \
    }                                        \
  } while (0)

using Clock = std::chrono::steady_clock;

struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(size_t bytes) { CK(epa2a_device_alloc(bytes ? bytes : 16, &p)); }
  ~DevBuf() {
    if (p) epa2a_device_free(p);
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
};

void copy_sync(void* dst, const void* src, size_t bytes, void* stream) {
  if (!bytes) return;
  CK(epa2a_memcpy_async(dst, src, bytes, stream));
  CK(epa2a_stream_sync(stream));
}

bool file_exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

void touch(const std::string& p) {
  std::ofstream(p) << "1\n";
}

enum class Kind { Check, Fault, BadInput, Timed };

// What a timed case measures, each after a device barrier of all ranks (graph replays, CUDA events on the
// stream).
constexpr int kPhases = 12;
const char* const kPhaseNames[kPhases] = {"dispatch fp8 (send+recv)",
                                          "dispatch bf16 (send+recv)",
                                          "combine zero-copy (send+recv)",
                                          "combine copy (send+recv)",
                                          "(a) empty kernel",
                                          "(b) LL barrier alone",
                                          "(c) fp8 dispatch send only",
                                          "(d) fp8 send, recv: 2 graphs",
                                          "(e) combine send only (zero-copy)",
                                          "(f) combine send, recv: 2 graphs",
                                          "(g) fp8 dispatch, one kernel",
                                          "(h) combine zero-copy, one kernel"};

struct Case {
  std::string name;
  Kind kind = Kind::Check;
  llref::Shape shape;
  int format = EPA2A_LL_FORMAT_BF16;
  bool weighted = true, zero_copy = false, skew = false, graph = false;
  double drop = 0.1;
  int bad_rank = -1;   // that rank sends one id outside [0, E]
  bool fused = false;  // the one-kernel epa2a_ll_dispatch / epa2a_ll_combine
  bool pile = false;   // every slot of every token lists expert 0: it overflows its W*M rows on rank 0
  int steps = 3;       // checked steps, fresh inputs each
  int fixed_n = -1;    // Timed: tokens per rank
  int64_t timeout_ns = 5000000000LL;
  uint64_t seed = 1;
};

struct Result {
  std::string name;
  bool pass = false;
  std::string msg;
  // Timed: microseconds [dispatch fp8, dispatch bf16, combine zero-copy, combine copy] x [median, p99]
  double us[kPhases][2] = {};
  double bytes[kPhases] = {};  // bytes read + written on this rank by each timed phase
};

std::vector<Case> cases_for(int W, uint64_t seed, int timed_iters) {
  std::vector<Case> v;
  const char* filter = std::getenv("EPA2A_LL_FILTER");
  int index = 0;
  auto add = [&](Case c) {
    const int my = index++;
    if (filter && c.name.find(filter) == std::string::npos) return;
    c.shape.W = W;
    c.seed = seed * 7919 + my;
    v.push_back(c);
  };
  auto shape = [&](int E, int K, int H, int M) {
    llref::Shape s;
    s.W = W, s.E = E, s.K = K, s.H = H, s.M = M;
    return s;
  };
  Case c;
  c = {};
  c.name = "bf16 weighted";
  c.shape = shape(4 * W, 4, 512, 48);
  add(c);
  c = {};
  c.name = "fp8 weighted";
  c.format = EPA2A_LL_FORMAT_FP8;
  c.shape = shape(8 * W, 6, 1024, 40);
  add(c);
  c = {};
  c.name = "fp8 pow2 plain zero-copy";
  c.format = EPA2A_LL_FORMAT_FP8_POW2;
  c.weighted = false, c.zero_copy = true;
  c.shape = shape(8 * W, 8, 768, 32);
  add(c);
  c = {};
  c.name = "bf16 skewed hidden=200 graph";
  c.skew = true, c.graph = true, c.drop = 0.3;
  c.shape = shape(3 * W, 3, 200, 64);
  add(c);
  c = {};
  c.name = "fp8 graph replay zero-copy";
  c.format = EPA2A_LL_FORMAT_FP8;
  c.graph = true, c.zero_copy = true;
  c.shape = shape(4 * W, 8, 2048, 16);
  add(c);
  c = {};
  c.name = "fp8 one-kernel dispatch+combine";
  c.format = EPA2A_LL_FORMAT_FP8, c.fused = true;
  c.shape = shape(8 * W, 8, 1024, 32);
  add(c);
  c = {};
  c.name = "bf16 one-kernel graph zero-copy";
  c.fused = true, c.graph = true, c.zero_copy = true;
  c.shape = shape(4 * W, 4, 512, 24);
  add(c);
  c = {};
  c.name = "bad expert id on rank 1";
  c.bad_rank = 1, c.steps = 2;
  c.shape = shape(2 * W, 2, 256, 32);
  add(c);
  c = {};
  c.name = "capacity overflow on rank 0";
  c.pile = true, c.steps = 2, c.drop = 0;
  c.shape = shape(2 * W, 4, 256, 16);
  add(c);
  c = {};
  c.name = "bad input rejected";
  c.kind = Kind::BadInput;
  c.shape = shape(2 * W, 2, 200, 16);
  add(c);
  c = {};
  c.name = "fault: last rank never sends";
  c.kind = Kind::Fault;
  c.timeout_ns = 300000000LL;
  c.shape = shape(2 * W, 2, 256, 16);
  add(c);
  if (timed_iters > 0) {
    for (int n : {1, 128}) {
      c = {};
      c.name = "timed " + std::to_string(n) + " tok 7168 top-8 E256";
      c.kind = Kind::Timed;
      c.fixed_n = n;
      c.drop = 0;
      c.shape = shape(256, 8, 7168, 128);
      add(c);
    }
  }
  return v;
}

struct LayerGuard {
  epa2a_ll_layer* l = nullptr;
  ~LayerGuard() {
    if (l) epa2a_ll_layer_destroy(l);
  }
};

epa2a_ll_config config_for(const Case& c, int rank) {
  epa2a_ll_config k{};
  k.size = sizeof(k);
  k.version = EPA2A_LL_CONFIG_VERSION;
  k.timeout_ns = c.timeout_ns;
  k.max_tokens = c.shape.M;
  k.hidden = c.shape.H;
  k.topk = c.shape.K;
  k.num_experts = c.shape.E;
  k.rank = rank;
  k.world_size = c.shape.W;
  k.local_world_size = c.shape.W;
  k.num_sms = std::getenv("EPA2A_LL_SMS") ? std::atoi(std::getenv("EPA2A_LL_SMS")) : 16;
  return k;
}

// The device inputs and outputs of one rank's steps.
struct Io {
  const Case& c;
  int rank;
  void* stream;
  epa2a_ll_buffers b{};
  DevBuf x, ids, w, out, expert;
  size_t tok_bytes, scale_bytes;
  Io(const Case& cs, int r, void* s, epa2a_ll_layer* l)
      : c(cs),
        rank(r),
        stream(s),
        b(get(l)),
        x((size_t)cs.shape.M * cs.shape.H * 2),
        ids((size_t)cs.shape.M * cs.shape.K * 4),
        w((size_t)cs.shape.M * cs.shape.K * 4),
        out((size_t)cs.shape.M * cs.shape.H * 2),
        expert((size_t)b.local_experts * b.expert_capacity * cs.shape.H * 2),
        tok_bytes((size_t)b.local_experts * b.expert_capacity * cs.shape.H * 2),
        scale_bytes(cs.shape.H % 128 ? 0
                                     : (size_t)b.local_experts * b.expert_capacity * (cs.shape.H / 128) * 4) {
  }
  static epa2a_ll_buffers get(epa2a_ll_layer* l) {
    epa2a_ll_buffers b{};
    CK(epa2a_ll_get_buffers(l, &b));
    return b;
  }
  void upload(const llref::RankInput& in) {
    const size_t nk = (size_t)in.n * c.shape.K;
    copy_sync(x.p, in.x.data(), in.x.size() * 2, stream);
    copy_sync(ids.p, in.ids.data(), nk * 4, stream);
    copy_sync(w.p, in.weights.data(), nk * 4, stream);
  }
  void poison() {
    CK(epa2a_memset_async(b.tokens, 0xff, tok_bytes, stream));
    if (scale_bytes) CK(epa2a_memset_async(b.scales, 0xff, scale_bytes, stream));
    CK(epa2a_memset_async(b.rows_per_expert, 0xff, (size_t)b.local_experts * 4, stream));
    CK(epa2a_memset_async(out.p, 0xff, (size_t)c.shape.M * c.shape.H * 2, stream));
    CK(epa2a_stream_sync(stream));
  }
  // The experts' rows for this step, from the expected layout, into the zero-copy buffer or a separate one.
  // Written after the dispatch has been received: only then have all peers finished reading the last step's.
  void write_expert_rows(const llref::Expected& lay) { write_expert_rows(lay, c.zero_copy); }
  void write_expert_rows(const llref::Expected& lay, bool to_combine_input) {
    const int H = c.shape.H, cap = b.expert_capacity, epr = b.local_experts;
    std::vector<uint16_t> rows((size_t)epr * cap * H, 0xffff);  // rows past rows_per_expert: poison (unread)
    for (int j = 0; j < epr; ++j)
      for (int r = 0; r < lay.rows[j]; ++r) {
        const llref::Origin& o = lay.origins[j][r];
        for (int h = 0; h < H; ++h)
          rows[((size_t)j * cap + r) * H + h] = llref::expert_value(c.seed, rank * epr + j, o.s, o.t, o.k, h);
      }
    copy_sync(to_combine_input ? b.combine_input : expert.p, rows.data(), rows.size() * 2, stream);
  }
};

void enqueue_dispatch(epa2a_ll_layer* l, Io& io, int n, int format) {
  if (io.c.fused) {
    CK(epa2a_ll_dispatch(l, io.x.p, static_cast<const int32_t*>(io.ids.p), static_cast<const float*>(io.w.p),
                         n, format, io.stream));
    return;
  }
  CK(epa2a_ll_dispatch_send(l, io.x.p, static_cast<const int32_t*>(io.ids.p),
                            static_cast<const float*>(io.w.p), n, format, io.stream));
  CK(epa2a_ll_dispatch_recv(l, io.stream));
}

void enqueue_combine(epa2a_ll_layer* l, Io& io, bool zero_copy, bool weighted) {
  if (io.c.fused) {
    CK(epa2a_ll_combine(l, zero_copy ? nullptr : io.expert.p, io.out.p, weighted ? 1 : 0, io.stream));
    return;
  }
  CK(epa2a_ll_combine_send(l, zero_copy ? nullptr : io.expert.p, io.stream));
  CK(epa2a_ll_combine_recv(l, io.out.p, weighted ? 1 : 0, io.stream));
}

// Received rows, rows per expert, untouched rows past them.
void check_dispatch(const Case& c, Io& io, const std::vector<llref::RankInput>& in,
                    const llref::Expected& lay, int format) {
  const int H = c.shape.H, cap = io.b.expert_capacity, epr = io.b.local_experts, G = H / 128;
  const bool fp8 = format != EPA2A_LL_FORMAT_BF16;
  std::vector<int32_t> rows(epr);
  copy_sync(rows.data(), io.b.rows_per_expert, rows.size() * 4, io.stream);
  for (int j = 0; j < epr; ++j)
    EXPECT(rows[j] == lay.rows[j], "rows_per_expert[%d] = %d, want %d", j, rows[j], lay.rows[j]);
  const size_t rb = fp8 ? (size_t)H : (size_t)H * 2;
  std::vector<uint8_t> tok(io.tok_bytes);
  copy_sync(tok.data(), io.b.tokens, tok.size(), io.stream);
  std::vector<float> sc(io.scale_bytes / 4);
  if (fp8) copy_sync(sc.data(), io.b.scales, io.scale_bytes, io.stream);
  std::vector<uint8_t> want(rb);
  std::vector<float> want_sc(fp8 ? G : 0);
  for (int j = 0; j < epr; ++j) {
    for (int r = 0; r < cap; ++r) {
      const size_t row = (size_t)j * cap + r;
      const uint8_t* got = tok.data() + row * rb;
      if (r >= lay.rows[j]) {
        // Not written: still the poison (0xff bytes), at least its first and last 16 bytes.
        EXPECT(got[0] == 0xff && got[15] == 0xff && got[rb - 1] == 0xff,
               "expert %d row %d past rows_per_expert %d was written", j, r, lay.rows[j]);
        continue;
      }
      const llref::Origin& o = lay.origins[j][r];
      const uint16_t* src = in[o.s].x.data() + (size_t)o.t * H;
      if (!fp8) {
        std::memcpy(want.data(), src, rb);
      } else {
        for (int g = 0; g < G; ++g) {
          const float s = llref::group_scale(src + g * 128, format == EPA2A_LL_FORMAT_FP8_POW2);
          want_sc[g] = s;
          for (int i = 0; i < 128; ++i)
            want[g * 128 + i] = llref::to_e4m3(llref::bf16_to_float(src[g * 128 + i]) / s);
        }
      }
      for (size_t i = 0; i < rb; ++i)
        EXPECT(got[i] == want[i],
               "expert %d row %d (source %d token %d k %d) byte %zu: got 0x%02x want 0x%02x", j, r, o.s, o.t,
               o.k, i, got[i], want[i]);
      for (int g = 0; g < (fp8 ? G : 0); ++g)
        EXPECT(std::memcmp(&sc[row * G + g], &want_sc[g], 4) == 0,
               "expert %d row %d scale %d: got %.9g want %.9g", j, r, g, sc[row * G + g], want_sc[g]);
    }
  }
}

// Returns the largest error in bf16 ulps; every element within one rounding, NaN poison never left.
int check_combine(const Case& c, Io& io, const std::vector<llref::RankInput>& in, bool weighted, int* exact) {
  const int H = c.shape.H, n = in[io.rank].n;
  const std::vector<uint16_t> want = llref::expected_combine(c.shape, in, io.rank, weighted, c.seed);
  std::vector<uint16_t> got((size_t)n * H);
  copy_sync(got.data(), io.out.p, got.size() * 2, io.stream);
  int worst = 0;
  *exact = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = llref::bf16_to_float(got[i]), w = llref::bf16_to_float(want[i]);
    EXPECT(!std::isnan(g), "combine token %zu channel %zu was not written (NaN poison left)", i / H, i % H);
    if (got[i] == want[i]) {
      ++*exact;
      continue;
    }
    // One bf16 rounding: at most one unit in the last place of the expected value.
    const float ulp = std::ldexp(1.0f, std::ilogb(w == 0 ? 1e-30f : w) - 7);
    const int d = (int)std::ceil(std::fabs(g - w) / ulp);
    EXPECT(d <= 1, "combine token %zu channel %zu: got %g want %g (%d ulps)", i / H, i % H, g, w, d);
    worst = std::max(worst, d);
  }
  return worst;
}

void run_check(const Case& c, int rank, void* stream, Result& res) {
  LayerGuard g;
  const epa2a_ll_config cfg = config_for(c, rank);
  CK(epa2a_ll_layer_create(&cfg, &g.l));
  Io io(c, rank, stream, g.l);
  void* graph_d = nullptr;
  void* graph_c = nullptr;
  // A graph bakes n in; the capacity case gives every rank max_tokens tokens, so expert 0 surely overflows.
  int fixed_n = c.graph ? std::max(1, c.shape.M / 2) : (c.pile ? c.shape.M : -1);
  int worst = 0, exact = 0, total = 0;
  for (int step = 0; step < c.steps + (c.graph ? 2 : 0); ++step) {
    std::vector<llref::RankInput> in =
        llref::make_inputs(c.shape, c.seed * 31 + step, fixed_n, c.drop, c.skew, c.bad_rank);
    if (c.pile) llref::pile_on_expert0(in, c.shape.K);
    const llref::Expected lay = llref::expected_layout(c.shape, in, rank);
    io.upload(in[rank]);
    io.poison();
    if (c.graph && !graph_d) {
      CK(epa2a_graph_begin(stream));
      enqueue_dispatch(g.l, io, in[rank].n, c.format);
      CK(epa2a_graph_end(stream, &graph_d));
      CK(epa2a_graph_begin(stream));
      enqueue_combine(g.l, io, c.zero_copy, c.weighted);
      CK(epa2a_graph_end(stream, &graph_c));
    }
    if (c.graph) {
      CK(epa2a_graph_launch(graph_d, stream));
    } else {
      enqueue_dispatch(g.l, io, in[rank].n, c.format);
    }
    // A dropped input is reported on the rank that saw it; the step still completes on every rank.
    const int expect =
        c.bad_rank == rank ? EPA2A_ERR_BAD_EXPERT_ID : (c.pile && rank == 0 ? EPA2A_ERR_CAPACITY : 0);
    const int rs = epa2a_ll_layer_sync(g.l, stream);
    if (expect) {
      EXPECT(rs == expect, "rank %d: dispatch sync returned %d (%s), want %d", rank, rs, epa2a_last_error(),
             expect);
      res.msg = std::string("reported: ") + epa2a_last_error();
    } else {
      CK(rs);
    }
    check_dispatch(c, io, in, lay, c.format);
    io.write_expert_rows(lay);
    if (c.graph) {
      CK(epa2a_graph_launch(graph_c, stream));
    } else {
      enqueue_combine(g.l, io, c.zero_copy, c.weighted);
    }
    const int rc = epa2a_ll_layer_sync(g.l, stream);
    if (!expect || rc != expect) CK(rc);  // the dispatch's input error stays reported until the next send
    int ex = 0;
    worst = std::max(worst, check_combine(c, io, in, c.weighted, &ex));
    exact += ex;
    total += in[rank].n * c.shape.H;
  }
  if (graph_d) CK(epa2a_graph_destroy(graph_d));
  if (graph_c) CK(epa2a_graph_destroy(graph_c));
  char b[160];
  snprintf(b, sizeof(b), "%d steps; combine %d/%d bit-exact, worst %d ulp; ", c.steps + (c.graph ? 2 : 0),
           exact, total, worst);
  res.msg = b + res.msg;
}

void run_bad_input(const Case& c, int rank, void* stream, Result& res) {
  // Inter-node configurations go to the normal layer: refused before any allocation (on every rank alike).
  epa2a_ll_config cfg = config_for(c, rank);
  epa2a_ll_layer* l = nullptr;
  if (c.shape.W >= 2) {
    cfg.local_world_size = c.shape.W / 2;
    int rc = epa2a_ll_layer_create(&cfg, &l);
    EXPECT(rc == EPA2A_ERR_INVALID_ARGUMENT && std::strstr(epa2a_last_error(), "intra-node"),
           "inter-node config: rc %d (%s)", rc, epa2a_last_error());
  }
  cfg = config_for(c, rank);
  cfg.size = 12;
  EXPECT(epa2a_ll_layer_create(&cfg, &l) == EPA2A_ERR_INVALID_ARGUMENT, "a wrong config size was accepted");
  LayerGuard g;
  cfg = config_for(c, rank);
  CK(epa2a_ll_layer_create(&cfg, &g.l));
  Io io(c, rank, stream, g.l);
  const int32_t* ids = static_cast<const int32_t*>(io.ids.p);
  int rc = epa2a_ll_dispatch_send(g.l, io.x.p, ids, nullptr, c.shape.M + 1, EPA2A_LL_FORMAT_BF16, stream);
  EXPECT(rc == EPA2A_ERR_INVALID_ARGUMENT, "n > max_tokens: rc %d", rc);
  rc = epa2a_ll_dispatch_send(g.l, io.x.p, ids, nullptr, 4, EPA2A_LL_FORMAT_FP8, stream);
  EXPECT(rc == EPA2A_ERR_INVALID_ARGUMENT && std::strstr(epa2a_last_error(), "128"),
         "fp8 with hidden %d: rc %d (%s)", c.shape.H, rc, epa2a_last_error());
  rc = epa2a_ll_dispatch_recv(g.l, stream);
  EXPECT(rc == EPA2A_ERR_STATE, "recv before send: rc %d", rc);
  rc = epa2a_ll_combine_send(g.l, nullptr, stream);
  EXPECT(rc == EPA2A_ERR_STATE, "combine before dispatch: rc %d", rc);
  // Still usable: one checked step.
  const std::vector<llref::RankInput> in = llref::make_inputs(c.shape, c.seed, -1, 0.1, false, -1);
  const llref::Expected lay = llref::expected_layout(c.shape, in, rank);
  io.upload(in[rank]);
  io.poison();
  CK(epa2a_ll_dispatch_send(g.l, io.x.p, ids, static_cast<const float*>(io.w.p), in[rank].n,
                            EPA2A_LL_FORMAT_BF16, stream));
  rc = epa2a_ll_dispatch_send(g.l, io.x.p, ids, nullptr, 1, EPA2A_LL_FORMAT_BF16, stream);
  EXPECT(rc == EPA2A_ERR_STATE, "a second send: rc %d", rc);
  CK(epa2a_ll_dispatch_recv(g.l, stream));
  CK(epa2a_ll_layer_sync(g.l, stream));
  check_dispatch(c, io, in, lay, EPA2A_LL_FORMAT_BF16);
  io.write_expert_rows(lay);
  enqueue_combine(g.l, io, false, true);
  CK(epa2a_ll_layer_sync(g.l, stream));
  int exact = 0;
  check_combine(c, io, in, true, &exact);
  res.msg = "refused inter-node, bad size, n > max, fp8 hidden 200, out-of-order calls; then a good step";
}

void run_fault(const Case& c, int rank, void* stream, const std::string& dir, Result& res) {
  LayerGuard g;
  const epa2a_ll_config cfg = config_for(c, rank);
  CK(epa2a_ll_layer_create(&cfg, &g.l));
  Io io(c, rank, stream, g.l);
  const int late = c.shape.W - 1;
  const std::vector<llref::RankInput> in0 = llref::make_inputs(c.shape, c.seed, -1, 0.1, false, -1);
  io.upload(in0[rank]);
  if (rank == late) {
    const auto t0 = Clock::now();
    for (int r = 0; r < late; ++r)
      while (!file_exists(dir + "/llfault_" + std::to_string(r))) {
        EXPECT(Clock::now() - t0 < std::chrono::seconds(60), "rank %d never reported its timeout", r);
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      }
    res.msg = "stayed away; ";
  } else {
    const auto t0 = Clock::now();
    enqueue_dispatch(g.l, io, in0[rank].n, EPA2A_LL_FORMAT_BF16);
    enqueue_combine(g.l, io, false, true);  // must end at once: the layer failed
    const int rc = epa2a_ll_layer_sync(g.l, stream);
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    const std::string msg = epa2a_last_error();
    EXPECT(rc == EPA2A_ERR_TIMEOUT, "expected a timeout, got %d: %s", rc, msg.c_str());
    EXPECT(msg.find("rank " + std::to_string(late)) != std::string::npos, "error does not name rank %d: %s",
           late, msg.c_str());
    EXPECT(ms < 300.0 + 700.0, "the timeout took %.0f ms (deadline 300 ms)", ms);
    const int again = epa2a_ll_dispatch_send(g.l, io.x.p, static_cast<const int32_t*>(io.ids.p), nullptr, 1,
                                             EPA2A_LL_FORMAT_BF16, stream);
    EXPECT(again == EPA2A_ERR_STATE, "a send after the failure returned %d (want: reset needed)", again);
    CK(epa2a_device_sync());
    res.msg = "timed out in " + std::to_string((int)ms) + " ms: " + msg.substr(0, 170) + "; ";
    touch(dir + "/llfault_" + std::to_string(rank));
  }
  CK(epa2a_ll_layer_reset(g.l));
  for (int step = 0; step < 2; ++step) {
    const std::vector<llref::RankInput> in =
        llref::make_inputs(c.shape, c.seed + 1 + step, -1, 0.1, false, -1);
    const llref::Expected lay = llref::expected_layout(c.shape, in, rank);
    io.upload(in[rank]);
    io.poison();
    enqueue_dispatch(g.l, io, in[rank].n, EPA2A_LL_FORMAT_FP8);
    CK(epa2a_ll_layer_sync(g.l, stream));
    check_dispatch(c, io, in, lay, EPA2A_LL_FORMAT_FP8);
    io.write_expert_rows(lay);
    enqueue_combine(g.l, io, false, true);
    CK(epa2a_ll_layer_sync(g.l, stream));
    int exact = 0;
    check_combine(c, io, in, true, &exact);
  }
  res.msg += "after reset: 2 checked steps";
}

double pct(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, (size_t)(q * (v.size() - 1) + 0.5))];
}

// Graph replays of the split phases: [fp8 dispatch, bf16 dispatch, zero-copy combine, copying combine].
void run_timed(const Case& c, int rank, void* stream, int iters, Result& res) {
  LayerGuard g;
  const epa2a_ll_config cfg = config_for(c, rank);
  CK(epa2a_ll_layer_create(&cfg, &g.l));
  Io io(c, rank, stream, g.l);
  const std::vector<llref::RankInput> in = llref::make_inputs(c.shape, c.seed, c.fixed_n, 0.0, false, -1);
  const llref::Expected lay = llref::expected_layout(c.shape, in, rank);
  io.upload(in[rank]);
  io.poison();
  io.write_expert_rows(lay, true);   // the zero-copy combine reads these
  io.write_expert_rows(lay, false);  // the copying combine copies these in
  const int n = in[rank].n;
  void* gr[4] = {};
  CK(epa2a_graph_begin(stream));
  enqueue_dispatch(g.l, io, n, EPA2A_LL_FORMAT_FP8);
  CK(epa2a_graph_end(stream, &gr[0]));
  CK(epa2a_graph_begin(stream));
  enqueue_combine(g.l, io, true, true);
  CK(epa2a_graph_end(stream, &gr[2]));
  CK(epa2a_graph_begin(stream));
  enqueue_dispatch(g.l, io, n, EPA2A_LL_FORMAT_BF16);
  CK(epa2a_graph_end(stream, &gr[1]));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_combine_send(g.l, io.expert.p, stream));
  CK(epa2a_ll_combine_recv(g.l, io.out.p, 1, stream));
  CK(epa2a_graph_end(stream, &gr[3]));
  // The breakdown: the phases one graph each (captured in step order so the layer's call order holds).
  void* one[4] = {};
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_dispatch_send(g.l, io.x.p, static_cast<const int32_t*>(io.ids.p),
                            static_cast<const float*>(io.w.p), n, EPA2A_LL_FORMAT_FP8, stream));
  CK(epa2a_graph_end(stream, &one[0]));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_dispatch_recv(g.l, stream));
  CK(epa2a_graph_end(stream, &one[1]));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_combine_send(g.l, nullptr, stream));
  CK(epa2a_graph_end(stream, &one[2]));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_combine_recv(g.l, io.out.p, 1, stream));
  CK(epa2a_graph_end(stream, &one[3]));
  void* fused[2] = {};
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_dispatch(g.l, io.x.p, static_cast<const int32_t*>(io.ids.p), static_cast<const float*>(io.w.p),
                       n, EPA2A_LL_FORMAT_FP8, stream));
  CK(epa2a_graph_end(stream, &fused[0]));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_combine(g.l, nullptr, io.out.p, 1, stream));
  CK(epa2a_graph_end(stream, &fused[1]));
  void* noop = nullptr;
  void* bar = nullptr;
  CK(epa2a_graph_begin(stream));
  CK(epa2a_noop_kernel(stream));
  CK(epa2a_graph_end(stream, &noop));
  CK(epa2a_graph_begin(stream));
  CK(epa2a_ll_layer_barrier(g.l, stream));
  CK(epa2a_graph_end(stream, &bar));
  void* ev[2];
  for (auto& e : ev) CK(epa2a_event_create(&e));
  std::vector<double> t[kPhases];
  // Each entry: the graphs one timed measurement replays. Every rank runs the same sequence, so the epochs
  // match (a send replayed alone just announces the same rows again).
  const std::vector<void*> plan[kPhases] = {
      {gr[0]},  {gr[1]},          {gr[2]},  {gr[3]},          {noop},     {bar},
      {one[0]}, {one[0], one[1]}, {one[2]}, {one[2], one[3]}, {fused[0]}, {fused[1]}};
  // Order of one iteration: what each later phase needs has run before it (a receive after its send, a
  // combine after a dispatch).
  const int order[kPhases] = {4, 5, 6, 7, 10, 8, 9, 11, 0, 2, 1, 3};
  for (int it = 0; it < iters + 20; ++it) {
    for (int q : order) {
      CK(epa2a_ll_layer_barrier(g.l, stream));
      CK(epa2a_event_record(ev[0], stream));
      for (void* x : plan[q]) CK(epa2a_graph_launch(x, stream));
      CK(epa2a_event_record(ev[1], stream));
      if (epa2a_ll_layer_sync(g.l, stream) != EPA2A_OK) {
        // Where each rank stood: its epochs, counters, and the signals it holds (a lost or late signal shows).
        uint64_t st[5 + 3 * 32] = {};
        const char* err = epa2a_last_error();
        const std::string why = err ? err : "";
        if (epa2a_ll_debug_epochs(g.l, st, 5 + 3 * 32) == EPA2A_OK) {
          const int W = c.shape.W;
          std::string line;
          char b[64];
          for (int i = 0; i < 5 + 3 * W; ++i) {
            snprintf(b, sizeof b, "%s%llu", i == 5 || i == 5 + W || i == 5 + 2 * W ? " | " : " ",
                     (unsigned long long)st[i]);
            line += b;
          }
          fprintf(stderr, "[rank %d] it %d phase %d: dep d/c/b done d/c | disp_sig | comb_sig | bar_sig:%s\n",
                  rank, it, q, line.c_str());
        }
        throw std::runtime_error("epa2a_ll_layer_sync: " + why);
      }
      float ms = 0;
      CK(epa2a_event_elapsed_ms(ev[0], ev[1], &ms));
      if (it >= 20) t[q].push_back(ms * 1e3);  // the first 20: warm-up
    }
  }
  for (void* x : one) epa2a_graph_destroy(x);
  for (void* x : fused) epa2a_graph_destroy(x);
  epa2a_graph_destroy(noop);
  epa2a_graph_destroy(bar);
  for (auto& e : ev) epa2a_event_destroy(e);
  for (int i = 0; i < kPhases; ++i) {
    res.us[i][0] = pct(t[i], 0.5);
    res.us[i][1] = pct(t[i], 0.99);
  }
  // The replayed steps computed the checked functions: poison, replay the bf16 dispatch and the copying
  // weighted combine once more, and check both (the fp8 replays wrote the same buffer with another row
  // stride).
  io.poison();
  CK(epa2a_graph_launch(gr[1], stream));
  CK(epa2a_graph_launch(gr[3], stream));
  CK(epa2a_ll_layer_sync(g.l, stream));
  for (void* x : gr) epa2a_graph_destroy(x);
  check_dispatch(c, io, in, lay, EPA2A_LL_FORMAT_BF16);
  int exact = 0;
  const int worst = check_combine(c, io, in, true, &exact);
  // Bytes this rank reads + writes in each phase (the floor is their sum over ranks / the copy ceiling).
  const double H = c.shape.H, G = H / 128;
  double rows = 0;
  for (int j = 0; j < (int)lay.rows.size(); ++j) rows += lay.rows[j];
  const double nk = (double)n * c.shape.K;
  res.bytes[0] = n * (2 * H + H + 4 * G) + 2 * rows * (H + 4 * G);  // read x, write send rows; pull rows
  res.bytes[1] = n * 4 * H + 2 * rows * 2 * H;
  res.bytes[2] = nk * 2 * H + n * 2 * H;  // pull every (token, k) row, write the output
  res.bytes[3] = 2 * rows * 2 * H + res.bytes[2];
  char b[120];
  snprintf(b, sizeof(b), "%d replays; combine worst %d ulp; %d blocks a kernel; ", iters, worst,
           (int)io.b.blocks);
  res.msg = b;
}

int child_main(int W, int rank, const std::string& dir, uint64_t seed, int iters) {
  const std::string uid_path = dir + "/uid";
  int32_t uid_bytes = 0;
  if (epa2a_uid_size(&uid_bytes) != EPA2A_OK) return 2;
  std::vector<char> uid(uid_bytes);
  if (rank == 0) {
    if (epa2a_uid_create(uid.data(), uid_bytes) != EPA2A_OK) {
      fprintf(stderr, "rank 0: %s\n", epa2a_last_error());
      return 2;
    }
    std::ofstream(uid_path + ".tmp", std::ios::binary).write(uid.data(), uid_bytes);
    rename((uid_path + ".tmp").c_str(), uid_path.c_str());
  } else {
    const auto t0 = Clock::now();
    while (!file_exists(uid_path)) {
      if (Clock::now() - t0 > std::chrono::seconds(60)) return 3;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::ifstream(uid_path, std::ios::binary).read(uid.data(), uid_bytes);
  }
  int32_t ndev = 1;
  if (epa2a_device_count(&ndev) != EPA2A_OK || ndev < 1) return 4;
  if (epa2a_init(uid.data(), uid_bytes, rank, W, rank % ndev) != EPA2A_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, epa2a_last_error());
    return 5;
  }
  void* stream = nullptr;
  if (epa2a_stream_create(&stream) != EPA2A_OK) return 6;
  std::ofstream out(dir + "/result_" + std::to_string(rank) + ".txt");
  for (const Case& c : cases_for(W, seed, iters)) {
    Result r;
    r.name = c.name;
    try {
      switch (c.kind) {
        case Kind::Check:
          run_check(c, rank, stream, r);
          break;
        case Kind::BadInput:
          run_bad_input(c, rank, stream, r);
          break;
        case Kind::Fault:
          run_fault(c, rank, stream, dir, r);
          break;
        case Kind::Timed:
          run_timed(c, rank, stream, iters, r);
          break;
      }
      r.pass = true;
    } catch (const std::exception& e) {
      r.pass = false;
      r.msg = e.what();
      fprintf(stderr, "[W=%d rank %d] %s: FAIL (seed %llu) %s\n", W, rank, c.name.c_str(),
              (unsigned long long)c.seed, e.what());
    }
    std::string msg = r.msg;
    std::replace(msg.begin(), msg.end(), '|', '/');
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    out << r.name << "|" << (r.pass ? 1 : 0);
    for (int i = 0; i < kPhases; ++i) out << "|" << r.us[i][0] << "|" << r.us[i][1] << "|" << r.bytes[i];
    out << "|" << msg << "\n";
    out.flush();
  }
  epa2a_stream_destroy(stream);
  epa2a_finalize();
  return 0;
}

// Device-to-device copy bandwidth (bytes read + written per second) on this GPU, the ceiling of a phase.
double copy_bandwidth() {
  const size_t bytes = size_t(1) << 30;
  void *a = nullptr, *b = nullptr, *e0 = nullptr, *e1 = nullptr;
  if (epa2a_device_alloc(bytes, &a) || epa2a_device_alloc(bytes, &b) || epa2a_event_create(&e0) ||
      epa2a_event_create(&e1))
    return 0;
  std::vector<double> t;
  for (int i = 0; i < 12; ++i) {
    epa2a_event_record(e0, nullptr);
    epa2a_memcpy_async(b, a, bytes, nullptr);
    epa2a_event_record(e1, nullptr);
    epa2a_event_sync(e1);
    float ms = 0;
    epa2a_event_elapsed_ms(e0, e1, &ms);
    if (i >= 2) t.push_back(ms);
  }
  epa2a_device_free(a);
  epa2a_device_free(b);
  epa2a_event_destroy(e0);
  epa2a_event_destroy(e1);
  return 2.0 * bytes / (pct(t, 0.5) * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 7 && std::strcmp(argv[1], rank_process::kChildFlag) == 0)  // W rank dir seed iterations
    return child_main(std::stoi(argv[2]), std::stoi(argv[3]), argv[4], std::stoull(argv[5]),
                      std::atoi(argv[6]));
  std::vector<int> groups = {2, 4, 8};
  if (argc > 1) {
    groups.clear();
    std::stringstream ss(argv[1]);
    std::string tok;
    while (std::getline(ss, tok, ',')) groups.push_back(std::stoi(tok));
  }
  const uint64_t seed = argc > 2 ? std::stoull(argv[2]) : 42;
  if (argc > 3 && argv[3][0]) setenv("EPA2A_LL_FILTER", argv[3], 1);
  const int iters = argc > 4 ? std::atoi(argv[4]) : 1000;
  printf("epa2a_ll_smoke groups=%s seed=%llu iterations=%d\n", argc > 1 ? argv[1] : "2,4,8",
         (unsigned long long)seed, iters);
  bool all_ok = true;
  int passed = 0, failed = 0;
  struct Timed {
    std::string name;
    bool pass;
    double us[kPhases][2], max_med[kPhases], bytes[kPhases];
  };
  std::vector<Timed> timed;
  for (const int W : groups) {
    char tmpl[] = "/tmp/epa2a-ll-smoke-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    std::vector<pid_t> pids;
    for (int r = 0; r < W; ++r) {
      pids.push_back(rank_process::start(
          {std::to_string(W), std::to_string(r), dir, std::to_string(seed), std::to_string(iters)},
          [&] { return child_main(W, r, dir, seed, iters); }));
    }
    const auto t0 = Clock::now();
    std::vector<int> status(W, -1);
    int left = W;
    while (left > 0) {
      for (int r = 0; r < W; ++r) {
        if (status[r] != -1) continue;
        int st = 0;
        if (waitpid(pids[r], &st, WNOHANG) == pids[r]) {
          status[r] = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
          --left;
        }
      }
      if (left > 0 && Clock::now() - t0 > std::chrono::seconds(rank_process::group_limit_s(240))) {
        fprintf(stderr, "W=%d: ranks still running past the group's limit: killing them\n", W);
        for (int r = 0; r < W; ++r)
          if (status[r] == -1) kill(pids[r], SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (const Case& c : cases_for(W, seed, iters)) {
      int ok = 0;
      std::string msg;
      Timed tm{};
      tm.name = "W=" + std::to_string(W) + " " + c.name;
      for (int r = 0; r < W; ++r) {
        std::ifstream f(dir + "/result_" + std::to_string(r) + ".txt");
        std::string line;
        while (std::getline(f, line)) {
          std::vector<std::string> p;
          std::stringstream ls(line);
          std::string x;
          while (std::getline(ls, x, '|')) p.push_back(x);
          if (p.size() < 3 + 3 * kPhases || p[0] != c.name) continue;
          ok += p[1] == "1";
          for (int i = 0; i < kPhases; ++i) {
            const double med = std::stod(p[2 + 3 * i]), p99 = std::stod(p[3 + 3 * i]);
            if (r == 0) {
              tm.us[i][0] = med;
              tm.us[i][1] = p99;
            }
            tm.max_med[i] = std::max(tm.max_med[i], med);
            tm.bytes[i] += std::stod(p[4 + 3 * i]);
          }
          const std::string m = p.size() > 2 + 3 * kPhases ? p[2 + 3 * kPhases] : "";
          if (p[1] != "1" && msg.find("FAIL") == std::string::npos)
            msg = "FAIL rank " + std::to_string(r) + ": " + m;
          if (msg.empty() && !m.empty()) msg = "rank " + std::to_string(r) + ": " + m;
        }
      }
      const bool pass = ok == W;
      (pass ? passed : failed)++;
      all_ok = all_ok && pass;
      printf("W=%d %-34s %s  %s\n", W, c.name.c_str(), pass ? "PASS" : "FAIL", msg.c_str());
      tm.pass = pass;
      if (c.kind == Kind::Timed) timed.push_back(tm);
    }
    for (int r = 0; r < W; ++r)
      if (status[r] != 0) fprintf(stderr, "W=%d rank %d exited with %d\n", W, r, status[r]);
  }
  if (!timed.empty()) {
    const double bw = copy_bandwidth();
    printf(
        "\ncopy ceiling: %.2f TB/s (device-to-device, read + write); floor = bytes read + written by all "
        "ranks "
        "/ ceiling\n",
        bw / 1e12);
    printf("\n| case | phase | median us (rank 0) | p99 us | p99/median | worst rank median | floor us |\n");
    printf("| --- | --- | --- | --- | --- | --- | --- |\n");
    for (const Timed& t : timed)
      for (int i = 0; i < kPhases; ++i)
        printf("| %s%s | %s | %.1f | %.1f | %.2f | %.1f | %.1f |\n", t.name.c_str(),
               t.pass ? "" : " (check FAILED)", kPhaseNames[i], t.us[i][0], t.us[i][1],
               t.us[i][0] > 0 ? t.us[i][1] / t.us[i][0] : 0.0, t.max_med[i],
               bw > 0 ? t.bytes[i] / bw * 1e6 : 0.0);
  }
  printf("\n%d passed, %d failed\n", passed, failed);
  return all_ok ? 0 : 1;
}
