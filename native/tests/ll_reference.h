// A CPU model of the low-latency layer (gpu-feedback/LL-DESIGN.md), written apart from the kernels: seeded
// inputs, an fp8 quantizer that picks the nearest of the finite e4m3 values, the compact receive layout, and
// the weighted combine.
#pragma once

#include <cstdint>
#include <vector>

namespace llref {

struct Shape {
  int W = 2, E = 8, K = 2, H = 256, M = 64;
};

struct RankInput {
  int n = 0;
  std::vector<uint16_t> x;     // [n, H] bf16 bits
  std::vector<int32_t> ids;    // [n, K]; E = dropped; (rarely) a bad id when bad_ids is set
  std::vector<float> weights;  // [n, K]
};

// Fresh inputs of every rank for one step. n is drawn in [1, M] unless fixed_n >= 0; drop = chance of a
// dropped slot; skew: expert ids drawn from a Zipf-like law; bad_rank >= 0: that rank gets one id E + 3.
std::vector<RankInput> make_inputs(const Shape& s, uint64_t seed, int fixed_n, double drop, bool skew,
                                   int bad_rank);

float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);  // round to nearest even
// e4m3 code of v: nearest finite value, ties to the even code, |v| > 448 saturates, NaN -> 0x7F.
uint8_t to_e4m3(float v);
// Scale of one 128-channel group: amax / 448 (or the next power of two >= it), 1 when amax is 0.
float group_scale(const uint16_t* x, bool pow2);

// One received row: where it came from.
struct Origin {
  int s, t, k;
};

struct Expected {
  std::vector<int32_t> rows;                 // [Epr] rows per local expert
  std::vector<std::vector<Origin>> origins;  // [Epr][row]
};

// The receive layout of rank r: inside local expert j, rows by (source, token, k); at most W*M rows an expert
// (the rest are dropped: only a token that lists one expert many times can get there).
Expected expected_layout(const Shape& s, const std::vector<RankInput>& in, int r);

// [n*K] of rank src: 1 where the entry fell past its expert's W*M rows on the destination (dropped there;
// only a token that lists one expert many times can get there).
std::vector<uint8_t> past_capacity(const Shape& s, const std::vector<RankInput>& in, int src);

// Every token of every rank lists expert 0 in each of its K slots: expert 0 overflows its W*M rows.
void pile_on_expert0(std::vector<RankInput>& in, int K);

// [n*K] of rank src: 1 where the entry fell past its expert's W*M rows on the destination (dropped there).
std::vector<uint8_t> past_capacity(const Shape& s, const std::vector<RankInput>& in, int src);

// What the test's expert returns for the row of (expert e, source s, token t, k) at channel h (bf16 bits).
uint16_t expert_value(uint64_t seed, int e, int s, int t, int k, int h);

// Expected combine on rank src: [n, H] bf16 bits; weighted or plain sums in fp32, k order, one rounding.
std::vector<uint16_t> expected_combine(const Shape& s, const std::vector<RankInput>& in, int src,
                                       bool weighted, uint64_t expert_seed);

}  // namespace llref
