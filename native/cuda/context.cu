// Device discovery and the context: one stream, allocations from the device's
// stream-ordered memory pool, lazily created cuDNN / cuBLAS handles.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "cmseg/gpu_support.hpp"
#include "cmseg/threads.hpp"
#include "common.cuh"

namespace cmseg {
namespace cuda {
namespace {

// Why device `device` cannot run this build's kernels, or "" (gpu_support.hpp).
std::string support_problem(int device) {
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return "";  // the calls that follow report it
  }
  return gpu_support_problem(prop.name, prop.major, prop.minor, CMSEG_CUDA_ARCHITECTURES_TEXT);
}

struct Probe {
  int devices = 0;
  std::string reason;
};

const Probe& probe() {
  static Probe p;
  static std::once_flag once;
  std::call_once(once, [] {
    const cudaError_t e = cudaGetDeviceCount(&p.devices);
    if (e != cudaSuccess) {
      cudaGetLastError();
      p.devices = 0;
      p.reason = str("cudaGetDeviceCount: ", cudaGetErrorString(e));
    } else if (p.devices == 0) {
      p.reason = "the CUDA runtime found no device";
    } else if (const std::string problem = support_problem(0); !problem.empty()) {
      // A GPU this build has no kernels for fails at its first launch, mid-step: 'auto'
      // models take the CPU instead, and the reason says what to do.
      p.devices = 0;
      p.reason = problem;
    }
  });
  return p;
}

}  // namespace

bool built() { return true; }
bool available() { return probe().devices > 0; }
std::string unavailable_reason() { return probe().reason; }

size_t cudnn_version() { return cudnnGetVersion(); }

DeviceInfo device_info(int device) {
  if (!available()) throw Error(str("no CUDA device: ", unavailable_reason()));
  if (device < 0 || device >= probe().devices)
    throw Error(str("CUDA device ", device, " does not exist (", probe().devices, " found)"));
  cudaDeviceProp prop{};
  CMSEG_CUDA(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.index = device;
  info.name = prop.name;
  info.cc_major = prop.major, info.cc_minor = prop.minor;
  info.multiprocessors = prop.multiProcessorCount;
  info.memory_bytes = prop.totalGlobalMem;
  info.l2_bytes = (size_t)prop.l2CacheSize;
  info.shared_bytes_per_block = prop.sharedMemPerBlockOptin;
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) == cudaSuccess &&
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) == cudaSuccess)
    info.peak_memory_bytes_per_s = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0);
  else
    cudaGetLastError();  // not an error: the figure is optional
  CMSEG_CUDA(cudaRuntimeGetVersion(&info.runtime_version));
  CMSEG_CUDA(cudaDriverGetVersion(&info.driver_version));
  info.cudnn_version = cudnnGetVersion();
  int major = 0, minor = 0, patch = 0;
  if (cublasGetProperty(MAJOR_VERSION, &major) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(MINOR_VERSION, &minor) == CUBLAS_STATUS_SUCCESS &&
      cublasGetProperty(PATCH_LEVEL, &patch) == CUBLAS_STATUS_SUCCESS)
    info.cublas_version = major * 10000 + minor * 100 + patch;
  return info;
}

// ---- Context -------------------------------------------------------------------

Context::Context(const ContextOptions& options) : impl_(new Impl) {
  if (!available()) throw Error(str("no CUDA device: ", unavailable_reason()));
  Impl& m = *impl_;
  m.options = options;
  apply_environment(m.options);
  const int dev = options.device;
  if (dev < 0 || dev >= probe().devices)
    throw Error(str("CUDA device ", dev, " does not exist (", probe().devices, " found)"));
  if (const std::string problem = support_problem(dev); !problem.empty()) throw Error(problem);
  CMSEG_CUDA(cudaSetDevice(dev));
  if (m.options.max_workspace_bytes == 0) {
    size_t free_b = 0, total_b = 0;
    CMSEG_CUDA(cudaMemGetInfo(&free_b, &total_b));
    m.options.max_workspace_bytes = std::max(size_t(1) << 30, total_b / 16);
  }
  int pools = 0;
  CMSEG_CUDA(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev));
  if (!pools) throw Error(str("CUDA device ", dev, " has no stream-ordered memory pools (cudaMallocAsync)"));
  CMSEG_CUDA(cudaDeviceGetAttribute(&m.multiprocessors, cudaDevAttrMultiProcessorCount, dev));
  CMSEG_CUDA(cudaStreamCreateWithFlags(&m.stream, cudaStreamNonBlocking));
  CMSEG_CUDA(cudaDeviceGetDefaultMemPool(&m.pool, dev));
  // Keep freed memory in the pool: a training step frees and re-allocates the same
  // sizes every iteration, and returning memory to the driver would synchronise.
  uint64_t keep = UINT64_MAX;
  CMSEG_CUDA(cudaMemPoolSetAttribute(m.pool, cudaMemPoolAttrReleaseThreshold, &keep));
  CMSEG_CUDA(cudaEventCreate(&m.t0));
  CMSEG_CUDA(cudaEventCreate(&m.t1));
  CMSEG_CUDA(cudaStreamCreateWithFlags(&m.copy_stream, cudaStreamNonBlocking));
  for (StageSlot& st : m.stage) {
    CMSEG_CUDA(cudaEventCreateWithFlags(&st.copied, cudaEventDisableTiming));
    CMSEG_CUDA(cudaEventCreateWithFlags(&st.released, cudaEventDisableTiming));
  }
  CMSEG_CUDA(cudaEventCreateWithFlags(&m.allocated, cudaEventDisableTiming));
  // CMSEG_GPU_PROFILE: collected for profile_report (cmseg_bench_gpu); CMSEG_PROFILE:
  // the same, and Model::train_step prints it after every step.
  auto set = [](const char* name) {
    const char* v = std::getenv(name);
    return v && *v && std::string(v) != "0";
  };
  m.profiler.on = set("CMSEG_GPU_PROFILE") || set("CMSEG_PROFILE");
}

Context::~Context() {
  Impl& m = *impl_;
  cudaSetDevice(m.options.device);  // the frees below run on this context's device
  if (m.copy_stream) cudaStreamSynchronize(m.copy_stream);  // no copy writes memory freed below
  if (m.stream) {
    for (auto& kv : m.sizes) cudaFreeAsync(kv.first, m.stream);
    cudaStreamSynchronize(m.stream);
  }
  if (m.side.stream) cudaStreamSynchronize(m.side.stream);
  m.graph_plans.clear();  // plans hold the handle
  if (m.cudnn_handle) cudnnDestroy(m.cudnn_handle);
  if (m.cublas_handle) cublasDestroy(m.cublas_handle);
  if (m.side.cudnn) cudnnDestroy(m.side.cudnn);
  if (m.side.cublas) cublasDestroy(m.side.cublas);
  if (m.side.fork) cudaEventDestroy(m.side.fork);
  if (m.side.join) cudaEventDestroy(m.side.join);
  if (m.side.stream) cudaStreamDestroy(m.side.stream);
  for (auto& sp : m.profiler.spans) cudaEventDestroy(sp.begin), cudaEventDestroy(sp.end);
  for (auto& st : m.profiler.steps) cudaEventDestroy(st.first), cudaEventDestroy(st.second);
  if (m.profiler.open_step) cudaEventDestroy(m.profiler.open_step);
  for (cudaEvent_t e : m.profiler.spare) cudaEventDestroy(e);
  for (StageSlot& st : m.stage) {
    if (st.pinned) cudaFreeHost(st.pinned);
    if (st.copied) cudaEventDestroy(st.copied);
    if (st.released) cudaEventDestroy(st.released);
  }
  if (m.allocated) cudaEventDestroy(m.allocated);
  if (m.copy_stream) cudaStreamDestroy(m.copy_stream);
  if (m.t0) cudaEventDestroy(m.t0);
  if (m.t1) cudaEventDestroy(m.t1);
  if (m.stream) cudaStreamDestroy(m.stream);
}

const ContextOptions& Context::options() const { return impl_->options; }

void Context::profile_step_begin() {
  Profiler& p = impl_->profiler;
  if (!p.on) return;
  if (p.open_step) p.spare.push_back(p.open_step);  // a step that never ended (no backward)
  p.open_step = p.event();
  cudaEventRecord(p.open_step, impl_->stream);
}

void Context::profile_step_end() {
  Profiler& p = impl_->profiler;
  if (!p.on || !p.open_step || p.steps.size() >= Profiler::kMaxSpans) return;
  cudaEvent_t end = p.event();
  cudaEventRecord(end, impl_->stream);
  p.steps.push_back({p.open_step, end});
  p.open_step = nullptr;
}
void Context::make_current() { CMSEG_CUDA(cudaSetDevice(impl_->options.device)); }
ContextOptions& Context::options_ref() { return impl_->options; }
int Context::device() const { return impl_->options.device; }
void* Context::stream_handle() const { return impl_->stream; }

void* Context::alloc(size_t bytes) {
  if (bytes == 0) return nullptr;
  Impl& m = *impl_;
  check_memory_limit(m.options, m.in_use, bytes);
  void* p = nullptr;
  const cudaError_t e = cudaMallocAsync(&p, bytes, m.stream);
  if (e != cudaSuccess) {
    cudaGetLastError();
    // Said in the user's terms: what failed, how much, and what to change.
    throw OutOfMemory(str("GPU out of memory: allocating ", mib_text(bytes), " failed with ", mib_text(m.in_use),
                          " in use by this model (", cudaGetErrorString(e),
                          "); use a smaller batch or patch, or free other GPU work"));
  }
  m.sizes[p] = bytes;
  m.in_use += bytes;
  m.peak = std::max(m.peak, m.in_use);
  return p;
}

void Context::free(void* p) {
  if (!p) return;
  Impl& m = *impl_;
  auto it = m.sizes.find(p);
  if (it == m.sizes.end()) throw Error("Context::free: pointer was not allocated by this context");
  m.in_use -= it->second;
  m.sizes.erase(it);
  CMSEG_CUDA(cudaFreeAsync(p, m.stream));
}

PoolStats Context::pool_stats() const {
  PoolStats s;
  s.in_use_bytes = impl_->in_use;
  s.peak_in_use_bytes = impl_->peak;
  uint64_t reserved = 0;
  CMSEG_CUDA(cudaMemPoolGetAttribute(impl_->pool, cudaMemPoolAttrReservedMemCurrent, &reserved));
  s.reserved_bytes = (size_t)reserved;
  return s;
}

void Context::reset_peak() { impl_->peak = impl_->in_use; }

void Context::trim(size_t keep_bytes) {
  CMSEG_CUDA(cudaStreamSynchronize(impl_->stream));
  CMSEG_CUDA(cudaMemPoolTrimTo(impl_->pool, keep_bytes));
}

void Context::upload(void* dst, const void* src, size_t bytes) {
  if (bytes) CMSEG_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, impl_->stream));
}

void Context::download(void* dst, const void* src, size_t bytes) {
  if (!bytes) return;
  CMSEG_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, impl_->stream));
  // The host array is read right after this returns, pinned or not.
  CMSEG_CUDA(cudaStreamSynchronize(impl_->stream));
}

void Context::copy(void* dst, const void* src, size_t bytes) {
  if (bytes) CMSEG_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, impl_->stream));
}

void Context::zero(void* dst, size_t bytes) {
  if (bytes) CMSEG_CUDA(cudaMemsetAsync(dst, 0, bytes, impl_->stream));
}

void Context::synchronize() { CMSEG_CUDA(cudaStreamSynchronize(impl_->stream)); }

namespace {
StageSlot& slot_of(Context::Impl& m, int slot) {
  if (slot < 0 || slot >= Context::kStageSlots) throw Error(str("stage slot ", slot, " out of range"));
  return m.stage[slot];
}
}  // namespace

void Context::stage_begin(int slot, size_t bytes) {
  Impl& m = *impl_;
  StageSlot& st = slot_of(m, slot);
  CMSEG_CUDA(cudaEventSynchronize(st.copied));  // its pinned memory is free again
  if (st.capacity < bytes) {
    if (st.pinned) CMSEG_CUDA(cudaFreeHost(st.pinned));
    st.pinned = nullptr, st.capacity = 0;
    if (cudaMallocHost(&st.pinned, bytes) != cudaSuccess) {
      cudaGetLastError();
      st.pinned = nullptr;
      throw OutOfMemory(str("out of pinned host memory: staging a batch of ", mib_text(bytes), " failed"));
    }
    st.capacity = bytes;
  }
  st.used = 0;
  CMSEG_CUDA(cudaStreamWaitEvent(m.copy_stream, st.released, 0));
}

void Context::stage_copy(int slot, void* dst, const void* src, size_t bytes) {
  Impl& m = *impl_;
  StageSlot& st = slot_of(m, slot);
  if (!bytes) return;
  if (st.used + bytes > st.capacity)
    throw Error(str("stage_copy: ", st.used + bytes, " bytes staged, stage_begin sized ", st.capacity));
  char* p = static_cast<char*>(st.pinned) + st.used;
  // Into pinned memory over the thread pool: a brats3d-gpu batch is about 80 MB, which
  // one thread copies in about the time the device takes for a bf16 step's backward.
  constexpr size_t kChunk = size_t(4) << 20;
  const int64_t chunks = (int64_t)((bytes + kChunk - 1) / kChunk);
  parallel_for(chunks, [&](int64_t c, int) {
    const size_t at = (size_t)c * kChunk;
    std::memcpy(p + at, static_cast<const char*>(src) + at, std::min(kChunk, bytes - at));
  });
  st.used += bytes;
  CMSEG_CUDA(cudaMemcpyAsync(dst, p, bytes, cudaMemcpyHostToDevice, m.copy_stream));
}

void Context::stage_end(int slot) {
  Impl& m = *impl_;
  StageSlot& st = slot_of(m, slot);
  CMSEG_CUDA(cudaEventRecord(st.copied, m.copy_stream));
  CMSEG_CUDA(cudaStreamWaitEvent(m.stream, st.copied, 0));
}

void Context::stage_release(int slot) noexcept {
  if (slot < 0 || slot >= kStageSlots) return;
  if (cudaEventRecord(impl_->stage[slot].released, impl_->stream) != cudaSuccess) {
    // No event to order the slot's next copies after: wait here instead, and leave
    // no error behind for the next launch check to blame on another kernel.
    cudaGetLastError();
    cudaStreamSynchronize(impl_->stream);
    cudaGetLastError();
  }
}

void Context::stage_abort(int slot) noexcept {
  if (slot < 0 || slot >= kStageSlots) return;
  Impl& m = *impl_;
  StageSlot& st = m.stage[slot];
  if (cudaEventRecord(st.copied, m.copy_stream) != cudaSuccess ||
      cudaStreamWaitEvent(m.stream, st.copied, 0) != cudaSuccess) {
    cudaGetLastError();
    cudaStreamSynchronize(m.copy_stream);  // no copy outlives the failed step
    cudaGetLastError();
  }
}

void Context::stage_after_alloc() {
  Impl& m = *impl_;
  CMSEG_CUDA(cudaEventRecord(m.allocated, m.stream));
  CMSEG_CUDA(cudaStreamWaitEvent(m.copy_stream, m.allocated, 0));
}

float Context::time_ms(const std::function<void()>& fn, int reps) {
  Impl& m = *impl_;
  fn();  // warm-up: algorithm choice, pool growth, first-launch costs
  CMSEG_CUDA(cudaEventRecord(m.t0, m.stream));
  for (int i = 0; i < reps; ++i) fn();
  CMSEG_CUDA(cudaEventRecord(m.t1, m.stream));
  CMSEG_CUDA(cudaEventSynchronize(m.t1));
  float ms = 0;
  CMSEG_CUDA(cudaEventElapsedTime(&ms, m.t0, m.t1));
  return ms / std::max(reps, 1);
}

size_t Context::conv_graph_runs() const { return impl_->graph_runs; }
size_t Context::conv_own_wgrad_runs() const { return impl_->own_wgrad_runs; }

// Counted as refusals are recorded (Impl::remember_algo, remember_plan): the caches evict,
// and a count of their refused entries would go down with them (a caller's before/after
// difference then wrapped around).
size_t Context::conv_fallbacks() const { return impl_->conv_refusals; }

ConvCacheStats conv_cache_stats(Context& ctx) {
  Context::Impl& m = ctx.impl();
  ConvCacheStats s;
  s.entries[0] = m.conv_algos.size(), s.added[0] = m.conv_algos.added(), s.evicted[0] = m.conv_algos.evicted();
  s.entries[1] = m.graph_plans.size(), s.added[1] = m.graph_plans.added(), s.evicted[1] = m.graph_plans.evicted();
  s.entries[2] = m.conv_paths.size(), s.added[2] = m.conv_paths.added(), s.evicted[2] = m.conv_paths.evicted();
  s.capacity = m.conv_algos.capacity();
  return s;
}

void set_conv_cache_capacity(Context& ctx, size_t entries) {
  Context::Impl& m = ctx.impl();
  m.conv_algos.set_capacity(entries);
  m.graph_plans.set_capacity(entries);  // evicted plans destroyed here, the cuDNN handle alive
  m.conv_paths.set_capacity(entries);
}

std::string Context::profile_report(int steps) {
  Impl& m = *impl_;
  if (!m.profiler.on) return "";
  synchronize();
  struct Row {
    double ms = 0;
    int calls = 0;
  };
  std::map<std::string, Row> rows, shapes;
  double total = 0;
  for (auto& sp : m.profiler.spans) {
    float ms = 0;
    CMSEG_CUDA(cudaEventElapsedTime(&ms, sp.begin, sp.end));
    Row& r = rows[sp.name];
    r.ms += ms, r.calls += 1;
    if (!sp.shape.empty()) {
      Row& sr = shapes[str(sp.name, " ", sp.shape)];
      sr.ms += ms, sr.calls += 1;
    }
    if (!std::strchr(sp.name, ':')) total += ms;  // "layer: part" spans lie inside their layer's
    m.profiler.spare.push_back(sp.begin), m.profiler.spare.push_back(sp.end);
  }
  m.profiler.spans.clear();
  // The marked steps: device span, idle gaps between consecutive ones.
  double span_ms = 0, gap_ms = 0;
  int gaps = 0;
  const size_t marked = m.profiler.steps.size();
  for (size_t k = 0; k < marked; ++k) {
    const auto& st = m.profiler.steps[k];
    float ms = 0;
    CMSEG_CUDA(cudaEventElapsedTime(&ms, st.first, st.second));
    span_ms += ms;
    if (k + 1 < marked) {
      CMSEG_CUDA(cudaEventElapsedTime(&ms, st.second, m.profiler.steps[k + 1].first));
      gap_ms += ms, ++gaps;
    }
    m.profiler.spare.push_back(st.first), m.profiler.spare.push_back(st.second);
  }
  m.profiler.steps.clear();
  const double per = std::max(steps, 1);
  auto table = [&](const std::map<std::string, Row>& t, int width) {
    std::vector<std::pair<std::string, Row>> sorted(t.begin(), t.end());
    std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
    std::string out;
    char line[200];
    for (auto& [name, r] : sorted) {
      std::snprintf(line, sizeof line, "  %-*s %9.3f ms/step %6.1f%% %6d calls\n", width, name.c_str(), r.ms / per,
                    total > 0 ? 100 * r.ms / total : 0.0, r.calls);
      out += line;
    }
    return out;
  };
  char line[160];
  std::snprintf(line, sizeof line, "  %-28s %9.3f ms/step (layer calls only)\n", "sum", total / per);
  std::string out = table(rows, 28);
  if (marked) {
    char st[320];
    std::snprintf(st, sizeof st,
                  "  steps: %zu marked; device span (first op to optimiser update) %.3f ms/step, of which outside "
                  "layer calls %.3f; device idle between steps %.3f ms (mean of %d gaps)\n",
                  marked, span_ms / marked, span_ms / marked - total / per, gaps ? gap_ms / gaps : 0.0, gaps);
    out += st;
  }
  out += line;
  if (!shapes.empty()) out += "device time by convolution shape, per step:\n" + table(shapes, 52) + "  end of shapes\n";
  return out;
}

}  // namespace cuda
}  // namespace cmseg
