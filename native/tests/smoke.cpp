// Multi-process smoke test of libepa2a: N rank processes (fork) on the GPU(s), NVSHMEM bootstrapped by a
// unique id passed through a file, every step checked against the CPU model in reference.cpp.
//   epa2a_smoke [groups=2,4,8,big] [seed=42] [case-name filter]
// Prints one line per case and a table last; exit code 0 when every case passed on every rank.
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
#include "rank_process.h"
#include "reference.h"

namespace {

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

#define CK(call)                                                                             \
  do {                                                                                       \
    int rc_ = (call);                                                                        \
    if (rc_ != EPA2A_OK)                                                                     \
      throw Failure(std::string(#call).substr(0, 40) + " -> " + std::to_string(rc_) + ": " + \
                    epa2a_last_error());                                                     \
  } while (0)

#define EXPECT(cond, ...)                    \
  do {                                       \
    if (!(cond)) {                           \
      char b_[512];                          \
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

void upload(void* dst, const void* src, size_t bytes, void* stream) {
  if (!bytes) return;
  CK(epa2a_memcpy_async(dst, src, bytes, stream));
  CK(epa2a_stream_sync(stream));
}

void download(void* dst, const void* src, size_t bytes, void* stream) {
  if (!bytes) return;
  CK(epa2a_memcpy_async(dst, src, bytes, stream));
  CK(epa2a_stream_sync(stream));
}

uint64_t fnv(const void* p, size_t n, uint64_t h = 1469598103934665603ull) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}

struct Result {
  std::string name;
  bool pass = false;
  int recv_max = 0;
  double disp_us = 0, comb_us = 0, max_err = 0;
  double disp_bytes = 0, comb_bytes = 0;  // bytes read + written by all ranks in one step
  std::string msg;
};

// Group "big": the configurations the Python original documents, on 8 ranks.
std::vector<ref::Case> cases_for(int W, bool big, uint64_t seed) {
  std::vector<ref::Case> v;
  const char* filter = std::getenv("EPA2A_SMOKE_FILTER");
  int index = 0;
  auto add = [&](ref::Case c) {
    const int my_index = index++;
    if (filter && c.name.find(filter) == std::string::npos) return;
    c.seed = seed * 131 + my_index;
    c.W = W;
    if (c.L == 0) c.L = W;
    v.push_back(c);
  };
  ref::Case c;
  if (big) {
    auto large = [](ref::Case& x) {
      x.verify_iters = 1;
      x.time_iters = 5;
      x.timeout_ns = 60000000000LL;
    };
    c = {};
    c.name = "8192x7168 top-8 E256";
    c.L = 0, c.E = 256, c.K = 8, c.H = 7168, c.max_tokens = 8192;
    large(c);
    add(c);
    c = {};
    c.name = "4096x6144 top-6 drop.3 scatter+weights";
    c.L = 0, c.E = 256, c.K = 6, c.H = 6144, c.max_tokens = 4096, c.drop = 0.3, c.scatter = c.weights = true;
    large(c);
    add(c);
    c = {};
    c.name = "32768x1536 top-8 E384 drop.3 lc";
    c.L = 0, c.E = 384, c.K = 8, c.H = 1536, c.max_tokens = 32768, c.drop = 0.3, c.local_combine = 1;
    c.capacity = 1;
    large(c);
    add(c);
    c = {};
    c.name = "4096x7168 top-8 E256 inter L=2";
    c.L = 2, c.E = 256, c.K = 8, c.H = 7168, c.max_tokens = 4096, c.weights = c.weighted = true;
    large(c);
    add(c);
    return v;
  }
  if (W == 2) {
    c = {};
    c.name = "intra bf16";
    c.L = 0, c.E = 8, c.K = 2, c.H = 512, c.max_tokens = 128, c.drop = 0.1;
    add(c);
    c = {};
    c.name = "intra fp32 weighted";
    c.L = 0, c.type = 2, c.E = 8, c.K = 3, c.H = 256, c.max_tokens = 96, c.weights = c.weighted = true;
    add(c);
  } else if (W == 4) {
    c = {};
    c.name = "intra bf16 local-combine";
    c.L = 0, c.E = 16, c.K = 4, c.H = 1024, c.max_tokens = 200, c.drop = 0.2, c.local_combine = 1;
    c.weights = true, c.zero_copy = true;
    add(c);
    c = {};
    c.name = "intra fp16 align16 weighted";
    c.L = 0, c.type = 1, c.E = 16, c.K = 3, c.H = 768, c.max_tokens = 150, c.align = 16;
    c.weights = c.weighted = true;
    add(c);
    c = {};
    c.name = "intra bf16 scatter-indices";
    c.L = 0, c.E = 16, c.K = 4, c.H = 512, c.max_tokens = 128, c.drop = 0.3, c.scatter = c.weights = true;
    add(c);
    c = {};
    c.name = "intra bf16 hidden=100 lc weighted";
    c.L = 0, c.E = 8, c.K = 2, c.H = 100, c.max_tokens = 64, c.local_combine = 1,
    c.weights = c.weighted = true;
    add(c);
    c = {};
    c.name = "grow (skewed, capacity 1)";
    c.L = 0, c.E = 16, c.K = 4, c.H = 256, c.max_tokens = 128, c.capacity = 1, c.skew = true;
    add(c);
    c = {};
    c.name = "inter L=2 bf16 weighted";
    c.L = 2, c.E = 16, c.K = 4, c.H = 1024, c.max_tokens = 128, c.drop = 0.2, c.weights = c.weighted = true;
    add(c);
    c = {};
    c.name = "fault: rank 3 never arrives";
    c.L = 0, c.E = 8, c.K = 2, c.H = 256, c.max_tokens = 64, c.fault = true, c.verify_iters = 1,
    c.time_iters = 0;
    c.timeout_ns = 300000000LL;
    add(c);
    // Life-cycle barriers (deadline 1.5 s here): the others fail in time naming the late rank, the late rank
    // fails at once when it comes, and the job still works.
    c = {};
    c.name = "late to create: rank 3";
    c.L = 0, c.E = 8, c.K = 2, c.H = 256, c.max_tokens = 64, c.late_at = 1, c.verify_iters = 1,
    c.time_iters = 0;
    c.timeout_ns = 200000000LL;
    add(c);
    c.name = "late to destroy: rank 3";
    c.late_at = 2;
    add(c);

  } else {
    c = {};
    c.name = "intra bf16";
    c.L = 0, c.E = 64, c.K = 8, c.H = 2048, c.max_tokens = 256;
    add(c);
    c = {};
    c.name = "intra bf16 local-combine weighted";
    c.L = 0, c.E = 32, c.K = 6, c.H = 1024, c.max_tokens = 192, c.drop = 0.2, c.local_combine = 1;
    c.weights = c.weighted = true;
    add(c);
    c = {};
    c.name = "inter L=2 bf16";
    c.L = 2, c.E = 32, c.K = 4, c.H = 1024, c.max_tokens = 192, c.drop = 0.2, c.weights = true;
    add(c);
    c = {};
    c.name = "inter L=4 fp32 weighted align8";
    c.L = 4, c.type = 2, c.E = 32, c.K = 4, c.H = 512, c.max_tokens = 128, c.align = 8;
    c.weights = c.weighted = true;
    add(c);
  }
  return v;
}

// One or more dispatch + combine steps on an existing layer, each checked against the CPU model.
void run_steps(const ref::Case& c, epa2a_layer* layer, int rank, void* stream,
               std::vector<ref::RankInput>& in, const ref::Plan& plan, int verify_iters, int time_iters,
               Result& res) {
  const ref::RankInput& mine = in[rank];
  const int tb = c.tbytes(), K = c.K, H = c.H, n = mine.n, epr = c.E / c.W;
  const size_t rb = (size_t)H * tb;
  const int recv = plan.recv[rank];
  DevBuf d_tok((size_t)n * rb), d_ids((size_t)n * K * 4), d_w((size_t)n * K * 4), d_sc((size_t)n * K * 4);
  DevBuf d_out((size_t)n * rb), d_exp((size_t)recv * rb);
  upload(d_tok.p, mine.tokens.data(), (size_t)n * rb, stream);
  upload(d_ids.p, mine.ids.data(), (size_t)n * K * 4, stream);
  upload(d_w.p, mine.weights.data(), (size_t)n * K * 4, stream);
  if (c.scatter) upload(d_sc.p, mine.scatter.data(), (size_t)n * K * 4, stream);

  // What this rank must receive, and what its experts return.
  std::vector<uint8_t> want_rows((size_t)recv * rb, 0), expert((size_t)recv * rb, 0);
  std::vector<float> want_w(recv, 0.f);
  for (int r = 0; r < recv; ++r) {
    const auto& o = plan.origin[rank][r];
    if (o[0] < 0) continue;
    const ref::RankInput& src = in[o[0]];
    const size_t i = (size_t)o[1] * K + o[2];
    std::memcpy(&want_rows[r * rb], &src.tokens[(size_t)o[1] * rb], rb);
    want_w[r] = c.weights ? src.weights[i] : 1.f;
    const int e = src.ids[i];
    for (int h = 0; h < H; ++h)
      ref::from_float(c.type, ref::expert_fn(e, ref::to_float(c.type, &want_rows[r * rb + (size_t)h * tb])),
                      &expert[r * rb + (size_t)h * tb]);
  }
  const std::vector<uint8_t> want_out = ref::expected_combine(c, in, rank);
  upload(d_exp.p, expert.data(), expert.size(), stream);

  void* ev[6];
  for (auto& e : ev) CK(epa2a_event_create(&e));
  std::vector<double> dts, cts;
  uint64_t hash_disp = 0, hash_comb = 0;
  std::vector<uint8_t> got_rows((size_t)recv * rb), got_out((size_t)n * rb);
  std::vector<float> got_w(recv);
  std::vector<int32_t> got_origin((size_t)recv * 4), got_scatter((size_t)n * K);
  for (int it = 0; it < verify_iters; ++it) {
    CK(epa2a_event_record(ev[0], stream));
    CK(epa2a_dispatch_prepare(layer, d_tok.p, static_cast<const int32_t*>(d_ids.p),
                              c.weights ? static_cast<const float*>(d_w.p) : nullptr,
                              c.scatter ? static_cast<const int32_t*>(d_sc.p) : nullptr, n, stream));
    int32_t mx = 0;
    CK(epa2a_dispatch_wait_sizes(layer, 0, &mx));
    epa2a_layer_buffers bufs{};
    CK(epa2a_layer_get_buffers(layer, &bufs));
    if (mx > bufs.output_rows) {
      CK(epa2a_layer_grow_output(layer, mx));
      res.msg += "grew " + std::to_string(bufs.output_rows) + "->" + std::to_string(mx) + " rows; ";
      CK(epa2a_layer_get_buffers(layer, &bufs));
    }
    CK(epa2a_dispatch_send(layer, stream));
    CK(epa2a_dispatch_finish(layer, stream));
    CK(epa2a_event_record(ev[1], stream));
    CK(epa2a_layer_sync(layer, stream));
    res.recv_max = mx;

    std::vector<int32_t> recv_all(c.W), tokens_all(c.W), rows(epr), padded(epr), start(epr);
    CK(epa2a_dispatch_get_layout(layer, recv_all.data(), tokens_all.data(), rows.data(), padded.data(),
                                 start.data()));
    for (int d = 0; d < c.W; ++d) {
      EXPECT(recv_all[d] == plan.recv[d], "recv rows of rank %d: got %d want %d", d, recv_all[d],
             plan.recv[d]);
      EXPECT(tokens_all[d] == plan.tokens[d], "tokens of rank %d: got %d want %d", d, tokens_all[d],
             plan.tokens[d]);
    }
    for (int j = 0; j < epr; ++j) {
      EXPECT(rows[j] == plan.rows[rank][j] && padded[j] == plan.padded[rank][j] &&
                 start[j] == plan.start[rank][j],
             "local expert %d: rows/padded/start %d/%d/%d want %d/%d/%d", j, rows[j], padded[j], start[j],
             plan.rows[rank][j], plan.padded[rank][j], plan.start[rank][j]);
    }
    download(got_rows.data(), bufs.output, got_rows.size(), stream);
    download(got_w.data(), bufs.weights, got_w.size() * 4, stream);
    download(got_origin.data(), bufs.row_origin, got_origin.size() * 4, stream);
    download(got_scatter.data(), bufs.scatter_rows, got_scatter.size() * 4, stream);
    for (int r = 0; r < recv; ++r) {
      const auto& o = plan.origin[rank][r];
      EXPECT(got_origin[r * 4] == o[0] && got_origin[r * 4 + 1] == o[1] && got_origin[r * 4 + 2] == o[2],
             "row %d origin (%d,%d,%d) want (%d,%d,%d)", r, got_origin[r * 4], got_origin[r * 4 + 1],
             got_origin[r * 4 + 2], o[0], o[1], o[2]);
      EXPECT(std::memcmp(&got_rows[r * rb], &want_rows[r * rb], rb) == 0,
             "row %d token bytes differ (origin %d,%d,%d)", r, o[0], o[1], o[2]);
      EXPECT(std::memcmp(&got_w[r], &want_w[r], 4) == 0, "row %d weight %g want %g", r, got_w[r], want_w[r]);
    }
    for (int i = 0; i < n * K; ++i) {
      const int e = mine.ids[i];
      const int want = e >= c.E ? -1 : plan.offset[e / epr] + plan.row[rank][i];
      EXPECT(got_scatter[i] == want, "scatter row of entry %d: got %d want %d", i, got_scatter[i], want);
    }
    const uint64_t hd = fnv(got_rows.data(), got_rows.size(), fnv(got_origin.data(), got_origin.size() * 4));
    if (it == 0) hash_disp = hd;
    EXPECT(hd == hash_disp, "iteration %d: dispatch output differs from iteration 0 (not deterministic)", it);

    if (c.zero_copy) upload(bufs.output, expert.data(), expert.size(), stream);
    CK(epa2a_event_record(ev[2], stream));
    CK(epa2a_combine(layer, c.zero_copy ? nullptr : d_exp.p, d_out.p, c.weighted ? 1 : 0, stream));
    CK(epa2a_event_record(ev[3], stream));
    CK(epa2a_layer_sync(layer, stream));
    download(got_out.data(), d_out.p, got_out.size(), stream);
    const double rel = c.type == 0 ? 1.6e-2 : c.type == 1 ? 2e-3 : 1e-5;
    for (size_t i = 0; i < (size_t)n * H; ++i) {
      const float g = ref::to_float(c.type, &got_out[i * tb]), w = ref::to_float(c.type, &want_out[i * tb]);
      const double err = std::fabs((double)g - (double)w);
      res.max_err = std::max(res.max_err, err);
      EXPECT(err <= rel * (1.0 + std::fabs(w)), "combine token %zu elem %zu: got %g want %g", i / H, i % H, g,
             w);
    }
    const uint64_t hc = fnv(got_out.data(), got_out.size());
    if (it == 0) hash_comb = hc;
    EXPECT(hc == hash_comb, "iteration %d: combine output differs from iteration 0", it);
    float ms = 0;
    CK(epa2a_event_elapsed_ms(ev[0], ev[1], &ms));
    dts.push_back(ms * 1000.0);
    CK(epa2a_event_elapsed_ms(ev[2], ev[3], &ms));
    cts.push_back(ms * 1000.0);
  }
  // Timed steps: ranks aligned by a layer barrier, nothing on the host between the phases but the size poll.
  dts.clear();
  cts.clear();
  std::vector<double> prep, send, fin;
  for (int it = 0; it < time_iters; ++it) {
    CK(epa2a_layer_barrier(layer, 0, stream));
    CK(epa2a_event_record(ev[0], stream));
    CK(epa2a_dispatch_prepare(layer, d_tok.p, static_cast<const int32_t*>(d_ids.p),
                              c.weights ? static_cast<const float*>(d_w.p) : nullptr,
                              c.scatter ? static_cast<const int32_t*>(d_sc.p) : nullptr, n, stream));
    CK(epa2a_event_record(ev[3], stream));
    int32_t mx = 0;
    CK(epa2a_dispatch_wait_sizes(layer, 0, &mx));
    CK(epa2a_event_record(ev[4], stream));
    CK(epa2a_dispatch_send(layer, stream));
    CK(epa2a_event_record(ev[5], stream));
    CK(epa2a_dispatch_finish(layer, stream));
    CK(epa2a_event_record(ev[1], stream));
    CK(epa2a_combine(layer, c.zero_copy ? nullptr : d_exp.p, d_out.p, c.weighted ? 1 : 0, stream));
    CK(epa2a_event_record(ev[2], stream));
    CK(epa2a_layer_sync(layer, stream));
    float ms = 0;
    CK(epa2a_event_elapsed_ms(ev[0], ev[1], &ms));
    dts.push_back(ms * 1000.0);
    CK(epa2a_event_elapsed_ms(ev[1], ev[2], &ms));
    cts.push_back(ms * 1000.0);
    CK(epa2a_event_elapsed_ms(ev[0], ev[3], &ms));
    prep.push_back(ms * 1000.0);
    CK(epa2a_event_elapsed_ms(ev[4], ev[5], &ms));
    send.push_back(ms * 1000.0);
    CK(epa2a_event_elapsed_ms(ev[5], ev[1], &ms));
    fin.push_back(ms * 1000.0);
  }
  if (!c.zero_copy && time_iters > 0) {
    // The timed steps computed the same function: their last combine must equal the checked one.
    download(got_out.data(), d_out.p, got_out.size(), stream);
    EXPECT(fnv(got_out.data(), got_out.size()) == hash_comb,
           "timed combine output differs from the checked one");
  }
  for (auto& e : ev) epa2a_event_destroy(e);
  auto median = [](std::vector<double> v) {
    if (v.size() > 2) v.erase(v.begin());  // warm-up
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  res.disp_us = median(dts);
  res.comb_us = median(cts);
  if (time_iters > 0) {
    char b[160];
    snprintf(b, sizeof(b), "dispatch phases (median us): prepare %.1f, send %.1f, finish %.1f; ",
             median(prep), median(send), median(fin));
    res.msg += b;
  }
  // Bytes every rank together reads and writes in one step (the ceiling is this over the copy bandwidth).
  double rows = 0, toks = 0;
  for (int d = 0; d < c.W; ++d) {
    toks += plan.tokens[d];
    for (int j = 0; j < epr; ++j) rows += plan.rows[d][j];
  }
  res.disp_bytes = 2.0 * rows * (double)rb;
  res.comb_bytes = (c.zero_copy ? 0.0 : 2.0 * rows * (double)rb) + rows * (double)rb + toks * (double)rb;
}

bool file_exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

void touch(const std::string& p) {
  std::ofstream(p) << "1\n";
}

struct LayerGuard {
  epa2a_layer* l = nullptr;
  ~LayerGuard() {
    if (l) epa2a_layer_destroy(l);
  }
};

epa2a_layer_config config_for(const ref::Case& c, int rank) {
  epa2a_layer_config cfg{};
  cfg.size = sizeof(cfg);
  cfg.version = EPA2A_LAYER_CONFIG_VERSION;
  cfg.timeout_ns = c.timeout_ns;
  cfg.max_tokens = c.max_tokens;
  cfg.hidden = c.H;
  cfg.topk = c.K;
  cfg.num_experts = c.E;
  cfg.rank = rank;
  cfg.world_size = c.W;
  cfg.local_world_size = c.L;
  cfg.token_bytes = c.tbytes();
  cfg.token_type = c.type;
  cfg.num_sms = 20;
  cfg.enable_local_combine = c.local_combine;
  cfg.expert_alignment = c.align;
  cfg.capacity = c.capacity;
  return cfg;
}

// The last rank comes to layer create (late_at 1) or destroy (2) only after every other rank has failed
// there: they must fail within the collective deadline naming it, it must fail at once (they gave up) instead
// of passing on alone, and since every rank went through the same barriers a new layer then works.
void run_late_case(const ref::Case& c, int rank, void* stream, const std::string& dir,
                   std::vector<ref::RankInput>& in, const ref::Plan& plan, Result& res) {
  const int late = c.W - 1;
  const int64_t deadline_ns = 1500000000LL;  // above the layer's floor: 2 * 200 ms + 1 s
  const char* what = c.late_at == 1 ? "create" : "destroy";
  const std::string flag = dir + "/late_" + what + "_";
  CK(epa2a_set_collective_timeout(deadline_ns));
  epa2a_layer_config cfg = config_for(c, rank);
  epa2a_layer* l = nullptr;
  if (c.late_at == 2) CK(epa2a_layer_create(&cfg, &l));
  const auto t0 = Clock::now();
  if (rank == late) {
    for (int r = 0; r < late; ++r) {
      while (!file_exists(flag + std::to_string(r))) {
        EXPECT(Clock::now() - t0 < std::chrono::seconds(60), "rank %d never reported its %s failure", r,
               what);
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      }
    }
  }
  const auto t1 = Clock::now();
  int rc;
  if (c.late_at == 1) {
    rc = epa2a_layer_create(&cfg, &l);
    EXPECT(rc != EPA2A_OK && l == nullptr, "layer create passed although rank %d %s", late,
           rank == late ? "came after the others had given up" : "never came");
  } else {
    rc = epa2a_layer_destroy(l);
  }
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t1).count();
  const std::string msg = epa2a_last_error();
  EXPECT(rc == EPA2A_ERR_TIMEOUT, "%s returned %d, expected a timeout: %s", what, rc, msg.c_str());
  if (rank == late) {
    EXPECT(msg.find("gave up") != std::string::npos,
           "the late rank's error does not say its peers gave up: %s", msg.c_str());
    EXPECT(ms < 1000.0, "the late rank took %.0f ms to fail (its peers had given up already)", ms);
  } else {
    EXPECT(msg.find("rank " + std::to_string(late) + " did not arrive") != std::string::npos,
           "the error does not name rank %d: %s", late, msg.c_str());
    EXPECT(ms > 0.9 * deadline_ns / 1e6 && ms < deadline_ns / 1e6 + 1500.0,
           "the %s barrier failed after %.0f ms (deadline %.0f ms)", what, ms, deadline_ns / 1e6);
    touch(flag + std::to_string(rank));
  }
  if (c.late_at == 2)
    EXPECT(msg.find("collective destroy was skipped") != std::string::npos,
           "the destroy error does not say the collective part was skipped: %s", msg.c_str());
  res.msg = std::string(what) + " failed in " + std::to_string((int)ms) + " ms: " + msg.substr(0, 200) + "; ";
  CK(epa2a_set_collective_timeout(0));
  LayerGuard g;
  CK(epa2a_layer_create(&cfg, &g.l));
  run_steps(c, g.l, rank, stream, in, plan, 1, 0, res);
  res.msg += "then a new layer passed a checked step";
}

Result run_case(const ref::Case& c, int rank, void* stream, const std::string& dir) {
  Result res;
  res.name = c.name;
  std::vector<ref::RankInput> in = ref::make_inputs(c);
  const ref::Plan plan = ref::make_plan(c, in);
  if (c.late_at) {
    run_late_case(c, rank, stream, dir, in, plan, res);
    res.pass = true;
    return res;
  }
  epa2a_layer_config cfg = config_for(c, rank);
  LayerGuard g;
  CK(epa2a_layer_create(&cfg, &g.l));
  if (c.fault) {
    const int late = c.W - 1;
    if (rank == late) {
      // Never arrives at the step: waits until every other rank has seen its timeout, then rejoins.
      const auto t0 = Clock::now();
      for (int r = 0; r < late; ++r) {
        while (!file_exists(dir + "/fault_" + std::to_string(r))) {
          EXPECT(Clock::now() - t0 < std::chrono::seconds(60), "rank %d never reported its timeout", r);
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
      res.msg = "stayed away; ";
    } else {
      const auto t0 = Clock::now();
      std::vector<int32_t> ids(2 * c.K, 0);
      DevBuf d_ids(ids.size() * 4), d_tok((size_t)2 * c.H * c.tbytes());
      upload(d_ids.p, ids.data(), ids.size() * 4, stream);
      CK(epa2a_dispatch_prepare(g.l, d_tok.p, static_cast<const int32_t*>(d_ids.p), nullptr, nullptr, 2,
                                stream));
      int32_t mx = 0;
      const int rc = epa2a_dispatch_wait_sizes(g.l, 5000000000LL, &mx);
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
      const std::string msg = epa2a_last_error();
      EXPECT(rc == EPA2A_ERR_TIMEOUT, "expected a timeout, got %d: %s", rc, msg.c_str());
      EXPECT(msg.find("rank " + std::to_string(late)) != std::string::npos, "error does not name rank %d: %s",
             late, msg.c_str());
      EXPECT(ms < 300.0 + 1500.0, "timeout took %.0f ms (deadline 300 ms)", ms);
      // The GPU stays usable: the stream drains and copies work.
      const int rs = epa2a_layer_sync(g.l, stream);
      EXPECT(rs == EPA2A_ERR_TIMEOUT, "layer_sync after the fault returned %d", rs);
      CK(epa2a_device_sync());
      std::vector<int32_t> back(ids.size(), -1);
      download(back.data(), d_ids.p, back.size() * 4, stream);
      EXPECT(back == ids, "device copy after the fault returned wrong data");
      res.msg = "timed out in " + std::to_string((int)ms) + " ms: " + msg.substr(0, 160) + "; ";
      touch(dir + "/fault_" + std::to_string(rank));
    }
    CK(epa2a_layer_reset(g.l));
    run_steps(c, g.l, rank, stream, in, plan, 1, 0, res);  // the layer works again after the reset
    res.msg += "recovered after reset";
  } else {
    run_steps(c, g.l, rank, stream, in, plan, c.verify_iters, c.time_iters, res);
  }
  res.pass = true;
  return res;
}

int child_main(int W, bool big, int rank, const std::string& dir, uint64_t seed) {
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
  for (const ref::Case& c : cases_for(W, big, seed)) {
    Result r;
    try {
      r = run_case(c, rank, stream, dir);
    } catch (const std::exception& e) {
      r.name = c.name;
      r.pass = false;
      r.msg = e.what();
      fprintf(stderr, "[W=%d rank %d] %s: FAIL %s\n", W, rank, c.name.c_str(), e.what());
    }
    std::string msg = r.msg;
    std::replace(msg.begin(), msg.end(), '|', '/');
    std::replace(msg.begin(), msg.end(), '\n', ' ');
    out << r.name << "|" << (r.pass ? 1 : 0) << "|" << r.recv_max << "|" << r.disp_us << "|" << r.comb_us
        << "|" << r.max_err << "|" << r.disp_bytes << "|" << r.comb_bytes << "|" << msg << "\n";
    out.flush();
  }
  epa2a_stream_destroy(stream);
  if (epa2a_finalize() != EPA2A_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, epa2a_last_error());
    return 7;
  }
  return 0;
}

struct Row {
  std::string name;
  int W = 0, L = 0, type = 0, passed = 0, ranks = 0, recv_max = 0;
  double disp_us = 0, comb_us = 0, max_err = 0, disp_bytes = 0, comb_bytes = 0;
  std::string flags, msg;
};

// Device-to-device copy bandwidth (bytes read + written per second), the ceiling of a step on one GPU.
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
  std::sort(t.begin(), t.end());
  epa2a_device_free(a);
  epa2a_device_free(b);
  epa2a_event_destroy(e0);
  epa2a_event_destroy(e1);
  return 2.0 * bytes / (t[t.size() / 2] * 1e-3);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 7 && std::strcmp(argv[1], rank_process::kChildFlag) == 0)  // W big rank dir seed
    return child_main(std::stoi(argv[2]), std::strcmp(argv[3], "1") == 0, std::stoi(argv[4]), argv[5],
                      std::stoull(argv[6]));
  std::vector<std::string> groups = {"2", "4", "8"};
  if (argc > 1) {
    groups.clear();
    std::stringstream ss(argv[1]);
    std::string tok;
    while (std::getline(ss, tok, ',')) groups.push_back(tok);
  }
  const uint64_t seed = argc > 2 ? std::stoull(argv[2]) : 42;
  if (argc > 3) setenv("EPA2A_SMOKE_FILTER", argv[3], 1);  // only cases whose name contains it
  std::vector<Row> rows;
  bool all_ok = true;
  for (const std::string& group : groups) {
    const bool big = group == "big";
    const int W = big ? 8 : std::stoi(group);
    char tmpl[] = "/tmp/epa2a-smoke-XXXXXX";
    const std::string dir = mkdtemp(tmpl);
    std::vector<pid_t> pids;
    for (int r = 0; r < W; ++r) {
      pids.push_back(rank_process::start(
          {std::to_string(W), big ? "1" : "0", std::to_string(r), dir, std::to_string(seed)},
          [&] { return child_main(W, big, r, dir, seed); }));
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
      if (left > 0 &&
          Clock::now() - t0 > std::chrono::seconds(rank_process::group_limit_s(big ? 240 : 120))) {
        fprintf(stderr, "W=%d: ranks still running past the group's limit: killing them\n", W);
        for (int r = 0; r < W; ++r)
          if (status[r] == -1) kill(pids[r], SIGKILL);
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    std::map<std::string, Row> by_name;
    std::vector<std::string> order;
    for (const ref::Case& c : cases_for(W, big, seed)) {
      Row row;
      row.name = c.name;
      row.W = W;
      row.L = c.L;
      row.type = c.type;
      row.flags = std::string(c.local_combine ? "lc " : "") + (c.weighted ? "weighted " : "") +
                  (c.scatter ? "scatter " : "") +
                  (c.align > 1 ? "align" + std::to_string(c.align) + " " : "") +
                  (c.capacity == 1 ? "grow " : "");
      by_name[c.name] = row;
      order.push_back(c.name);
    }
    for (int r = 0; r < W; ++r) {
      if (status[r] != 0) fprintf(stderr, "W=%d rank %d exited with %d\n", W, r, status[r]);
      std::ifstream f(dir + "/result_" + std::to_string(r) + ".txt");
      std::string line;
      while (std::getline(f, line)) {
        std::vector<std::string> p;
        std::stringstream ls(line);
        std::string x;
        while (std::getline(ls, x, '|')) p.push_back(x);
        if (p.size() < 8 || !by_name.count(p[0])) continue;
        Row& row = by_name[p[0]];
        row.ranks++;
        row.passed += p[1] == "1";
        row.recv_max = std::max(row.recv_max, std::stoi(p[2]));
        if (r == 0) {
          row.disp_us = std::stod(p[3]);
          row.comb_us = std::stod(p[4]);
          row.disp_bytes = std::stod(p[6]);
          row.comb_bytes = std::stod(p[7]);
        }
        row.max_err = std::max(row.max_err, std::stod(p[5]));
        const std::string m = p.size() > 8 ? p[8] : "";
        if ((p[1] != "1" && row.msg.find("FAIL") == std::string::npos) || (row.msg.empty() && !m.empty()))
          row.msg =
              (p[1] != "1" ? "FAIL rank " + std::to_string(r) + ": " : "rank " + std::to_string(r) + ": ") +
              m;
      }
    }
    for (const std::string& name : order) {
      Row& row = by_name[name];
      row.ranks = W;  // a rank that wrote nothing counts as failed
      if (row.passed != W) all_ok = false;
      if (!row.msg.empty()) printf("W=%d %-34s %s\n", W, name.c_str(), row.msg.c_str());
      rows.push_back(row);
    }
  }
  const double bw = copy_bandwidth();  // the children are gone: CUDA in the parent is safe now
  printf(
      "\ncopy ceiling: %.2f TB/s (device-to-device, read + write); ceiling %% = (step bytes read + written "
      "by all ranks / copy ceiling) / measured time\n",
      bw / 1e12);
  const char* types[] = {"bf16", "fp16", "fp32"};
  printf(
      "\n| case | W | L | type | flags | max recv rows | dispatch us | ceiling %% | combine us | ceiling %% "
      "| max "
      "abs err | ranks ok |\n");
  printf("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
  int passed = 0, failed = 0;
  for (const Row& r : rows) {
    const bool ok = r.passed == r.ranks;
    (ok ? passed : failed)++;
    auto pct = [&](double bytes, double us) {
      return us > 0 && bw > 0 ? 100.0 * (bytes / bw) / (us * 1e-6) : 0.0;
    };
    printf("| %s | %d | %d | %s | %s | %d | %.1f | %.0f | %.1f | %.0f | %.3g | %d/%d %s |\n", r.name.c_str(),
           r.W, r.L, types[r.type], r.flags.c_str(), r.recv_max, r.disp_us, pct(r.disp_bytes, r.disp_us),
           r.comb_us, pct(r.comb_bytes, r.comb_us), r.max_err, r.passed, r.ranks, ok ? "PASS" : "FAIL");
  }
  printf("\n%d passed, %d failed\n", passed, failed);
  return all_ok ? 0 : 1;
}
