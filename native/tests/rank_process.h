// How the smoke tests start their rank processes. By default a rank is a fork of the test that runs the rank's
// function. With EPA2A_RANK_WRAPPER set (a command line such as
// "compute-sanitizer --tool racecheck --log-file /tmp/rank-%p.log"), the fork instead executes this program again
// under that command, with "--rank-child" and the rank's arguments: a tool that follows new programs (and writes
// one summary per process) then sees every rank's kernels, which it does not for a plain fork.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace rank_process {

constexpr const char* kChildFlag = "--rank-child";

// Starts one rank and returns the child's pid (the test exits when it cannot fork). `run` is the rank's function for the plain fork; `args` are
// the arguments main() parses after kChildFlag to call the same function in the executed program.
template <typename Run>
pid_t start(const std::vector<std::string>& args, Run run) {
  const char* wrapper = std::getenv("EPA2A_RANK_WRAPPER");
  std::string self;
  if (wrapper != nullptr && wrapper[0] != '\0') {
    char path[4096];
    const ssize_t n = readlink("/proc/self/exe", path, sizeof(path) - 1);
    if (n > 0)
      self.assign(path, static_cast<size_t>(n));
    else
      perror("EPA2A_RANK_WRAPPER ignored: readlink /proc/self/exe");
  }
  const pid_t pid = fork();
  if (pid < 0) {
    perror("fork");
    std::exit(1);
  }
  if (pid != 0) return pid;
  if (self.empty()) _exit(run());
  // sh -c 'exec <wrapper> "$@"' sh <self> --rank-child <args>: the wrapper is split by the shell, the arguments
  // are passed through untouched.
  const std::string script = std::string("exec ") + wrapper + " \"$@\"";
  std::vector<std::string> all = {"/bin/sh", "-c", script, "sh", self, kChildFlag};
  all.insert(all.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : all) argv.push_back(a.data());
  argv.push_back(nullptr);
  execv("/bin/sh", argv.data());
  _exit(127);
}

// Seconds a group's ranks may run before the test kills them: EPA2A_SMOKE_LIMIT_S where set (a sanitized rank
// runs 10-100x slower), else the test's own value.
inline int group_limit_s(int fallback) {
  const char* s = std::getenv("EPA2A_SMOKE_LIMIT_S");
  return s != nullptr && std::atoi(s) > 0 ? std::atoi(s) : fallback;
}

}  // namespace rank_process
