// A small persistent thread pool. Work is split into items claimed dynamically;
// each call gets the worker index so callers can keep per-thread scratch space
// (im2col tiles, gradient partials) without locks.
#pragma once
#include <cstdint>
#include <functional>
#include <string>

namespace cmseg {

// The most threads the pool runs (set_num_threads and CMSEG_NUM_THREADS).
constexpr int kMaxThreads = 1024;

// Number of threads used by parallel_for: it starts at default_threads() (a
// CMSEG_NUM_THREADS that is not an integer in 1..kMaxThreads gets a warning on stderr).
int num_threads();

// The pool's starting size and why: CMSEG_NUM_THREADS when it is an integer in
// 1..kMaxThreads, else the CPUs this process can keep busy (usable_cpus() in backend.hpp:
// the cores, fewer under an affinity mask or a cgroup CPU quota).
struct ThreadDefault {
  int threads = 1;
  std::string why;
  int usable_cpus = 1;      // usable_cpus().cpus, read once for both
  std::string ignored_env;  // a CMSEG_NUM_THREADS that is not a count (warned about once)
};
ThreadDefault default_threads();
// n is clamped to 1..kMaxThreads. When the system refuses to start some of the
// threads the pool runs with those it started (a warning on stderr); num_threads()
// says how many that is.
void set_num_threads(int n);

// Calls that use the pool from a thread of their own (the addon's async workers) say so
// with begin_pool_call() before they are queued and end_pool_call() once they are done.
// While any is in flight, try_set_num_threads() leaves the pool alone and returns that
// count (0: resized). Layers size per-part scratch by the thread count and then split the
// work by it again: a pool resized between the two, under a running call, would hand out
// part indices past that scratch's end.
void begin_pool_call();
void end_pool_call();
int try_set_num_threads(int n);

// CMSEG_NUM_THREADS's syntax: the integer in `text` when it is one in
// 1..kMaxThreads (surrounding spaces allowed), else 0.
int parse_thread_count(const char* text);

// Runs fn(item, thread) for item in [0, items). Calls made from inside a worker
// run serially on that worker (no nested parallelism).
void parallel_for(int64_t items, const std::function<void(int64_t item, int thread)>& fn);

// Deterministic reductions: [0, items) is split into num_threads() contiguous
// parts, each run in order by one worker; fn(item, part). Per-part partial sums
// combined in part order give the same float result on every run (for a given
// thread count), unlike per-thread partials under dynamic scheduling.
void parallel_for_static(int64_t items, const std::function<void(int64_t item, int part)>& fn);
int static_parts(int64_t items);

// Splits [0, n) into about one contiguous range per thread: fn(begin, end, thread).
void parallel_range(int64_t n, const std::function<void(int64_t begin, int64_t end, int thread)>& fn);

}  // namespace cmseg
