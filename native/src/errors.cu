// The last-error message of each thread, and the formatting of device error records.
#include <cstdarg>
#include <cstdio>

#include "internal.h"

namespace {
thread_local std::string g_last_error;
}

namespace epa2a {

int fail(int code, const char* fn, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  g_last_error = std::string(fn) + ": " + buf;
  return code;
}

int cuda_fail(cudaError_t err, const char* fn, const char* expr) {
  return fail(EPA2A_ERR_CUDA, fn, "%s failed: %s (%s)", expr, cudaGetErrorName(err), cudaGetErrorString(err));
}

const char* phase_name(int phase) {
  switch (phase) {
    case EPA2A_PHASE_COUNT:
      return "counting expert ids";
    case EPA2A_PHASE_EXCHANGE:
      return "waiting for a peer's expert counts";
    case EPA2A_PHASE_ASSIGN:
      return "assigning rows";
    case EPA2A_PHASE_DISPATCH:
      return "sending tokens";
    case EPA2A_PHASE_FORWARD:
      return "waiting for a token put from another node";
    case EPA2A_PHASE_BARRIER:
      return "waiting at a layer barrier";
    case EPA2A_PHASE_EXPAND:
      return "expanding local-combine rows";
    case EPA2A_PHASE_COMBINE:
      return "combining";
    case EPA2A_PHASE_COMBINE_REMOTE:
      return "waiting for a partial sum from another node";
    default:
      return "unknown phase";
  }
}

static const char* slot_name(int slot) {
  switch (slot) {
    case EPA2A_SLOT_COUNTS:
      return "counts";
    case EPA2A_SLOT_DISPATCH_DONE:
      return "dispatch-done";
    case EPA2A_SLOT_COMBINE_READY:
      return "combine-ready";
    case EPA2A_SLOT_BARRIER_ALL:
      return "barrier-all";
    case EPA2A_SLOT_BARRIER_NODE:
      return "barrier-node";
    case EPA2A_SLOT_LIFECYCLE:
      return "life-cycle";
    default:
      return "?";
  }
}

int status_fail(const epa2a_status& s, const char* fn) {
  switch (s.code) {
    case EPA2A_ERR_TIMEOUT:
    case EPA2A_ERR_ABORTED: {
      const char* what = s.code == EPA2A_ERR_TIMEOUT ? "timed out" : "aborted";
      if (s.phase == EPA2A_PHASE_BARRIER)
        return fail(s.code, fn,
                    "rank %d %s after %.1f ms waiting for rank %d at the %s barrier (signal expected %lld, "
                    "saw %lld)",
                    s.rank, what, s.waited_ns / 1e6, s.peer, slot_name(s.index), (long long)s.expected,
                    (long long)s.observed);
      return fail(
          s.code, fn,
          "rank %d %s after %.1f ms waiting for rank %d while %s (index %d; signal expected %lld, saw "
          "%lld)",
          s.rank, what, s.waited_ns / 1e6, s.peer, phase_name(s.phase), s.index, (long long)s.expected,
          (long long)s.observed);
    }
    case EPA2A_ERR_BAD_EXPERT_ID:
      return fail(s.code, fn,
                  "rank %d: expert id %d at (token, k) entry %d is outside [0, num_experts]; the entry was "
                  "dropped",
                  s.rank, s.value, s.index);
    case EPA2A_ERR_BAD_SCATTER_INDEX:
      return fail(
          s.code, fn,
          "rank %d: scatter index %d at (token, k) entry %d is outside the rows of destination rank %d",
          s.rank, s.value, s.index, s.peer);
    case EPA2A_ERR_CAPACITY:
      return fail(
          s.code, fn,
          "rank %d: rank %d receives %d rows but the fixed-capacity buffers hold %lld; nothing was sent "
          "(every rank saw the same counts and stopped); create the layer with a larger capacity",
          s.rank, s.peer, s.value, (long long)s.expected);
    case EPA2A_ERR_PEER_REJECTED:
      return fail(
          s.code, fn,
          "rank %d: rank %d rejected its input for this step (seen while %s); the step failed, the layer "
          "is ready for the next step",
          s.rank, s.peer, phase_name(s.phase));
    case EPA2A_ERR_BAD_ROW:
      return fail(s.code, fn, "rank %d: row %d (index %d, peer %d) failed its bounds check while %s", s.rank,
                  s.value, s.index, s.peer, phase_name(s.phase));
    default:
      return fail(s.code, fn, "rank %d: device error %d while %s (peer %d, index %d, value %d)", s.rank,
                  s.code, phase_name(s.phase), s.peer, s.index, s.value);
  }
}

}  // namespace epa2a

extern "C" EPA2A_API const char* epa2a_last_error(void) {
  return g_last_error.c_str();
}

extern "C" EPA2A_API int epa2a_version(int32_t* major, int32_t* minor) {
  if (major) *major = EPA2A_VERSION_MAJOR;
  if (minor) *minor = EPA2A_VERSION_MINOR;
  return EPA2A_OK;
}
