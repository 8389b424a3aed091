// oneDNN engine, streams, threads, primitive cache and scratch for the fast
// paths in this folder (see cmseg/onednn.hpp and onednn_internal.hpp).
#include <dlfcn.h>
#include <sys/stat.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <chrono>
#include <algorithm>
#include <list>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cmseg/onednn.hpp"
#include "cmseg/profile.hpp"
#include "cmseg/threads.hpp"
#include "onednn_internal.hpp"

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB && CMSEG_ONEDNN_TBB_CONTROL
#include <oneapi/tbb/global_control.h>
#endif

namespace cmseg {
namespace onednn {
namespace detail {
namespace {

bool env_flag_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}

#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
// The oneDNN wheel `onednn` (2025+) is built for the SYCL runtime: its CPU
// engine is a SYCL CPU device, which the OpenCL CPU runtime that the wheel
// pulls in (intel-opencl-rt, libintelocl.so beside libdnnl.so) provides. Its
// OpenCL ICD is not registered system-wide by pip, so point the ICD loader at
// it before SYCL enumerates devices, unless the user chose ICDs already.
void register_pip_opencl_cpu_runtime() {
  if (std::getenv("OCL_ICD_FILENAMES")) return;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&dnnl_version), &info) || !info.dli_fname) return;
  std::string dir = info.dli_fname;
  dir = dir.substr(0, dir.find_last_of('/') + 1);
  const std::string ocl = dir + "libintelocl.so";
  struct stat st{};
  if (stat(ocl.c_str(), &st) == 0) setenv("OCL_ICD_FILENAMES", ocl.c_str(), 0);
}
#endif

struct Context {
  bool ok = false;
  std::string error;
  dnnl::engine eng;
  Context() {
    try {
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
      register_pip_opencl_cpu_runtime();
#endif
      if (dnnl::engine::get_count(dnnl::engine::kind::cpu) == 0) {
        error = "no oneDNN CPU engine";
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
        error += " (this oneDNN uses the SYCL runtime and found no SYCL CPU device; OCL_ICD_FILENAMES=";
        error += std::getenv("OCL_ICD_FILENAMES") ? std::getenv("OCL_ICD_FILENAMES") : "";
        error += ")";
#endif
        return;
      }
      eng = dnnl::engine(dnnl::engine::kind::cpu, 0);
      ok = true;
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
};

Context& context() {
  static Context c;
  static const bool warned = [] {
    if (!c.ok) std::fprintf(stderr, "cmseg: oneDNN unavailable (%s): using the CPU reference layers\n", c.error.c_str());
    return true;
  }();
  (void)warned;
  return c;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> on{env_flag_on("CMSEG_ONEDNN")};
  return on;
}

struct AlignedFree {
  void operator()(void* p) const { std::free(p); }
};
struct Slot {
  std::unique_ptr<void, AlignedFree> p;
  size_t bytes = 0;
};

// The primitive cache: least recently used out first. It kept every primitive it made,
// and each shape (image size, batch size) makes a new set: predicting on a folder of
// differently sized images grew the process by 1-2 MB a size without bound (80 sizes of a
// 2D depth-4 model: 237 -> 314 MB; 400 at depth 2: 189 -> 365 MB). Callers hold the shared_ptr
// they got for the whole call, so an entry evicted meanwhile (by another thread) lives on
// until that call is done with it.
// CMSEG_ONEDNN_CACHE_ENTRIES=N (read once) sets another capacity.
size_t initial_capacity() {
  const char* e = std::getenv("CMSEG_ONEDNN_CACHE_ENTRIES");
  if (!e || !*e) return kCacheCapacity;
  char* end = nullptr;
  const long long v = std::strtoll(e, &end, 10);
  if (*end || v < 1) {
    std::fprintf(stderr, "cmseg: CMSEG_ONEDNN_CACHE_ENTRIES=%s is not a positive count: keeping %zu\n", e,
                 kCacheCapacity);
    return kCacheCapacity;
  }
  return (size_t)v;
}

struct Cache {
  std::mutex mu;
  size_t capacity = initial_capacity();
  std::list<std::pair<Key, std::shared_ptr<void>>> order;  // most recently used first
  std::map<Key, decltype(order)::iterator> index;
  size_t builds = 0;  // make() calls that returned (misses)
};
Cache& cache() {
  static Cache c;
  return c;
}

}  // namespace

Layout layout() {
  static const Layout l = [] {
    const char* e = std::getenv("CMSEG_ONEDNN_LAYOUT");
    if (!e || !*e || !std::strcmp(e, "auto")) return Layout::Auto;
    if (!std::strcmp(e, "any")) return Layout::Any;
    if (!std::strcmp(e, "nhwc")) return Layout::Nhwc;
    if (!std::strcmp(e, "plain")) return Layout::Plain;
    std::fprintf(stderr, "cmseg: CMSEG_ONEDNN_LAYOUT=%s is not auto|any|nhwc|plain: using auto\n", e);
    return Layout::Auto;
  }();
  return l;
}

const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Auto: return "auto";
    case Layout::Any: return "any";
    case Layout::Nhwc: return "nhwc";
    case Layout::Plain: return "plain";
  }
  return "?";
}

dnnl::engine& engine() { return context().eng; }

dnnl::stream& stream() {
  thread_local dnnl::stream s(engine());
  return s;
}

// Layer calls between two drains of the SYCL runtime's backlog when one thread is allowed
// (sync_threads below).
constexpr unsigned kDrainEvery = 1024;

void sync_threads() {
  const int n = num_threads();
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  // omp_set_num_threads sets the calling thread's ICV; looked up at run time so
  // that we need not link an OpenMP runtime ourselves (libdnnl brings its own).
  thread_local int set = 0;
  if (set != n) {
    using Fn = void (*)(int);
    static const Fn fn = reinterpret_cast<Fn>(dlsym(RTLD_DEFAULT, "omp_set_num_threads"));
    if (fn) fn(n);
    set = n;
  }
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB && CMSEG_ONEDNN_TBB_CONTROL
  static std::mutex mu;
  static std::unique_ptr<tbb::global_control> limit;
  static std::atomic<int> current{0};
  const auto allow = [&](size_t threads) {
    limit.reset();
    limit.reset(new tbb::global_control(tbb::global_control::max_allowed_parallelism, threads));
  };
  if (current.load(std::memory_order_relaxed) != n) {
    std::lock_guard<std::mutex> lk(mu);
    allow((size_t)n);
    current.store(n);
  }
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
  // One thread allowed leaves TBB without a worker, and the work that the SYCL CPU
  // runtime enqueues for later is then never run: with every primitive executed the
  // process grew (0.3-1 KB a call, 13 KB a step of a small 2D model, without bound) and
  // its calls slowed. A worker allowed for a moment, with nothing of ours in flight,
  // runs that backlog; the primitives themselves still run on one thread.
  static std::atomic<unsigned> calls{0};
  if (n == 1 && ++calls % kDrainEvery == 0) {
    std::lock_guard<std::mutex> lk(mu);
    stream().wait();
    allow(2);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    allow(1);
  }
#endif
#endif
}

void* scratch(int slot, size_t bytes) {
  thread_local Slot slots[kScratchSlots];
  Slot& s = slots[slot];
  if (s.bytes < bytes) {
    // The stream runs asynchronously (SYCL): a primitive queued earlier in this
    // call may still read the old buffer.
    stream().wait();
    const size_t rounded = (bytes + 63) / 64 * 64;
    s.p.reset(std::aligned_alloc(64, rounded));
    if (!s.p) throw std::bad_alloc();
    s.bytes = rounded;
  }
  return s.p.get();
}

std::shared_ptr<void> cached(const Key& key, const std::function<std::shared_ptr<void>()>& make) {
  std::vector<std::shared_ptr<void>> evicted;  // released after the lock (declared before it)
  Cache& c = cache();
  std::lock_guard<std::mutex> lk(c.mu);
  auto it = c.index.find(key);
  if (it != c.index.end()) {
    c.order.splice(c.order.begin(), c.order, it->second);  // a hit: now the most recent
    return it->second->second;
  }
  auto v = make();
  ++c.builds;
  c.order.emplace_front(key, v);
  try {
    c.index.emplace(key, c.order.begin());
  } catch (...) {
    c.order.pop_front();
    throw;
  }
  while (c.order.size() > c.capacity) {
    evicted.push_back(std::move(c.order.back().second));
    c.index.erase(c.order.back().first);
    c.order.pop_back();
  }
  return v;
}

size_t cache_builds() {
  std::lock_guard<std::mutex> lk(cache().mu);
  return cache().builds;
}

size_t cache_capacity() {
  std::lock_guard<std::mutex> lk(cache().mu);
  return cache().capacity;
}

void set_cache_capacity(size_t entries) {
  std::vector<std::shared_ptr<void>> evicted;
  Cache& c = cache();
  std::lock_guard<std::mutex> lk(c.mu);
  c.capacity = std::max<size_t>(entries, 1);
  while (c.order.size() > c.capacity) {
    evicted.push_back(std::move(c.order.back().second));
    c.index.erase(c.order.back().first);
    c.order.pop_back();
  }
}

Key make_key(int op, int n, int cin, int cout, Spatial s, int ndim, Blocks b) {
  return {op, n, cin, cout, s.d, s.h, s.w, ndim, (int)layout(), num_threads(), b.x, b.y};
}

memory::dims act_dims(int n, int c, Spatial s, int ndim) {
  if (ndim == 3) return {n, c, s.d, s.h, s.w};
  return {n, c, s.h, s.w};
}
tag plain_act_tag(int ndim) { return ndim == 3 ? tag::ncdhw : tag::nchw; }
tag nhwc_act_tag(int ndim) { return ndim == 3 ? tag::ndhwc : tag::nhwc; }

memory::desc plain_act(int n, int c, Spatial s, int ndim) {
  return memory::desc(act_dims(n, c, s, ndim), memory::data_type::f32, plain_act_tag(ndim));
}

memory::desc blocked_act(int n, int c, Spatial s, int ndim, int block) {
  tag t;
  if (block == 8) t = ndim == 3 ? tag::nCdhw8c : tag::nChw8c;
  else if (block == 16) t = ndim == 3 ? tag::nCdhw16c : tag::nChw16c;
  else throw std::invalid_argument("cmseg: channel block " + std::to_string(block) + " is not 8 or 16");
  return memory::desc(act_dims(n, c, s, ndim), memory::data_type::f32, t);
}

memory::desc user_act(int n, int c, Spatial s, int ndim, int block) {
  return block ? blocked_act(n, c, s, ndim, block) : plain_act(n, c, s, ndim);
}

memory::desc policy_act(int n, int c, Spatial s, int ndim, bool plain) {
  tag t = tag::any;
  if (plain || layout() == Layout::Plain) t = plain_act_tag(ndim);
  else if (layout() == Layout::Nhwc) t = nhwc_act_tag(ndim);
  return memory::desc(act_dims(n, c, s, ndim), memory::data_type::f32, t);
}

bool is_gemm(const dnnl::primitive_desc_base& pd) {
  const char* impl = pd.impl_info_str();
  return impl && std::strstr(impl, "gemm") != nullptr;
}

void Port::init(const memory::desc& user_md, const memory::desc& prim_md, bool input, bool output, bool acc,
                bool act) {
  user = user_md, prim = prim_md, accumulate = acc, activation = act;
  same = user == prim;
  if (input && !same) to_prim = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), user, engine(), prim));
  if (output && (!same || accumulate)) {
    dnnl::primitive_attr attr;
    if (accumulate) {
      dnnl::post_ops po;
      po.append_sum(1.f);
      attr.set_post_ops(po);
    }
    to_user = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), prim, engine(), user, attr));
  }
}

memory Port::in(const float* p, int slot) const {
  memory u(user, engine(), const_cast<float*>(p));
  if (same) return u;
  ProfileScope prof("onednn_reorder");
  if (activation) count_activation_reorder();
  memory m(prim, engine(), scratch(slot, prim.get_size()));
  to_prim.execute(stream(), u, m);
  profile_sync();
  return m;
}

memory Port::out(float* p, int slot) const {
  if (same && !accumulate) return memory(user, engine(), p);
  return memory(prim, engine(), scratch(slot, prim.get_size()));
}

void Port::finish(const memory& m, float* p) const {
  if (same && !accumulate) return;
  ProfileScope prof("onednn_reorder");
  if (activation && !same) count_activation_reorder();
  memory u(user, engine(), p);
  to_user.execute(stream(), const_cast<memory&>(m), u);
  profile_sync();
}

namespace {
thread_local int tl_reference_depth = 0;
std::atomic<long long> activation_reorder_count{0};

enum ConvertOp { kToBlocked = 21, kToPlain = 22 };

// Cached reorder between plain and blocked activations, either way.
// A cached reorder between plain and blocked activations, with its two layouts.
struct Conversion {
  memory::desc src, dst;
  dnnl::reorder prim;
};

void convert(const float* from, float* to, int n, int c, Spatial s, int ndim, int block, bool to_blocked) {
  if (c % block)
    throw std::invalid_argument("cmseg: " + std::to_string(c) + " channels are not a multiple of the block");
  const Key key = make_key(to_blocked ? kToBlocked : kToPlain, n, c, c, s, ndim, Blocks{block, block});
  auto r = cached_as<Conversion>(key, [&] {
    auto e = std::make_shared<Conversion>();
    const memory::desc p = plain_act(n, c, s, ndim), b = blocked_act(n, c, s, ndim, block);
    e->src = to_blocked ? p : b, e->dst = to_blocked ? b : p;
    e->prim = dnnl::reorder(dnnl::reorder::primitive_desc(engine(), e->src, engine(), e->dst));
    return e;
  });
  ProfileScope prof("onednn_reorder");
  count_activation_reorder();
  memory src(r->src, engine(), const_cast<float*>(from)), dst(r->dst, engine(), to);
  r->prim.execute(stream(), src, dst);
  stream().wait();
}
}  // namespace

void count_activation_reorder() { activation_reorder_count.fetch_add(1, std::memory_order_relaxed); }

const float* plain_in(const float* p, int n, int c, Spatial s, int ndim, int block, int slot) {
  if (!block || !p) return p;
  float* q = static_cast<float*>(scratch(slot, sizeof(float) * (size_t)n * c * s.size()));
  convert(p, q, n, c, s, ndim, block, false);
  return q;
}

float* plain_out(float* p, int n, int c, Spatial s, int ndim, int block, int slot) {
  if (!block || !p) return p;
  return static_cast<float*>(scratch(slot, sizeof(float) * (size_t)n * c * s.size()));
}

void plain_done(const float* plain, float* p, int n, int c, Spatial s, int ndim, int block) {
  if (block && p) convert(plain, p, n, c, s, ndim, block, true);
}
ReferenceScope::ReferenceScope() { ++tl_reference_depth; }
ReferenceScope::~ReferenceScope() { --tl_reference_depth; }

bool use_reference(const dnnl::primitive_desc_base& pd) { return layout() == Layout::Auto && is_gemm(pd); }

dnnl::primitive_attr user_scratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

void execute(const dnnl::primitive& p, std::unordered_map<int, memory> args) {
  const_dnnl_memory_desc_t md = dnnl_primitive_desc_query_md(p.get_primitive_desc(), dnnl_query_scratchpad_md, 0);
  const size_t bytes = md ? dnnl_memory_desc_get_size(md) : 0;
  if (bytes) {
    dnnl_memory_desc_t copy = nullptr;
    dnnl::error::wrap_c_api(dnnl_memory_desc_clone(&copy, md), "could not clone the scratchpad descriptor");
    args[DNNL_ARG_SCRATCHPAD] = memory(memory::desc(copy), engine(), scratch(kScratchpadSlot, bytes));
  }
  p.execute(stream(), args);
}

void profile_sync() {
  if (profiling_enabled()) stream().wait();
}

}  // namespace detail

bool enabled() {
  return detail::tl_reference_depth == 0 && detail::enabled_flag().load(std::memory_order_relaxed) &&
         detail::context().ok;
}
void set_enabled(bool on) { detail::enabled_flag().store(on); }

long long activation_reorders() { return detail::activation_reorder_count.load(); }

void to_blocked(const float* plain, float* blocked, int n, int c, Spatial s, int ndim, int block) {
  detail::convert(plain, blocked, n, c, s, ndim, block, true);
}
void to_plain(const float* blocked, float* plain, int n, int c, Spatial s, int ndim, int block) {
  detail::convert(blocked, plain, n, c, s, ndim, block, false);
}

int activation_block(int ndim) {
  using detail::Layout;
  using dnnl::memory;
  if (!enabled() || (detail::layout() != Layout::Auto && detail::layout() != Layout::Any)) return 0;
  // CMSEG_ONEDNN_TRUNK=plain: the model keeps plain activations and every call
  // reorders (the layout before issue 7's blocked trunk; for measurements).
  static const bool plain_trunk = [] {
    const char* e = std::getenv("CMSEG_ONEDNN_TRUNK");
    return e && std::strcmp(e, "plain") == 0;
  }();
  if (plain_trunk) return 0;
  // What the direct forward kernel picks for a typical trunk layer (32 -> 32
  // channels): 8-channel blocks on AVX2, 16 on AVX-512.
  static std::atomic<int> probed[2] = {{-1}, {-1}};
  std::atomic<int>& b = probed[ndim == 3];
  if (b.load() < 0) {
    int found = 0;
    try {
      const Spatial s = ndim == 3 ? Spatial{16, 16, 16} : Spatial{1, 32, 32};
      const auto any = [&](const memory::dims& d) { return memory::desc(d, memory::data_type::f32, detail::tag::any); };
      const memory::dims x = detail::act_dims(1, 32, s, ndim);
      const memory::dims w = ndim == 3 ? memory::dims{32, 32, 3, 3, 3} : memory::dims{32, 32, 3, 3};
      const memory::dims one(ndim, 1);
      const dnnl::convolution_forward::primitive_desc pd(detail::engine(), dnnl::prop_kind::forward_training,
                                                         dnnl::algorithm::convolution_direct, any(x), any(w), any(x),
                                                         one, one, one);
      for (int blk : {8, 16})
        if (!detail::is_gemm(pd) && pd.dst_desc() == detail::blocked_act(1, 32, s, ndim, blk)) found = blk;
    } catch (const std::exception&) {
      found = 0;
    }
    b.store(found);
  }
  return b.load();
}

size_t cached_primitives() {
  std::lock_guard<std::mutex> lk(detail::cache().mu);
  return detail::cache().order.size();
}

std::string describe() {
  const dnnl_version_t* v = dnnl_version();
  std::string s = "oneDNN " + std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
  s += " (cpu runtime ";
#if DNNL_CPU_RUNTIME == DNNL_RUNTIME_SYCL
  s += "SYCL";
#elif DNNL_CPU_RUNTIME == DNNL_RUNTIME_OMP
  s += "OpenMP";
#elif DNNL_CPU_RUNTIME == DNNL_RUNTIME_TBB
  s += "TBB";
#else
  s += "other";
#endif
  s += ", threading ";
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  s += "OpenMP";
#elif DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_TBB
  s += "TBB";
#if !CMSEG_ONEDNN_TBB_CONTROL
  s += " (no tbb headers: thread count not controlled)";
#endif
#else
  s += "other";
#endif
  s += ", " + std::to_string(num_threads()) + " threads, layout " + detail::layout_name(detail::layout()) + ")";
  if (!detail::context().ok) s += " unavailable: " + detail::context().error;
  return s;
}

}  // namespace onednn
}  // namespace cmseg
