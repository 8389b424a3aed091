// The host side of simt_cuda.hpp: blocks of fibers, "device" memory, the runtime's
// bookkeeping calls, and cuBLAS's two GEMMs.
//
// A block's CUDA threads are fibers on the launching host thread, run in
// passes: each runnable fiber runs until it reaches a barrier or returns. After a pass,
// a warp whose live lanes all wait at a shuffle goes on, else the block goes on when
// every live thread waits at __syncthreads; threads that returned drop out (as on a
// GPU). A warp whose lanes wait at different places (some at a shuffle, some at
// __syncthreads) is a deadlock or undefined on a GPU, reported as a launch failure, as
// is a shuffle reading a lane that returned or does not exist. (A __syncthreads that
// only some threads reach, the others returning, goes on: so does a GPU's barrier.) The
// passes alternate direction, so a read of shared memory that a missing barrier leaves
// unordered sees the wrong value whichever thread writes it (odd blocks start with a
// backward pass, for a kernel that has no barrier at all).
#include <ucontext.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "simt_cuda.hpp"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#include <sanitizer/common_interface_defs.h>
#define SIMT_ASAN 1
#endif
#endif

namespace simt {
namespace {

// ---- switching stacks ----------------------------------------------------------------
// x86-64: the six callee-saved registers pushed on the stack being left, its stack pointer
// stored and the other's loaded. swapcontext also saves and restores the signal mask, two
// system calls a switch that took most of the emulation's time; elsewhere it is used.
#if defined(__x86_64__) && defined(__linux__)
extern "C" void simt_switch_stack(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl simt_switch_stack
  .type simt_switch_stack, @function
simt_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size simt_switch_stack, .-simt_switch_stack
)");
struct Context {
  void* sp = nullptr;
};
void switch_to(Context& from, Context& to) { simt_switch_stack(&from.sp, to.sp); }
// The first switch to c "returns" into entry, with the stack aligned as after a call.
void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  const uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + size) & ~uintptr_t(15);
  void** frame = reinterpret_cast<void**>(top - 16);
  frame[0] = reinterpret_cast<void*>(entry);
  frame[1] = nullptr;  // entry's own return address: it never returns
  for (int k = 1; k <= 6; ++k) frame[-k] = nullptr;  // the registers the switch pops
  c.sp = frame - 6;
}
#else
struct Context {
  ucontext_t uc;
};
void switch_to(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
void start_context(Context& c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

constexpr size_t kFiberStack = size_t(128) << 10;  // a kernel's frames, with the sanitizer's redzones

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// One cp.async: its destination (an offset into the block's dynamic shared memory), its
// source, the bytes it copies and the bytes it reads (the rest zero-filled).
struct AsyncCopy {
  unsigned dst;
  const void* src;
  int bytes, read;
};

struct Fiber {
  Context ctx;
  std::vector<AsyncCopy> open;                   // issued since the last commit
  std::vector<std::vector<AsyncCopy>> committed;  // groups in commit order, not yet waited for
  std::unique_ptr<char[]> stack{new char[kFiberStack]};
  State state = State::Done;
  Place place;
  void* fake_stack = nullptr;  // AddressSanitizer's, kept across switches
};

struct BlockRun {
  int threads;
  std::vector<uint64_t> lanes;  // one shuffle slot per thread
  std::vector<double> dynamic;  // the launch's dynamic shared memory (8-byte aligned)
  std::vector<const void*> poisoned;  // static __shared__ objects this block has poisoned
  std::vector<std::array<uint32_t, 6>> mma_in;  // each lane's A and B fragments at an mma.sync
  const std::function<void()>* body;
  Context scheduler;
  std::string failure;
  BlockRun(int n, size_t smem_bytes, const std::function<void()>* b)
      : threads(n), lanes((size_t)n), dynamic((smem_bytes + 7) / 8), mma_in((size_t)n), body(b) {
    // Poisoned like device memory: a slot read before any thread wrote it is a NaN.
    if (!dynamic.empty()) std::memset(dynamic.data(), 0xff, dynamic.size() * sizeof(double));
  }
};

std::vector<std::unique_ptr<Fiber>> g_fibers;  // reused from block to block
BlockRun* g_block = nullptr;
Fiber* g_fiber = nullptr;
const void* g_host_stack = nullptr;  // the launching thread's stack, for the sanitizer
size_t g_host_stack_size = 0;
std::mutex g_launch;  // one launch at a time (the fibers share the globals above)

std::mutex g_atomic, g_state;
constexpr size_t kSharedDefault = 48 * 1024, kSharedPerBlockOptin = 232448;
std::map<const void*, size_t> g_max_dynamic_shared;  // the kernels' opt-ins
cudaError_t g_last = cudaSuccess;
std::string g_last_text;
std::map<const void*, size_t> g_allocations;
std::set<const void*> g_freeing;  // freed on a stream whose work has not reached the free yet
size_t g_allocated = 0;

void set_error(cudaError_t e, const std::string& text) {
  std::lock_guard<std::mutex> lk(g_state);
  if (g_last == cudaSuccess) g_last = e, g_last_text = text;
}

BlockRun& block_of(const char* what) {
  if (!g_block || !g_fiber) trap((std::string(what) + " outside a kernel").c_str());
  return *g_block;
}

unsigned linear_thread(const Place& p) {
  return p.thread.x + p.block_dim.x * (p.thread.y + p.block_dim.y * p.thread.z);
}

// Fiber side: back to the scheduler until it lets this fiber go on.
void suspend(State s) {
  Fiber& f = *g_fiber;
  f.state = s;
#ifdef SIMT_ASAN
  __sanitizer_start_switch_fiber(s == State::Done ? nullptr : &f.fake_stack, g_host_stack, g_host_stack_size);
#endif
  switch_to(f.ctx, g_block->scheduler);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_host_stack, &g_host_stack_size);
#endif
  try {
    (*g_block->body)();
  } catch (const std::exception& e) {
    if (g_block->failure.empty()) g_block->failure = e.what();
  }
  suspend(State::Done);  // never resumed
}

// Scheduler side: run fiber t until it waits or returns.
void resume(Fiber& f) {
  g_fiber = &f;
  void* fake = nullptr;
#ifdef SIMT_ASAN
  __sanitizer_start_switch_fiber(&fake, f.stack.get(), kFiberStack);
#endif
  switch_to(g_block->scheduler, f.ctx);
#ifdef SIMT_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_fiber = nullptr;
}

// The fibers that may go on after a pass; "" when some did, else why none can.
std::string release_waiting(std::vector<Fiber*>& fs) {
  bool released = false, all_done = true, all_at_block = true;
  for (size_t w = 0; w * 32 < fs.size(); ++w) {
    const size_t end = std::min(fs.size(), (w + 1) * 32);
    bool live = false, all_at_warp = true;
    for (size_t t = w * 32; t < end; ++t)
      if (fs[t]->state != State::Done) live = true, all_at_warp &= fs[t]->state == State::AtWarpBarrier;
    if (live && all_at_warp) {
      for (size_t t = w * 32; t < end; ++t)
        if (fs[t]->state == State::AtWarpBarrier) fs[t]->state = State::Runnable;
      released = true;
    }
  }
  if (released) return "";
  for (Fiber* f : fs)
    if (f->state != State::Done) all_done = false, all_at_block &= f->state == State::AtBlockBarrier;
  if (all_done) return "done";
  if (!all_at_block)
    return "deadlock: a warp shuffle that not every live lane of its warp reaches (the others wait at "
           "__syncthreads or returned)";
  for (Fiber* f : fs)
    if (f->state == State::AtBlockBarrier) f->state = State::Runnable;
  return "";
}

// Returns the block's failure ("" when it ran to the end).
std::string run_block(const LaunchConfig& c, unsigned bx, unsigned by, unsigned bz, int threads,
                      const std::function<void()>& body) {
  BlockRun run(threads, c.smem, &body);
  g_block = &run;
  while ((int)g_fibers.size() < threads) g_fibers.emplace_back(new Fiber);
  std::vector<Fiber*> fs;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = *g_fibers[(size_t)t];
    const unsigned tx = (unsigned)t % c.block.x, ty = ((unsigned)t / c.block.x) % c.block.y,
                   tz = (unsigned)t / (c.block.x * c.block.y);
    f.place = Place{{tx, ty, tz}, {bx, by, bz}, c.block, c.grid};
    f.state = State::Runnable;
    f.fake_stack = nullptr;
    f.open.clear(), f.committed.clear();  // a thread that ended with copies in flight
    start_context(f.ctx, f.stack.get(), kFiberStack, fiber_main);
    fs.push_back(&f);
  }
  std::string outcome;
  // Odd blocks start backward: a race without any barrier shows in one block or the other.
  for (bool forward = (bx + by + bz) % 2 == 0;; forward = !forward) {
    for (int k = 0; k < threads; ++k) {
      Fiber& f = *fs[(size_t)(forward ? k : threads - 1 - k)];
      if (f.state == State::Runnable) resume(f);
    }
    outcome = release_waiting(fs);
    if (!outcome.empty()) break;
  }
  g_block = nullptr;
  if (!run.failure.empty()) return run.failure;
  return outcome == "done" ? "" : outcome;
}

}  // namespace

const Place& here() {
  block_of("threadIdx/blockIdx");
  return g_fiber->place;
}
void sync_block() {
  block_of("__syncthreads");
  suspend(State::AtBlockBarrier);
}
void* dynamic_shared_memory() { return block_of("extern __shared__").dynamic.data(); }
void poison_shared(void* object, size_t bytes) {
  BlockRun& b = block_of("__shared__");
  if (std::find(b.poisoned.begin(), b.poisoned.end(), object) != b.poisoned.end()) return;
  std::memset(object, 0xff, bytes);
  b.poisoned.push_back(object);
}

uint64_t warp_exchange(uint64_t mine, int from_lane, bool* found) {
  BlockRun& b = block_of("a warp shuffle");
  const unsigned lin = linear_thread(g_fiber->place), warp = lin / 32;
  const int width = std::min(32, b.threads - (int)warp * 32);
  b.lanes[lin] = mine;
  suspend(State::AtWarpBarrier);
  uint64_t got = mine;
  *found = from_lane >= 0 && from_lane < 32;  // past the warp: the caller's own value, as CUDA defines
  if (*found) {
    // A lane the block does not have (a partial last warp) or one that returned: undefined on a GPU.
    if (from_lane >= width) trap("a warp shuffle reads a lane past the block's last thread (a partial warp)");
    if (g_fibers[warp * 32 + (unsigned)from_lane]->state == State::Done)
      trap("a warp shuffle reads a lane that has returned");
    got = b.lanes[warp * 32 + (unsigned)from_lane];
  }
  suspend(State::AtWarpBarrier);  // every lane has read before any writes its slot again
  return got;
}

unsigned shared_address(const void* p) {
  BlockRun& b = block_of("__cvta_generic_to_shared");
  const char* base = reinterpret_cast<const char*>(b.dynamic.data());
  const char* q = static_cast<const char*>(p);
  if (q < base || q >= base + b.dynamic.size() * sizeof(double))
    trap("__cvta_generic_to_shared of an address outside the launch's dynamic shared memory");
  return (unsigned)(q - base);
}

void cp_async(unsigned dst, const void* src, int bytes, int read) {
  BlockRun& b = block_of("cp.async");
  if (read < 0 || read > bytes) trap("cp.async reads more bytes than it copies");
  if (dst % (unsigned)bytes != 0 || reinterpret_cast<uintptr_t>(src) % (uintptr_t)bytes != 0)
    trap("cp.async with an address not aligned to its size (a misaligned address error on a GPU)");
  if ((size_t)dst + (size_t)bytes > b.dynamic.size() * sizeof(double))
    trap("cp.async past the launch's dynamic shared memory");
  // Until the thread waits for it the destination holds nothing it may read: poisoned.
  std::memset(reinterpret_cast<char*>(b.dynamic.data()) + dst, 0xff, (size_t)bytes);
  g_fiber->open.push_back({dst, src, bytes, read});
}

void cp_async_commit() {
  block_of("cp.async.commit_group");
  g_fiber->committed.push_back(std::move(g_fiber->open));
  g_fiber->open.clear();
}

// Lands every committed group of the calling thread but the newest `newest_pending`.
void cp_async_wait(int newest_pending) {
  BlockRun& b = block_of("cp.async.wait_group");
  auto& groups = g_fiber->committed;
  const size_t land = groups.size() > (size_t)newest_pending ? groups.size() - (size_t)newest_pending : 0;
  char* smem = reinterpret_cast<char*>(b.dynamic.data());
  for (size_t g = 0; g < land; ++g)
    for (const AsyncCopy& c : groups[g]) {
      if (c.read > 0) std::memcpy(smem + c.dst, c.src, (size_t)c.read);
      std::memset(smem + c.dst + c.read, 0, (size_t)(c.bytes - c.read));
    }
  groups.erase(groups.begin(), groups.begin() + (std::ptrdiff_t)land);
}

uint32_t cvt_rna_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf and NaN as they are
  return (u + 0x1000u) & 0xffffe000u;  // the lower 13 bits rounded off, ties away from zero
}

// A tensor-core product of the warp: D (16x8) = A (16x8) B (8x8) + C in the fragment
// layouts of mma.m16n8k8 (PTX ISA, "Matrix Fragments for mma.m16n8k8", .tf32), with
// g = lane / 4, t = lane % 4: A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4);
// B b0 (t, g), b1 (t + 4, g); C and D c0 (g, 2t), c1 (g, 2t + 1), c2 (g + 8, 2t),
// c3 (g + 8, 2t + 1). The tensor cores read 19 bits of each TF32 operand: the rest are
// dropped here too.
void mma_m16n8k8_tf32(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  BlockRun& run = block_of("mma.sync");
  const unsigned lin = linear_thread(g_fiber->place), warp = lin / 32;
  if ((int)(warp + 1) * 32 > run.threads) trap("mma.sync in a partial warp (every lane takes part)");
  run.mma_in[lin] = {a[0], a[1], a[2], a[3], b[0], b[1]};
  suspend(State::AtWarpBarrier);
  for (unsigned l = 0; l < 32; ++l)
    if (g_fibers[warp * 32 + l]->state == State::Done) trap("mma.sync with a lane that has returned");
  const auto* lanes = &run.mma_in[warp * 32];
  auto tf32 = [](uint32_t u) {
    u &= 0xffffe000u;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  auto A = [&](int row, int k) { return tf32(lanes[(row % 8) * 4 + k % 4][(row >= 8 ? 1 : 0) + (k >= 4 ? 2 : 0)]); };
  auto B = [&](int k, int col) { return tf32(lanes[col * 4 + k % 4][4 + (k >= 4 ? 1 : 0)]); };
  const int g = (int)(lin % 32) / 4, t = (int)(lin % 32) % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    float sum = c[i];
    for (int k = 0; k < 8; ++k) sum += A(row, k) * B(k, col);
    c[i] = sum;
  }
  suspend(State::AtWarpBarrier);  // every lane has read before any writes its slot again
}

void trap(const char* what) { throw std::runtime_error(std::string("simt: ") + what); }
void atomic_lock() { g_atomic.lock(); }
void atomic_unlock() { g_atomic.unlock(); }

// CMSEG_SIMT_BLOCK_ORDER=check: each launch of more than one block runs twice from the
// same device memory, its blocks in grid order and then in reverse, and both must leave
// the same bytes. A GPU runs blocks in any order and at once, so a kernel whose blocks
// depend on each other within a launch (one reads what another writes, two write other
// values to one place) gives results that depend on the order. Integer atomics commute;
// float atomics would not (the kernels have none). Costs two copies of all device memory
// a launch: for the kernel cases, not whole training steps.
bool block_order_check() {
  const char* e = std::getenv("CMSEG_SIMT_BLOCK_ORDER");  // read at each launch: a test may set it
  return e && std::string(e) == "check";
}

std::vector<std::vector<char>> device_contents() {
  std::lock_guard<std::mutex> lk(g_state);
  std::vector<std::vector<char>> all;
  all.reserve(g_allocations.size());
  for (const auto& [p, bytes] : g_allocations) {
    const char* q = static_cast<const char*>(p);
    all.emplace_back(q, q + bytes);
  }
  return all;
}

void restore_device_contents(const std::vector<std::vector<char>>& all) {
  std::lock_guard<std::mutex> lk(g_state);
  size_t k = 0;
  for (const auto& [p, bytes] : g_allocations) std::memcpy(const_cast<void*>(p), all[k++].data(), bytes);
}

// "" when device memory holds `want`, else where it first differs.
std::string first_difference(const std::vector<std::vector<char>>& want) {
  std::lock_guard<std::mutex> lk(g_state);
  size_t k = 0;
  for (const auto& [p, bytes] : g_allocations) {
    const char* q = static_cast<const char*>(p);
    const std::vector<char>& w = want[k++];
    if (std::memcmp(q, w.data(), bytes) == 0) continue;
    size_t at = 0;
    while (q[at] == w[at]) ++at;
    return "an allocation of " + std::to_string(bytes) + " bytes, first at byte " + std::to_string(at);
  }
  return "";
}

size_t device_bytes_from(const void* p) {
  std::lock_guard<std::mutex> lk(g_state);
  auto it = g_allocations.upper_bound(p);  // the first allocation after p
  if (it == g_allocations.begin()) return 0;
  --it;
  const char *start = static_cast<const char*>(it->first), *q = static_cast<const char*>(p);
  return q < start + it->second ? (size_t)(start + it->second - q) : 0;
}

size_t max_dynamic_shared(const void* kernel) {
  std::lock_guard<std::mutex> lk(g_state);
  const auto it = g_max_dynamic_shared.find(kernel);
  return it == g_max_dynamic_shared.end() ? kSharedDefault : it->second;
}

void run_grid_now(const LaunchConfig& c, const std::function<void()>& body);

void run_grid(const void* kernel, const LaunchConfig& c, std::function<void()> body) {
  const uint64_t threads = (uint64_t)c.block.x * c.block.y * c.block.z;
  if (threads == 0 || threads > 1024 || c.block.z > 64 || c.grid.x == 0 || c.grid.y == 0 || c.grid.z == 0 ||
      c.grid.y > 65535 || c.grid.z > 65535) {
    set_error(cudaErrorInvalidValue, "invalid launch configuration");
    return;
  }
  // Dynamic shared memory above 48 KiB needs the kernel's opt-in (cudaFuncSetAttribute).
  if (c.smem > max_dynamic_shared(kernel)) {
    set_error(cudaErrorInvalidValue, c.smem > kSharedDefault ? "dynamic shared memory above 48 KiB without the kernel's opt-in"
                                                             : "dynamic shared memory above the kernel's limit");
    return;
  }
  enqueue(c.stream, [c, body = std::move(body)] { run_grid_now(c, body); });
}

// The launch itself, its configuration already checked.
void run_grid_now(const LaunchConfig& c, const std::function<void()>& body) {
  const uint64_t threads = (uint64_t)c.block.x * c.block.y * c.block.z;
  std::lock_guard<std::mutex> lk(g_launch);
  std::vector<dim3> blocks;
  blocks.reserve((size_t)c.grid.x * c.grid.y * c.grid.z);
  for (unsigned bz = 0; bz < c.grid.z; ++bz)
    for (unsigned by = 0; by < c.grid.y; ++by)
      for (unsigned bx = 0; bx < c.grid.x; ++bx) blocks.emplace_back(bx, by, bz);
  // Runs the blocks in grid order (or its reverse); false, the error set, when one failed.
  auto run_blocks = [&](bool reverse) {
    for (size_t k = 0; k < blocks.size(); ++k) {
      const dim3 b = blocks[reverse ? blocks.size() - 1 - k : k];
      const std::string failure = run_block(c, b.x, b.y, b.z, (int)threads, body);
      if (!failure.empty()) {
        set_error(cudaErrorLaunchFailure, failure);
        return false;
      }
    }
    return true;
  };
  if (!block_order_check() || blocks.size() < 2) {
    run_blocks(false);
    return;
  }
  const std::vector<std::vector<char>> before = device_contents();
  if (!run_blocks(false)) return;
  const std::vector<std::vector<char>> forward = device_contents();
  restore_device_contents(before);
  if (!run_blocks(true)) return;
  const std::string differs = first_difference(forward);
  if (!differs.empty())
    set_error(cudaErrorLaunchFailure, "blocks race: the grid run in reverse order gives other results (" + differs +
                                          "): a block reads what another writes, or two write one place");
}

// ---- streams ------------------------------------------------------------------------
// 0: work runs when enqueued; 1 (deferred): a stream's work runs when waited for; 2
// (early): as 1, and each time a stream's work is run, the other streams' work that waits
// for nothing unfinished runs first.
int streams_mode() {
  const char* e = std::getenv("CMSEG_SIMT_STREAMS");  // read at each call: a test may set it, nothing queued
  if (!e) return 0;
  const std::string v(e);
  return v == "deferred" ? 1 : v == "early" ? 2 : 0;
}
bool deferred_streams() { return streams_mode() != 0; }

// Where an event was recorded: its stream's work up to `position` precedes it.
struct Mark {
  cudaStream_t stream = nullptr;
  uint64_t position = 0;
};
// A queued piece of work; a cudaStreamWaitEvent is one too (it waits for `waits`).
struct Work {
  std::function<void()> run;
  bool is_wait = false;
  Mark waits;
};
// A stream's queue: work enqueued but not yet run, and how much has run so far.
struct Queue {
  std::deque<Work> pending;
  uint64_t enqueued = 0, done = 0;
  bool running = false;  // its front work is running (a wait among it): what follows may not start
};
std::recursive_mutex g_streams_lock;  // held while queued work runs (it may flush other streams)
std::map<cudaStream_t, Queue> g_queues;
std::map<cudaEvent_t, Mark> g_marks;

void enqueue_work(cudaStream_t s, Work w) {
  if (!s || !deferred_streams()) return w.run();
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  Queue& q = g_queues[s];
  q.pending.push_back(std::move(w));
  ++q.enqueued;
}
void enqueue(cudaStream_t s, std::function<void()> fn) { enqueue_work(s, Work{std::move(fn)}); }

bool reached(const Mark& m) { return !m.stream || g_queues[m.stream].done >= m.position; }

// Runs the front of q (popped first: a wait inside it must not run it again; q is
// marked running meanwhile, so that nothing queued after it starts before it ends).
void run_front(Queue& q) {
  Work w = std::move(q.pending.front());
  q.pending.pop_front();
  q.running = true;
  w.run();
  q.running = false;
  ++q.done;
}

// Early mode: the streams other than s run what they can without waiting.
void run_others(cudaStream_t s) {
  for (bool ran = true; ran;) {
    ran = false;
    for (auto& [t, q] : g_queues)
      while (t != s && !q.running && !q.pending.empty() &&
             (!q.pending.front().is_wait || reached(q.pending.front().waits)))
        run_front(q), ran = true;
  }
}

// Runs s's queued work up to (not past) position `upto`, in order.
void flush_to(cudaStream_t s, uint64_t upto) {
  if (!s) return;
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  if (streams_mode() == 2) run_others(s);
  Queue& q = g_queues[s];
  // A stream already running its front work is waited for from inside that work: what it
  // waits for lies before it (CUDA's waits cannot form a cycle), so there is nothing to run.
  while (!q.running && q.done < upto && !q.pending.empty()) run_front(q);
}
void flush(cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  flush_to(s, g_queues[s].enqueued);
}
void flush_all() {
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  for (bool again = true; again;) {
    again = false;
    for (auto& [s, q] : g_queues)
      if (!q.pending.empty()) flush(s), again = true;
  }
}
void record(cudaEvent_t e, cudaStream_t s) {
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  g_marks[e] = Mark{s, s ? g_queues[s].enqueued : 0};
}
void wait_for(cudaEvent_t e) {
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  const auto it = g_marks.find(e);
  if (it != g_marks.end()) flush_to(it->second.stream, it->second.position);
}
void forget_stream(cudaStream_t s) {
  flush(s);
  std::lock_guard<std::recursive_mutex> lk(g_streams_lock);
  g_queues.erase(s);
}

// Pinned host memory (cudaMallocHost): copies from or into it stay in stream order.
std::map<const void*, size_t> g_pinned;
bool pinned(const void* p) {
  std::lock_guard<std::mutex> lk(g_state);
  auto it = g_pinned.upper_bound(p);
  if (it == g_pinned.begin()) return false;
  --it;
  return static_cast<const char*>(p) < static_cast<const char*>(it->first) + it->second;
}

}  // namespace simt

// ---- runtime ----------------------------------------------------------------------
namespace {
cudaError_t copy(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
template <class T>
T* handle() {
  return reinterpret_cast<T*>(new char(0));
}
template <class T>
void drop(T* h) {
  delete reinterpret_cast<char*>(h);
}
constexpr int kMultiprocessors = 2;
constexpr size_t kDeviceMemory = size_t(16) << 30;
size_t simt_allocated_bytes() {
  std::lock_guard<std::mutex> lk(simt::g_state);
  return simt::g_allocated;
}
}  // namespace

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int device) {
  if (device != 0) return cudaErrorInvalidValue;
  *p = cudaDeviceProp{};
  std::snprintf(p->name, sizeof p->name, "SIMT host emulation (no GPU)");
  p->major = 9, p->minor = 0;
  p->multiProcessorCount = kMultiprocessors;
  p->l2CacheSize = 50 << 20;
  p->totalGlobalMem = kDeviceMemory;
  p->sharedMemPerBlockOptin = simt::kSharedPerBlockOptin;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  switch (a) {
    case cudaDevAttrMultiProcessorCount: *v = kMultiprocessors; break;
    case cudaDevAttrMemoryPoolsSupported: *v = 1; break;
    case cudaDevAttrMemoryClockRate: *v = 1000000; break;
    case cudaDevAttrGlobalMemoryBusWidth: *v = 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = (int)simt::kSharedPerBlockOptin; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
  }
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDevice(int* device) { return *device = 0, cudaSuccess; }  // the one device
cudaError_t cudaRuntimeGetVersion(int* v) { return *v = 0, cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { return *v = 0, cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t* f, size_t* t) {
  *t = kDeviceMemory;
  *f = *t - simt_allocated_bytes();
  return cudaSuccess;
}
cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lk(simt::g_state);
  const cudaError_t e = simt::g_last;
  simt::g_last = cudaSuccess;
  return e;
}
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    default: return "cudaErrorLaunchFailure";
  }
}
const char* cudaGetErrorString(cudaError_t e) {
  // The text of the last launch failure (kept until the next one), for the test's message.
  static thread_local std::string text;
  std::lock_guard<std::mutex> lk(simt::g_state);
  text = e == cudaSuccess ? "no error" : simt::g_last_text.empty() ? cudaGetErrorName(e) : simt::g_last_text;
  return text.c_str();
}

// Streams and events (simt::enqueue above: work runs when enqueued, or, deferred, when
// waited for). A synchronisation reports a launch failure of the work it ran, as CUDA's do.
namespace {
cudaError_t pending_error() {
  std::lock_guard<std::mutex> lk(simt::g_state);
  return simt::g_last;
}
}  // namespace
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { return *s = handle<CUstream_st>(), cudaSuccess; }
cudaError_t cudaStreamDestroy(cudaStream_t s) { return simt::forget_stream(s), drop(s), cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t s) { return simt::flush(s), pending_error(); }
cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned) {
  std::lock_guard<std::recursive_mutex> lk(simt::g_streams_lock);
  const auto it = simt::g_marks.find(e);
  if (it == simt::g_marks.end()) return cudaSuccess;  // never recorded: nothing to wait for
  const simt::Mark m = it->second;
  simt::enqueue_work(s, simt::Work{[m] { simt::flush_to(m.stream, m.position); }, true, m});
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) { return *e = handle<CUevent_st>(), cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { return cudaEventCreate(e); }
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  {
    std::lock_guard<std::recursive_mutex> lk(simt::g_streams_lock);
    simt::g_marks.erase(e);
  }
  return drop(e), cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { return simt::record(e, s), cudaSuccess; }
cudaError_t cudaEventSynchronize(cudaEvent_t e) { return simt::wait_for(e), pending_error(); }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { return *ms = 0.f, cudaSuccess; }

cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* p, int) {
  static char pool;
  *p = reinterpret_cast<cudaMemPool_t>(&pool);
  return cudaSuccess;
}
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t, cudaMemPoolAttr, void*) { return cudaSuccess; }
cudaError_t cudaMemPoolGetAttribute(cudaMemPool_t, cudaMemPoolAttr a, void* v) {
  if (a == cudaMemPoolAttrReservedMemCurrent) *static_cast<uint64_t*>(v) = simt_allocated_bytes();
  return cudaSuccess;
}
cudaError_t cudaMemPoolTrimTo(cudaMemPool_t, size_t) { return cudaSuccess; }

// Exactly `bytes` (AddressSanitizer sees a read one past the end), 256-byte aligned as
// cudaMalloc's are, poisoned with 0xff bytes: a float read before any write is a NaN.
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t) {
  *p = nullptr;
  if (bytes == 0) return cudaSuccess;
  if (bytes > kDeviceMemory - simt_allocated_bytes()) return cudaErrorMemoryAllocation;  // as a full GPU says
  if (posix_memalign(p, 256, bytes) != 0) return *p = nullptr, cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  std::lock_guard<std::mutex> lk(simt::g_state);
  simt::g_allocations[*p] = bytes;
  simt::g_allocated += bytes;
  return cudaSuccess;
}
// Stream-ordered: the memory counts as free at once (the pool may hand it out again in
// stream order), but it is released when the stream's work reaches the free; until then
// it is still device memory to the stream's earlier work.
cudaError_t cudaFreeAsync(void* p, cudaStream_t s) {
  if (!p) return cudaSuccess;
  {
    std::lock_guard<std::mutex> lk(simt::g_state);
    auto it = simt::g_allocations.find(p);
    if (it == simt::g_allocations.end() || simt::g_freeing.count(p)) return cudaErrorInvalidValue;
    simt::g_allocated -= it->second;
    simt::g_freeing.insert(p);
  }
  simt::enqueue(s, [p] {
    {
      std::lock_guard<std::mutex> lk(simt::g_state);
      simt::g_allocations.erase(p);
      simt::g_freeing.erase(p);
    }
    std::free(p);
  });
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = std::malloc(bytes ? bytes : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  std::lock_guard<std::mutex> lk(simt::g_state);
  simt::g_pinned[*p] = bytes ? bytes : 1;
  return cudaSuccess;
}
// cudaFreeHost waits for the device, as CUDA's does.
cudaError_t cudaFreeHost(void* p) {
  simt::flush_all();
  {
    std::lock_guard<std::mutex> lk(simt::g_state);
    simt::g_pinned.erase(p);
  }
  return std::free(p), cudaSuccess;
}
namespace {
// One copy in stream order, as CUDA does it with pageable host memory: from it, the data
// is taken at the call (the source may be reused at once); into it, the call returns
// when the copy is done (after the stream's earlier work). Device memory and pinned host
// memory are read and written when the stream reaches the copy.
void copy_in_order(void* dst, const void* src, size_t bytes, cudaStream_t s) {
  if (!bytes) return;
  const bool from_pageable = !simt::device_bytes_from(src) && !simt::pinned(src);
  const bool to_pageable = !simt::device_bytes_from(dst) && !simt::pinned(dst);
  if (to_pageable) {
    simt::flush(s);
    copy(dst, src, bytes);
  } else if (from_pageable) {
    auto staged = std::make_shared<std::vector<char>>(static_cast<const char*>(src), static_cast<const char*>(src) + bytes);
    simt::enqueue(s, [dst, staged] { copy(dst, staged->data(), staged->size()); });
  } else {
    simt::enqueue(s, [dst, src, bytes] { copy(dst, src, bytes); });
  }
}
}  // namespace
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t s) {
  copy_in_order(dst, src, bytes, s);
  return cudaSuccess;
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t s) {
  if (width > dpitch || width > spitch) return cudaErrorInvalidValue;  // as the runtime refuses it
  for (size_t r = 0; r < height; ++r)
    copy_in_order(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width, s);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t s) {
  if (bytes) simt::enqueue(s, [dst, value, bytes] { std::memset(dst, value, bytes); });
  return cudaSuccess;
}
cudaError_t simt_func_attributes(cudaFuncAttributes* a, const void* kernel) {
  *a = cudaFuncAttributes{};
  a->binaryVersion = 90;
  a->maxDynamicSharedSizeBytes = (int)simt::max_dynamic_shared(kernel);
  return cudaSuccess;
}
cudaError_t simt_set_max_dynamic_shared(const void* kernel, int bytes) {
  if (bytes < 0 || (size_t)bytes > simt::kSharedPerBlockOptin) {
    simt::set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute: more dynamic shared memory than a block may have");
    return cudaErrorInvalidValue;
  }
  std::lock_guard<std::mutex> lk(simt::g_state);
  simt::g_max_dynamic_shared[kernel] = (size_t)bytes;
  return cudaSuccess;
}
// Blocks per SM: 2048 threads and 228 KiB of shared memory an SM (cc 9.0).
cudaError_t simt_occupancy(int* blocks, int threads, size_t smem) {
  int by_threads = std::min(32, 2048 / std::max(threads, 1));
  if (smem > 0) by_threads = std::min(by_threads, (int)((size_t)233472 / (smem + 1024)));
  *blocks = std::max(0, by_threads);
  return cudaSuccess;
}

// ---- cuDNN and cuBLAS handles: the stream their work goes to ----------------------------
struct cudnnContext {
  cudaStream_t stream = nullptr;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
};
cudaStream_t simt::stream_of(cudnnHandle_t h) { return h ? h->stream : nullptr; }
cudaStream_t simt::stream_of(cublasHandle_t h) { return h ? h->stream : nullptr; }
cudnnStatus_t cudnnCreate(cudnnHandle_t* h) { return *h = new cudnnContext, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnDestroy(cudnnHandle_t h) { return delete h, CUDNN_STATUS_SUCCESS; }
cudnnStatus_t cudnnSetStream(cudnnHandle_t h, cudaStream_t s) { return h->stream = s, CUDNN_STATUS_SUCCESS; }
const char* cudnnGetErrorString(cudnnStatus_t s) {
  switch (s) {
    case CUDNN_STATUS_SUCCESS: return "CUDNN_STATUS_SUCCESS";
    case CUDNN_STATUS_BAD_PARAM: return "CUDNN_STATUS_BAD_PARAM";
    case CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER: return "CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER";
    case CUDNN_STATUS_NOT_SUPPORTED: return "CUDNN_STATUS_NOT_SUPPORTED";
    case CUDNN_STATUS_INTERNAL_ERROR: return "CUDNN_STATUS_INTERNAL_ERROR";
    case CUDNN_STATUS_EXECUTION_FAILED: return "CUDNN_STATUS_EXECUTION_FAILED";
    default: return "CUDNN_STATUS_ERROR";
  }
}
size_t cudnnGetVersion() { return CUDNN_VERSION; }

// ---- cuBLAS -----------------------------------------------------------------------
cublasStatus_t cublasCreate(cublasHandle_t* h) { return *h = new cublasContext, CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasDestroy(cublasHandle_t h) { return delete h, CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) { return h->stream = s, CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
cublasStatus_t cublasGetProperty(libraryPropertyType, int* v) { return *v = 0, CUBLAS_STATUS_SUCCESS; }
const char* cublasGetStatusName(cublasStatus_t s) {
  return s == CUBLAS_STATUS_SUCCESS ? "CUBLAS_STATUS_SUCCESS" : "CUBLAS_STATUS_INVALID_VALUE";
}
namespace {
// C = alpha op(A) op(B) + beta C per batch entry, column-major, sums in double.
void gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const float* A, int lda,
          long long sa, const float* B, int ldb, long long sb, float beta, float* C, int ldc, long long sc, int batch) {
  for (int b = 0; b < batch; ++b) {
    const float* Ab = A + b * sa;
    const float* Bb = B + b * sb;
    float* Cb = C + b * sc;
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        double s = 0;
        for (int l = 0; l < k; ++l)
          s += (double)(ta == CUBLAS_OP_N ? Ab[i + (int64_t)l * lda] : Ab[l + (int64_t)i * lda]) *
               (tb == CUBLAS_OP_N ? Bb[l + (int64_t)j * ldb] : Bb[j + (int64_t)l * ldb]);
        float& c = Cb[i + (int64_t)j * ldc];
        // beta 0: C is not read (it may hold anything, NaN included), as cuBLAS documents.
        c = (float)(alpha * s + (beta == 0.f ? 0.0 : (double)beta * c));
      }
  }
}
}  // namespace
cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                                         int k, const float* alpha, const float* A, int lda, long long sa,
                                         const float* B, int ldb, long long sb, const float* beta, float* C, int ldc,
                                         long long sc, int batch) {
  // cuBLAS's own argument checks (column-major leading dimensions).
  if (m < 0 || n < 0 || k < 0 || batch < 0 || ldc < std::max(1, m) ||
      lda < std::max(1, ta == CUBLAS_OP_N ? m : k) || ldb < std::max(1, tb == CUBLAS_OP_N ? k : n))
    return CUBLAS_STATUS_INVALID_VALUE;
  // alpha and beta are read at the call (host pointers); the product in stream order.
  simt::enqueue(simt::stream_of(h), [=, alpha = *alpha, beta = *beta] {
    gemm(ta, tb, m, n, k, alpha, A, lda, sa, B, ldb, sb, beta, C, ldc, sc, batch);
  });
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                           const float* alpha, const float* A, int lda, const float* B, int ldb, const float* beta,
                           float* C, int ldc) {
  return cublasSgemmStridedBatched(h, ta, tb, m, n, k, alpha, A, lda, 0, B, ldb, 0, beta, C, ldc, 0, 1);
}
