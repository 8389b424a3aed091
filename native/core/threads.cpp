#include "cmseg/threads.hpp"

#include "cmseg/backend.hpp"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace cmseg {
namespace {

thread_local bool tl_in_worker = false;

class Pool {
 public:
  explicit Pool(int n) { resize(n); }
  ~Pool() { stop(); }

  int size() const { return size_; }

  // Starts n - 1 workers (the caller is thread 0). When the system refuses a thread
  // (std::system_error: a process or memory limit), the pool keeps the ones it got
  // and says so on stderr instead of letting the exception end the process.
  void resize(int n) {
    std::lock_guard<std::mutex> dispatch(dispatch_mu_);
    stop();
    const int want = std::max(1, std::min(n, kMaxThreads));
    quit_ = false;
    for (int i = 1; i < want; ++i) {
      try {
        workers_.emplace_back([this, i] { loop(i); });
      } catch (const std::exception& e) {
        std::fprintf(stderr, "cmseg: warning: could start only %d of %d threads (%s); using %d\n",
                     (int)workers_.size() + 1, want, e.what(), (int)workers_.size() + 1);
        break;
      }
    }
    size_ = (int)workers_.size() + 1;
  }

  void run(int64_t items, const std::function<void(int64_t, int)>& fn) {
    if (items <= 0) return;
    if (tl_in_worker || size_ == 1 || items == 1) {
      for (int64_t i = 0; i < items; ++i) fn(i, 0);
      return;
    }
    // One job at a time: two models stepping in two Node worker threads share the pool.
    std::lock_guard<std::mutex> dispatch(dispatch_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      items_ = items;
      next_.store(0);
      active_ = size_ - 1;
      ++generation_;
      error_ = nullptr;
    }
    cv_.notify_all();
    tl_in_worker = true;
    work(0);
    tl_in_worker = false;
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int thread) {
    for (;;) {
      int64_t i = next_.fetch_add(1);
      if (i >= items_) break;
      try {
        (*fn_)(i, thread);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(items_);
      }
    }
  }

  void loop(int thread) {
    tl_in_worker = true;
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return quit_ || generation_ != seen; });
        if (quit_) return;
        seen = generation_;
      }
      work(thread);
      std::lock_guard<std::mutex> lk(mu_);
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      quit_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int size_ = 1;
  std::vector<std::thread> workers_;
  std::mutex dispatch_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t, int)>* fn_ = nullptr;
  int64_t items_ = 0;
  std::atomic<int64_t> next_{0};
  int active_ = 0;
  uint64_t generation_ = 0;
  bool quit_ = false;
  std::exception_ptr error_;
};

}  // namespace

int parse_thread_count(const char* text) {
  if (!text) return 0;
  while (std::isspace((unsigned char)*text)) ++text;
  if (!std::isdigit((unsigned char)*text) && *text != '+') return 0;  // no sign, no empty string
  char* end = nullptr;
  errno = 0;
  const long n = std::strtol(text, &end, 10);
  if (errno || end == text) return 0;
  while (std::isspace((unsigned char)*end)) ++end;
  if (*end != '\0' || n < 1 || n > kMaxThreads) return 0;
  return (int)n;
}

ThreadDefault default_threads() {
  const UsableCpus u = usable_cpus();
  const int cpus = std::min(u.cpus, kMaxThreads);
  const std::string usable =
      u.limited_by.empty() ? "the machine's " + std::to_string(u.cores) + " cores" : u.limited_by;
  ThreadDefault d;
  d.usable_cpus = u.cpus;
  d.threads = cpus, d.why = usable;
  const char* env = std::getenv("CMSEG_NUM_THREADS");
  if (!env || !*env) return d;  // unset or empty
  if (const int n = parse_thread_count(env)) {
    d.threads = n, d.why = std::string("CMSEG_NUM_THREADS=") + std::to_string(n);
    return d;
  }
  d.ignored_env = env;
  d.why = usable + " (CMSEG_NUM_THREADS='" + env + "' ignored: not an integer in 1.." + std::to_string(kMaxThreads) + ")";
  return d;
}

namespace {

// The pool is made once, at its first use; a CMSEG_NUM_THREADS it cannot read is said
// then, once, on stderr.
int starting_threads() {
  const ThreadDefault d = default_threads();
  if (!d.ignored_env.empty())
    std::fprintf(stderr,
                 "cmseg: warning: ignoring CMSEG_NUM_THREADS='%s' (not an integer in 1..%d); using %s instead\n",
                 d.ignored_env.c_str(), kMaxThreads,
                 d.threads == 1 ? "1 thread (one usable CPU)"
                                : (std::to_string(d.threads) + " threads (every usable CPU)").c_str());
  return d.threads;
}

Pool& pool() {
  static Pool p(starting_threads());
  return p;
}

}  // namespace

int num_threads() { return pool().size(); }
void set_num_threads(int n) { pool().resize(n); }

namespace {
std::mutex calls_mu;  // orders a resize against calls starting (threads.hpp)
int calls_in_flight = 0;
}  // namespace

void begin_pool_call() {
  std::lock_guard<std::mutex> lk(calls_mu);
  ++calls_in_flight;
}

void end_pool_call() {
  std::lock_guard<std::mutex> lk(calls_mu);
  --calls_in_flight;
}

int try_set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(calls_mu);  // no call starts while the pool is resized
  if (calls_in_flight > 0) return calls_in_flight;
  pool().resize(n);
  return 0;
}

void parallel_for(int64_t items, const std::function<void(int64_t, int)>& fn) { pool().run(items, fn); }

int static_parts(int64_t items) {
  return (int)std::max<int64_t>(1, std::min<int64_t>(items, tl_in_worker ? 1 : num_threads()));
}

void parallel_for_static(int64_t items, const std::function<void(int64_t, int)>& fn) {
  if (items <= 0) return;
  const int64_t parts = static_parts(items);
  pool().run(parts, [&](int64_t p, int) {
    const int64_t b = items * p / parts, e = items * (p + 1) / parts;
    for (int64_t i = b; i < e; ++i) fn(i, (int)p);
  });
}

void parallel_range(int64_t n, const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  int64_t parts = std::min<int64_t>(n, tl_in_worker ? 1 : num_threads());
  pool().run(parts, [&](int64_t p, int thread) {
    int64_t b = n * p / parts, e = n * (p + 1) / parts;
    if (b < e) fn(b, e, thread);
  });
}

}  // namespace cmseg
