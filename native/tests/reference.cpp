#include "reference.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace ref {

namespace {

struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 0x1234567ull) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int below(int n) { return (int)(next() % (uint64_t)n); }
  double unit() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
};

uint16_t f2bf(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

float bf2f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

float h2f(uint16_t h) {
  const uint32_t s = (h >> 15) & 1u, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  float f;
  if (e == 0)
    f = std::ldexp((float)m, -24);
  else if (e == 31)
    f = m ? NAN : INFINITY;
  else
    f = std::ldexp((float)(m | 0x400u), (int)e - 25);
  return s ? -f : f;
}

uint16_t f2h(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t s = (u >> 16) & 0x8000u;
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return (uint16_t)(s | 0x7e00u);
  if (u >= 0x477ff000u) return (uint16_t)(s | 0x7c00u);
  if (u < 0x38800000u) {  // below 2^-14: subnormal half
    float a;
    std::memcpy(&a, &u, 4);
    return (uint16_t)(s | (uint32_t)std::nearbyint(a * 16777216.0f));
  }
  const uint32_t e = (u >> 23) - 127 + 15, m = u & 0x7fffffu;
  uint32_t h = (e << 10) | (m >> 13);
  const uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return (uint16_t)(s | h);
}

}  // namespace

float to_float(int type, const uint8_t* p) {
  if (type == 2) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  uint16_t b;
  std::memcpy(&b, p, 2);
  return type == 0 ? bf2f(b) : h2f(b);
}

void from_float(int type, float f, uint8_t* p) {
  if (type == 2) {
    std::memcpy(p, &f, 4);
    return;
  }
  const uint16_t b = type == 0 ? f2bf(f) : f2h(f);
  std::memcpy(p, &b, 2);
}

std::vector<RankInput> make_inputs(const Case& c) {
  std::vector<RankInput> in(c.W);
  const int tb = c.tbytes();
  const int epr = c.E / c.W;
  for (int s = 0; s < c.W; ++s) {
    Rng rng(c.seed * 1000003ull + (uint64_t)s);
    RankInput& r = in[s];
    r.n = 1 + rng.below(c.max_tokens);
    if (s == 0 && c.max_tokens > 1) r.n = c.max_tokens;  // the full size at least once
    r.tokens.resize((size_t)r.n * c.H * tb);
    for (size_t i = 0; i < (size_t)r.n * c.H; ++i)
      from_float(c.type, (float)(rng.unit() * 4.0 - 2.0), &r.tokens[i * tb]);
    r.ids.resize((size_t)r.n * c.K);
    r.weights.resize((size_t)r.n * c.K);
    for (int t = 0; t < r.n; ++t) {
      // K distinct experts (a router's top-k), some dropped.
      std::vector<int> pick;
      while ((int)pick.size() < c.K) {
        int e = rng.below(c.E);
        if (c.skew) e = rng.below(epr);  // every pick on rank 0 (needs epr >= K)
        if (std::find(pick.begin(), pick.end(), e) == pick.end()) pick.push_back(e);
      }
      for (int k = 0; k < c.K; ++k) {
        const bool dropped = rng.unit() < c.drop;
        r.ids[(size_t)t * c.K + k] = dropped ? c.E : pick[k];
        r.weights[(size_t)t * c.K + k] = (float)(1 + rng.below(1023)) / 1024.0f;
      }
    }
  }
  return in;
}

Plan make_plan(const Case& c, std::vector<RankInput>& in) {
  const int W = c.W, E = c.E, K = c.K, epr = E / W;
  const int align = c.scatter ? 1 : c.align;
  Plan p;
  p.recv.assign(W, 0);
  p.offset.assign(W, 0);
  p.tokens.assign(W, 0);
  p.rows.assign(W, std::vector<int>(epr, 0));
  p.padded = p.rows;
  p.start = p.rows;
  p.row.resize(W);
  p.origin.resize(W);
  for (int s = 0; s < W; ++s) {
    p.tokens[s] = in[s].n;
    p.row[s].assign((size_t)in[s].n * K, -1);
  }
  for (int d = 0; d < W; ++d) {
    int row = 0;
    for (int j = 0; j < epr; ++j) {
      const int e = d * epr + j;
      p.start[d][j] = row;
      int n = 0;
      for (int s = 0; s < W; ++s)
        for (int t = 0; t < in[s].n; ++t)
          for (int k = 0; k < K; ++k)
            if (in[s].ids[(size_t)t * K + k] == e) {
              p.row[s][(size_t)t * K + k] = row + n;
              ++n;
            }
      p.rows[d][j] = n;
      p.padded[d][j] = (n + align - 1) / align * align;
      row += p.padded[d][j];
    }
    p.recv[d] = row;
    p.origin[d].assign(row, {-1, -1, -1});
  }
  for (int d = 1; d < W; ++d) p.offset[d] = p.offset[d - 1] + p.recv[d - 1];
  std::vector<std::vector<int>> perm(W);
  for (int d = 0; d < W; ++d) {
    perm[d].resize(p.recv[d]);
    for (int i = 0; i < p.recv[d]; ++i) perm[d][i] = i;
    if (c.scatter) {
      Rng rng(c.seed * 7919ull + (uint64_t)d);
      for (int i = p.recv[d] - 1; i > 0; --i) std::swap(perm[d][i], perm[d][rng.below(i + 1)]);
    }
  }
  for (int s = 0; s < W; ++s) {
    if (c.scatter) in[s].scatter.assign((size_t)in[s].n * K, -1);
    for (int t = 0; t < in[s].n; ++t)
      for (int k = 0; k < K; ++k) {
        const size_t i = (size_t)t * K + k;
        const int e = in[s].ids[i];
        if (e >= E) continue;
        const int d = e / epr;
        const int r = perm[d][p.row[s][i]];
        p.row[s][i] = r;
        p.origin[d][r] = {s, t, k};
        if (c.scatter) in[s].scatter[i] = p.offset[d] + r;
      }
  }
  return p;
}

float expert_fn(int e, float x) {
  return x * (0.5f + 0.25f * (float)(e % 7)) + 0.125f * (float)((e % 5) - 2);
}

std::vector<uint8_t> expected_combine(const Case& c, const std::vector<RankInput>& in, int s) {
  const int tb = c.tbytes();
  const RankInput& r = in[s];
  std::vector<uint8_t> out((size_t)r.n * c.H * tb);
  std::vector<uint8_t> y(tb);
  for (int t = 0; t < r.n; ++t)
    for (int h = 0; h < c.H; ++h) {
      const float x = to_float(c.type, &r.tokens[((size_t)t * c.H + h) * tb]);
      float acc = 0.f;
      for (int k = 0; k < c.K; ++k) {
        const int e = r.ids[(size_t)t * c.K + k];
        if (e >= c.E) continue;
        from_float(c.type, expert_fn(e, x), y.data());  // the expert output is rounded to the token type
        const float w = c.weighted ? r.weights[(size_t)t * c.K + k] : 1.f;
        acc += w * to_float(c.type, y.data());
      }
      from_float(c.type, acc, &out[((size_t)t * c.H + h) * tb]);
    }
  return out;
}

}  // namespace ref
