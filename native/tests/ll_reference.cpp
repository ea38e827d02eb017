#include "ll_reference.h"

#include <cmath>
#include <cstring>

namespace llref {

namespace {

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x5bd1e995ull) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int below(int n) { return (int)(next() % (uint64_t)n); }
  double unit() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// The 127 non-negative finite e4m3 values, by code 0x00..0x7E.
struct E4m3Table {
  float v[127];
  E4m3Table() {
    for (int code = 0; code < 127; ++code) {
      const int e = code >> 3, m = code & 7;
      v[code] = e == 0 ? std::ldexp((float)m, -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
    }
  }
};

const E4m3Table& table() {
  static const E4m3Table t;
  return t;
}

}  // namespace

float bf16_to_float(uint16_t b) {
  return bits_to_float((uint32_t)b << 16);
}

uint16_t float_to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

uint8_t to_e4m3(float v) {
  if (std::isnan(v)) return 0x7F;
  const uint8_t sign = std::signbit(v) ? 0x80 : 0;
  const double a = std::fabs((double)v);
  const E4m3Table& t = table();
  int best = 0;
  double best_d = a;  // distance to code 0 (value 0)
  for (int code = 1; code < 127; ++code) {
    const double d = std::fabs(a - (double)t.v[code]);
    if (d < best_d || (d == best_d && (code & 1) == 0)) {
      best = code;
      best_d = d;
    }
  }
  return (uint8_t)(sign | best);
}

float group_scale(const uint16_t* x, bool pow2) {
  float amax = 0.f;
  for (int i = 0; i < 128; ++i) amax = std::fmax(amax, std::fabs(bf16_to_float(x[i])));
  if (amax == 0.f) return 1.f;
  const float q = amax / 448.0f;
  if (!pow2) return q;
  if (std::fpclassify(q) == FP_SUBNORMAL) return std::ldexp(1.0f, -126);
  int e = 0;
  const float m = std::frexp(q, &e);  // q = m * 2^e, m in [0.5, 1)
  return m == 0.5f ? q : std::ldexp(1.0f, e);
}

std::vector<RankInput> make_inputs(const Shape& s, uint64_t seed, int fixed_n, double drop, bool skew,
                                   int bad_rank) {
  std::vector<RankInput> in(s.W);
  for (int r = 0; r < s.W; ++r) {
    Rng rng(seed * 1000003ull + (uint64_t)r);
    RankInput& x = in[r];
    x.n = fixed_n >= 0 ? fixed_n : 1 + rng.below(s.M);
    x.x.resize((size_t)x.n * s.H);
    for (auto& v : x.x) {
      // Magnitudes over several binades, both signs, an occasional zero group element.
      const double mag = std::ldexp(0.5 + rng.unit(), rng.below(12) - 6);
      const float f = rng.below(64) == 0 ? 0.f : (float)(rng.below(2) ? mag : -mag);
      v = float_to_bf16(f);
    }
    x.ids.resize((size_t)x.n * s.K);
    x.weights.resize((size_t)x.n * s.K);
    for (int i = 0; i < x.n * s.K; ++i) {
      int e;
      if (rng.unit() < drop) {
        e = s.E;
      } else if (skew) {
        // P(e) ~ 1 / (e + 1): the low experts (rank 0's) get most entries.
        const double u = rng.unit();
        e = (int)std::floor(std::pow((double)s.E + 1.0, u)) - 1;
        if (e < 0) e = 0;
        if (e >= s.E) e = s.E - 1;
      } else {
        e = rng.below(s.E);
      }
      x.ids[i] = e;
      x.weights[i] = (float)(0.1 + rng.unit());
    }
    if (r == bad_rank && x.n > 0) x.ids[(size_t)rng.below(x.n * s.K)] = s.E + 3;
    // One all-zero group now and then (its scale must be 1).
    if (s.H >= 128 && rng.below(4) == 0) {
      const int t = rng.below(x.n), g = rng.below(s.H / 128);
      for (int i = 0; i < 128; ++i) x.x[(size_t)t * s.H + g * 128 + i] = 0;
    }
  }
  return in;
}

Expected expected_layout(const Shape& s, const std::vector<RankInput>& in, int r) {
  const int epr = s.E / s.W;
  Expected x;
  x.rows.assign(epr, 0);
  x.origins.assign(epr, {});
  for (int j = 0; j < epr; ++j) {
    const int e = r * epr + j;
    for (int src = 0; src < s.W; ++src)
      for (int t = 0; t < in[src].n; ++t)
        for (int k = 0; k < s.K; ++k)
          if (in[src].ids[(size_t)t * s.K + k] == e) x.origins[j].push_back({src, t, k});
    if ((int)x.origins[j].size() > s.W * s.M) x.origins[j].resize((size_t)s.W * s.M);
    x.rows[j] = (int32_t)x.origins[j].size();
  }
  return x;
}

std::vector<uint8_t> past_capacity(const Shape& s, const std::vector<RankInput>& in, int src) {
  std::vector<uint8_t> past((size_t)in[src].n * s.K, 0);
  std::vector<int> seen(s.E, 0);
  for (int r = 0; r < s.W; ++r)
    for (int t = 0; t < in[r].n; ++t)
      for (int k = 0; k < s.K; ++k) {
        const int e = in[r].ids[(size_t)t * s.K + k];
        if (e < 0 || e >= s.E) continue;
        if (seen[e]++ >= s.W * s.M && r == src) past[(size_t)t * s.K + k] = 1;
      }
  return past;
}

void pile_on_expert0(std::vector<RankInput>& in, int K) {
  for (RankInput& x : in)
    for (int i = 0; i < x.n * K; ++i) x.ids[i] = 0;
}

uint16_t expert_value(uint64_t seed, int e, int s, int t, int k, int h) {
  Rng rng(seed ^ ((uint64_t)e << 40) ^ ((uint64_t)s << 32) ^ ((uint64_t)t << 12) ^ ((uint64_t)k << 7) ^
          ((uint64_t)h * 0x2545F4914F6CDD1Dull));
  const double mag = std::ldexp(0.5 + rng.unit(), rng.below(6) - 3);
  return float_to_bf16((float)(rng.below(2) ? mag : -mag));
}

std::vector<uint16_t> expected_combine(const Shape& s, const std::vector<RankInput>& in, int src,
                                       bool weighted, uint64_t expert_seed) {
  const RankInput& x = in[src];
  const std::vector<uint8_t> past = past_capacity(s, in, src);
  std::vector<uint16_t> out((size_t)x.n * s.H);
  for (int t = 0; t < x.n; ++t) {
    for (int h = 0; h < s.H; ++h) {
      float acc = 0.f;
      for (int k = 0; k < s.K; ++k) {
        const int e = x.ids[(size_t)t * s.K + k];
        if (e < 0 || e >= s.E || past[(size_t)t * s.K + k]) continue;
        const float w = weighted ? x.weights[(size_t)t * s.K + k] : 1.f;
        const float prod = w * bf16_to_float(expert_value(expert_seed, e, src, t, k, h));
        acc = acc + prod;
      }
      out[(size_t)t * s.H + h] = float_to_bf16(acc);
    }
  }
  return out;
}

}  // namespace llref
