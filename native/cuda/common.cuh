// Shared pieces of the CUDA backend: error checks, the context's internals, launch
// sizing and a deterministic block reduction. Included by the .cu files only.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>
#include <tuple>
#include <unordered_map>

#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "gemm_plan.hpp"
#include "shape_cache.hpp"

namespace cmseg {
namespace cuda {

[[noreturn]] inline void throw_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();  // clear the sticky-free error so the context stays usable
    throw OutOfMemory(str("GPU out of memory: ", what, " could not allocate at ", file, ":", line,
                          "; use a smaller batch or patch, or free other GPU work"));
  }
  throw Error(str("CUDA error ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ") in ", what, " at ", file, ":",
                  line));
}
// cuDNN and cuBLAS allocate device memory of their own outside the context's pool (a
// handle's state on creation, cuBLAS its workspace on first use): on a GPU the pool has
// filled, that fails with *_ALLOC_FAILED. It is an out-of-memory like the pool's own, so
// it is thrown as OutOfMemory: Model::run_device then gives the pool back (a smaller
// batch may fit next) and callers that try another way on OutOfMemory do so.
[[noreturn]] inline void throw_cudnn(cudnnStatus_t s, const char* what, const char* file, int line) {
#if CUDNN_MAJOR >= 9  // ALLOC_FAILED is now an alias of the *host* allocation failure
  const bool device_memory = s == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED;
#else
  const bool device_memory = s == CUDNN_STATUS_ALLOC_FAILED;
#endif
  if (device_memory)
    throw OutOfMemory(str("GPU out of memory: cuDNN could not allocate (", cudnnGetErrorString(s), ") in ", what,
                          " at ", file, ":", line, "; use a smaller batch or patch, or free other GPU work"));
  throw Error(str("cuDNN error ", cudnnGetErrorString(s), " in ", what, " at ", file, ":", line));
}
[[noreturn]] inline void throw_cublas(cublasStatus_t s, const char* what, const char* file, int line) {
#if defined(CUBLAS_VER_MAJOR) && CUBLAS_VER_MAJOR >= 12
  const std::string name = cublasGetStatusName(s);  // "CUBLAS_STATUS_...", not only its number
#else
  const std::string name = str((int)s);
#endif
  if (s == CUBLAS_STATUS_ALLOC_FAILED)
    throw OutOfMemory(str("GPU out of memory: cuBLAS could not allocate (", name, ") in ", what, " at ", file, ":",
                          line, "; use a smaller batch or patch, or free other GPU work"));
  throw Error(str("cuBLAS error ", name, " in ", what, " at ", file, ":", line));
}

#define CMSEG_CUDA(call)                                                          \
  do {                                                                            \
    const cudaError_t e_ = (call);                                                \
    if (e_ != cudaSuccess) ::cmseg::cuda::throw_cuda(e_, #call, __FILE__, __LINE__); \
  } while (0)
#define CMSEG_CUDNN(call)                                                                 \
  do {                                                                                    \
    const cudnnStatus_t s_ = (call);                                                      \
    if (s_ != CUDNN_STATUS_SUCCESS) ::cmseg::cuda::throw_cudnn(s_, #call, __FILE__, __LINE__); \
  } while (0)
#define CMSEG_CUBLAS(call)                                                                  \
  do {                                                                                      \
    const cublasStatus_t s_ = (call);                                                       \
    if (s_ != CUBLAS_STATUS_SUCCESS) ::cmseg::cuda::throw_cublas(s_, #call, __FILE__, __LINE__); \
  } while (0)
// After a kernel launch: launch-configuration errors surface here, not later.
#define CMSEG_CUDA_LAUNCHED(what) CMSEG_CUDA(cudaGetLastError())

// A cuDNN algorithm chosen once per convolution shape (conv_cudnn.cu).
struct ConvKey {
  int op;  // which call (forward, backward data, backward filter) of which layer
  int n, cin, cout, d, h, w, ndim;
  bool tf32;
  bool operator<(const ConvKey& o) const {
    return std::tie(op, n, cin, cout, d, h, w, ndim, tf32) <
           std::tie(o.op, o.n, o.cin, o.cout, o.d, o.h, o.w, o.ndim, o.tf32);
  }
};
// A finalized cuDNN graph-API plan (conv_graph.cu); null in the map: no usable engine.
struct GraphPlan;
struct ConvAlgo {
  int algo = 0;
  size_t workspace = 0;
  int math = 0;  // cudnnMathType_t the algorithm was chosen with
};

// Per-layer device time, for finding where a step goes (CMSEG_GPU_PROFILE=1 at
// context creation; Context::profile_report prints it). Each ProfileScope records a
// pair of events on the stream; the report waits for them and sums by name.
struct Profiler {
  static constexpr size_t kMaxSpans = size_t(1) << 16;  // unreported spans kept at most (then not recorded)
  bool on = false;
  struct Span {
    const char* name;
    cudaEvent_t begin, end;
    std::string shape;  // "cin->cout DxHxW" for the convolutions: the report's second table
  };
  std::vector<Span> spans;
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> steps;  // marked training steps
  cudaEvent_t open_step = nullptr;                          // begun, not yet ended
  std::vector<cudaEvent_t> spare;
  cudaEvent_t event() {
    cudaEvent_t e = nullptr;
    if (!spare.empty()) {
      e = spare.back();
      spare.pop_back();
    } else {
      CMSEG_CUDA(cudaEventCreate(&e));
    }
    return e;
  }
};

// One slot of batch staging (Context::stage_*).
struct StageSlot {
  void* pinned = nullptr;  // cudaMallocHost
  size_t capacity = 0, used = 0;
  cudaEvent_t copied = nullptr;    // on the copy stream, after the slot's copies
  cudaEvent_t released = nullptr;  // on the main stream, after the slot's last reader
};

// The second stream of ContextOptions::conv_overlap, with its own cuDNN and cuBLAS
// handles and the events that fork it from the model's stream and join it back.
struct SideStream {
  cudaStream_t stream = nullptr;
  cudnnHandle_t cudnn = nullptr;
  cublasHandle_t cublas = nullptr;
  cudaEvent_t fork = nullptr, join = nullptr;
};

struct Context::Impl {
  ContextOptions options;
  Profiler profiler;
  cudaStream_t copy_stream = nullptr;
  StageSlot stage[Context::kStageSlots];
  cudaEvent_t allocated = nullptr;
  cudaStream_t stream = nullptr;
  cudaMemPool_t pool = nullptr;
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  int multiprocessors = 1;
  size_t in_use = 0, peak = 0;
  std::unordered_map<void*, size_t> sizes;
  // Per-shape choices, each capped (shape_cache.hpp: least recently used out first). A
  // lookup's pointer is copied before the next insertion (which may evict it); a plan in
  // use is held by the caller's shared_ptr, and one evicted after its execution was enqueued
  // is destroyed at once, as PyTorch's LRU of cuDNN plans does: the kernels it launched
  // hold their parameters, the descriptor is host state.
  ShapeCache<ConvKey, ConvAlgo> conv_algos;                     // algo < 0: no usable algorithm
  // null: no usable engine, the legacy path runs it. Cleared before the cuDNN handle goes.
  ShapeCache<ConvKey, std::shared_ptr<GraphPlan>> graph_plans;
  size_t graph_runs = 0;                                         // convolutions the graph API ran
  size_t own_wgrad_runs = 0;  // filter gradients conv3_filter_grad.cu computed
  ShapeCache<ConvKey, int> conv_paths;                           // conv3's timed path per key (conv_autotune)
  // Shapes recorded as refused (an algorithm -1 or a null plan stored where none was), for
  // Context::conv_fallbacks: counted when recorded, so an eviction does not lower it (a
  // shape refused again after its entry was evicted counts again).
  size_t conv_refusals = 0;
  void remember_algo(const ConvKey& key, const ConvAlgo& a) {
    const ConvAlgo* old = conv_algos.find(key);
    if (a.algo < 0 && !(old && old->algo < 0)) ++conv_refusals;
    conv_algos.put(key, a);
  }
  void remember_plan(const ConvKey& key, std::shared_ptr<GraphPlan> plan) {
    std::shared_ptr<GraphPlan>* old = graph_plans.find(key);
    if (!plan && !(old && !*old)) ++conv_refusals;
    graph_plans.put(key, std::move(plan));
  }
  cudnnHandle_t cudnn_handle = nullptr;
  cublasHandle_t cublas_handle = nullptr;
  SideStream side;  // created on first use (OnSideStream)

  // Created on first use: loading cuDNN costs time a context without convolutions skips.
  cudnnHandle_t cudnn() {
    if (!cudnn_handle) {
      CMSEG_CUDNN(cudnnCreate(&cudnn_handle));
      CMSEG_CUDNN(cudnnSetStream(cudnn_handle, stream));
    }
    return cudnn_handle;
  }
  cublasHandle_t cublas() {
    if (!cublas_handle) {
      CMSEG_CUBLAS(cublasCreate(&cublas_handle));
      CMSEG_CUBLAS(cublasSetStream(cublas_handle, stream));
    }
    return cublas_handle;
  }
  // A grid for grid-stride kernels: enough blocks to fill the device a few times,
  // never more than the work needs. Depends only on the device, so reductions
  // that use it are reproducible run to run.
  int grid_for(int64_t items, int threads, int blocks_per_sm = 8) const {
    const int64_t need = (items + threads - 1) / threads;
    const int64_t cap = (int64_t)multiprocessors * blocks_per_sm;
    return (int)std::max<int64_t>(1, std::min(need, cap));
  }
};

inline cudaStream_t stream_of(Context& ctx) { return ctx.impl().stream; }

// Work enqueued in this scope runs on the side stream (ContextOptions::conv_overlap):
// it starts after everything enqueued on the model's stream so far, and the model's
// stream and handles are swapped for the side's, so kernels, cuDNN, cuBLAS and pool
// allocations and frees made in the scope go there. leave() (or the destructor)
// swaps back; join() makes the model's stream wait for the side's work. What the
// scope's work reads must not be freed on the model's stream before join(), nor
// anything the model's stream uses be freed inside the scope.
class OnSideStream {
 public:
  explicit OnSideStream(Context& ctx) : m_(ctx.impl()) {
    SideStream& s = m_.side;
    m_.cudnn(), m_.cublas();  // the model's handles exist (bound to its stream) before the swap
    // Each part made once, checked on its own (a failure part way leaves the rest to the next try).
    if (!s.stream) CMSEG_CUDA(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
    if (!s.fork) CMSEG_CUDA(cudaEventCreateWithFlags(&s.fork, cudaEventDisableTiming));
    if (!s.join) CMSEG_CUDA(cudaEventCreateWithFlags(&s.join, cudaEventDisableTiming));
    if (!s.cudnn) {
      CMSEG_CUDNN(cudnnCreate(&s.cudnn));
      CMSEG_CUDNN(cudnnSetStream(s.cudnn, s.stream));
    }
    if (!s.cublas) {
      CMSEG_CUBLAS(cublasCreate(&s.cublas));
      CMSEG_CUBLAS(cublasSetStream(s.cublas, s.stream));
    }
    CMSEG_CUDA(cudaEventRecord(s.fork, m_.stream));
    CMSEG_CUDA(cudaStreamWaitEvent(s.stream, s.fork, 0));
    swap();
    on_ = true;
  }
  // Back to the model's stream; the side's work so far is what join() waits for.
  void leave() {
    if (!on_) return;
    swap();
    on_ = false;
    record_join();
  }
  void join() {
    leave();
    if (left_) CMSEG_CUDA(cudaStreamWaitEvent(m_.stream, m_.side.join, 0));
    left_ = false;
  }
  // Never throws: also runs during unwinding (the model's stream then waits too, so
  // nothing the side still reads is freed under it).
  ~OnSideStream() {
    try {
      leave();
    } catch (...) {  // the side stream was waited for on the host
    }
    if (left_) cudaStreamWaitEvent(m_.stream, m_.side.join, 0);
  }
  OnSideStream(const OnSideStream&) = delete;
  OnSideStream& operator=(const OnSideStream&) = delete;

 private:
  // The join event after the side's work; when it cannot be recorded, the host waits
  // for the side stream instead (nothing it reads may be freed under it).
  void record_join() {
    const cudaError_t e = cudaEventRecord(m_.side.join, m_.side.stream);
    if (e == cudaSuccess) {
      left_ = true;
      return;
    }
    cudaStreamSynchronize(m_.side.stream);
    CMSEG_CUDA(e);
  }
  void swap() {
    std::swap(m_.stream, m_.side.stream);
    std::swap(m_.cudnn_handle, m_.side.cudnn);
    std::swap(m_.cublas_handle, m_.side.cublas);
  }
  Context::Impl& m_;
  bool on_ = false, left_ = false;
};

// cuBLAS's TF32 tensor cores follow the context's option, as the cuDNN convolutions do.
inline void cublas_math(Context& ctx) {
  CMSEG_CUBLAS(cublasSetMathMode(ctx.impl().cublas(),
                                 ctx.options().tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
}

// The GEMMs of gemm_plan.hpp on the context's cuBLAS handle (conv1_cublas.cu), with
// the context's TF32 choice: one call; a split product into its partial slots; the
// slots added into dst in slot order.
void run_gemm(Context& ctx, const GemmCall& c, const float* A, const float* B, float* C);
void run_split(Context& ctx, const FilterSplit& f, const float* A, const float* B, float* partial);
void add_slots(Context& ctx, const float* partial, int slots, int64_t slot, float* dst);

// n rows of `run` floats from src (row stride src_stride) to dst (row stride dst_stride),
// on the stream (concat.cu; also upconv2's images into and out of packed scratch).
void copy_rows(Context& ctx, float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t run, int n);

// Whether a device can run conv3's own filter-gradient kernel (conv3_filter_grad.cu):
// compute capability 8.0 or newer and the kernel's shared memory (asked once per device).
bool own_filter_grad_fits(int device);

// A pool allocation released at the end of the call (stream-ordered); 0 bytes: null.
struct Scratch {
  Context& ctx;
  void* p = nullptr;
  Scratch(Context& c, size_t bytes) : ctx(c), p(c.alloc(bytes)) {}
  // Never throws (it runs during unwinding, also after a device error; as Buffer::reset).
  ~Scratch() {
    try {
      ctx.free(p);
    } catch (...) {
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// conv3 (3x3(x3), stride 1, padding 1) through cuDNN's graph API (conv_graph.cu), on
// tensors [n, c, *s] in NCDHW or, with channels_last, NDHWC (the filter [cout, cin,
// taps] then stored [cout, taps, cin]). One direction per call, outputs written (not
// accumulated):
//   Forward        x = input, w = filter, y = output
//   BackwardData   x = the input's gradient (written), w = filter, y = the output's gradient
//   BackwardFilter x = input, w = the filter's gradient (written), y = the output's gradient
// Returns false when the graph API has no usable engine for the shape or a pointer is
// less than 16-byte aligned; the legacy API then runs it. Nothing the caller reads is
// changed by then (timing candidates may have written the output, which the legacy
// path overwrites: beta is 0 on every path that returns an output).
enum class GraphPart { Forward = 0, BackwardData = 1, BackwardFilter = 2 };
// bf16: every tensor of the call holds bf16 (the channels-last bf16 copies of
// ContextOptions::bf16), accumulated in fp32; else fp32 (tensor cores with tf32).
struct GraphShape {
  int n, cin, cout;
  Spatial s;
  int ndim;
  bool channels_last, tf32, bf16 = false;
};
bool graph_conv3(Context& ctx, GraphPart part, const GraphShape& g, const void* x, const void* w, const void* y);

// upconv2 through cuDNN, without the bias (conv_cudnn.cu; upconv2.cu chooses the
// path): on channels-last copies when channels_last (falling back to NCDHW), else
// on the NCDHW tensors. dx may be null; dw is accumulated into.
void upconv2_forward_cudnn(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout,
                           Spatial s, int ndim, bool channels_last);
void upconv2_backward_cudnn(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw,
                            int n, int cin, int cout, Spatial s, int ndim, bool channels_last);

// Sum of one double per thread over the block, in a fixed order (warp shuffles,
// then the warps' sums by warp 0), so the result is the same on every run. All
// threads of the block must call it; the total is returned to thread 0.
// `scratch` holds at least blockDim.x / 32 doubles of shared memory.
__device__ inline double block_sum(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0;
  if (warp == 0) {
    total = lane < warps ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) total += __shfl_down_sync(0xffffffffu, total, o);
  }
  return total;
}

inline unsigned blocks_for(int64_t items, int threads) { return (unsigned)((items + threads - 1) / threads); }

// Times the enclosing layer call on the context's stream when profiling is on. A
// convolution also names its shape, so the report can say which level's
// convolution the time goes to.
struct ProfileScope {
  Context::Impl& im;
  const char* name;
  cudaEvent_t begin = nullptr;
  std::string shape;
  ProfileScope(Context& ctx, const char* what) : im(ctx.impl()), name(what) {
    if (!im.profiler.on || im.profiler.spans.size() >= Profiler::kMaxSpans) return;
    begin = im.profiler.event();
    cudaEventRecord(begin, im.stream);
  }
  ProfileScope(Context& ctx, const char* what, int cin, int cout, Spatial s) : ProfileScope(ctx, what) {
    if (begin) shape = str(cin, "->", cout, " ", s.d, "x", s.h, "x", s.w);
  }
  ~ProfileScope() {
    if (!begin) return;
    cudaEvent_t end = nullptr;
    try {
      end = im.profiler.event();
    } catch (...) {
      return;
    }
    cudaEventRecord(end, im.stream);
    im.profiler.spans.push_back({name, begin, end, std::move(shape)});
  }
  ProfileScope(const ProfileScope&) = delete;
};

}  // namespace cuda
}  // namespace cmseg
