// A tiny CPU model of EpA2A's semantics for the smoke test: inputs from a seed, the deterministic row plan,
// the expert function, and the expected combine.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace ref {

struct Case {
  std::string name;
  int W = 2, L = 2, E = 8, K = 2, H = 256, max_tokens = 64;
  int type = 0;  // EPA2A_TOKEN_*
  int local_combine = 0, align = 1, capacity = 2;
  bool weights = false, scatter = false, weighted = false, zero_copy = false;
  bool skew = false;  // every token picks experts of rank 0 first (forces growth)
  double drop = 0.0;
  uint64_t seed = 1;
  int verify_iters = 2;  // steps checked against the model (and against each other: determinism)
  int time_iters = 10;   // steps timed back to back after a barrier, not checked
  int64_t timeout_ns = 5000000000LL;
  bool fault = false;  // the last rank never arrives at the first step
  int late_at = 0;     // the last rank comes late to a life-cycle barrier: 1 layer create, 2 layer destroy
  int tbytes() const { return type == 2 ? 4 : 2; }
};

struct RankInput {
  int n = 0;
  std::vector<uint8_t> tokens;   // [n, H] raw bits
  std::vector<int32_t> ids;      // [n, K]
  std::vector<float> weights;    // [n, K]
  std::vector<int32_t> scatter;  // [n, K] user scatter indices (global rows), when Case::scatter
};

struct Plan {
  std::vector<int> recv, offset, tokens;                // [W]
  std::vector<std::vector<int>> rows, padded, start;    // [W][Epr]
  std::vector<std::vector<int>> row;                    // [s][t*K+k]: row on its destination, -1 dropped
  std::vector<std::vector<std::array<int, 3>>> origin;  // [d][row]: (s, t, k) or (-1, -1, -1)
};

float to_float(int type, const uint8_t* p);
void from_float(int type, float f, uint8_t* p);

std::vector<RankInput> make_inputs(const Case& c);
// Deterministic plan; with Case::scatter, also fills every input's scatter indices (a random permutation of
// each destination's packed rows) and places rows where they point.
Plan make_plan(const Case& c, std::vector<RankInput>& in);
// The expert function: differs per expert, so a wrong local combine shows.
float expert_fn(int e, float x);
// Expected combine output of rank s as raw bits [n, H].
std::vector<uint8_t> expected_combine(const Case& c, const std::vector<RankInput>& in, int s);

}  // namespace ref
