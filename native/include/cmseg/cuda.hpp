// The CUDA backend's C++ API (native/cuda/). No CUDA header is included here, so
// the rest of the library, the tests and the bindings compile with or without the
// toolkit; in a build without CUDA every entry point exists, available() is false
// and the rest throw cmseg::Error.
//
// Kernels take device pointers and run in order on the context's stream; they
// follow the conventions of the CPU reference in layers.hpp and loss.hpp (same
// argument order, activation gradients overwritten, parameter gradients
// accumulated) so that each one can be checked against it (native/tests/test_cuda.cpp).
// The `host` namespace at the end runs one layer on host arrays (copy in, run,
// copy out): slow, for tests and for trying a kernel from outside.
#pragma once
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "cmseg/error.hpp"
#include "cmseg/layers.hpp"
#include "cmseg/loss.hpp"
#include "cmseg/model.hpp"

namespace cmseg {
namespace cuda {

// ---- what this build and this machine have -----------------------------------
bool built();                      // the library was compiled with the CUDA backend
bool available();                  // built() and at least one usable device
std::string unavailable_reason();  // why available() is false ("" when it is true)

struct DeviceInfo {
  int index = 0;
  std::string name;                 // e.g. "NVIDIA H100 80GB HBM3"
  int cc_major = 0, cc_minor = 0;   // compute capability
  int multiprocessors = 0;
  size_t memory_bytes = 0;
  size_t l2_bytes = 0;
  size_t shared_bytes_per_block = 0;  // the most a kernel may opt in to (sharedMemPerBlockOptin)
  // The datasheet's memory bandwidth: 2 transfers per memory clock over the bus width
  // (H100 SXM: 2 x 2619 MHz x 5120 bit = 3.35 TB/s). 0 where the device does not say.
  double peak_memory_bytes_per_s = 0;
  int runtime_version = 0;          // cudaRuntimeGetVersion, e.g. 13020
  int driver_version = 0;           // cudaDriverGetVersion
  size_t cudnn_version = 0;         // cudnnGetVersion, e.g. 92600
  int cublas_version = 0;
};
// Throws cmseg::Error when !available() or the index is out of range.
DeviceInfo device_info(int device = 0);
// cuDNN version the library was linked against at run time (0 without CUDA).
size_t cudnn_version();

// ---- context: one device, one stream, one memory pool, library handles ---------
enum class UpconvPath { Gemm, Cudnn, CudnnChannelsLast };

// Who computes conv3's filter gradient (ContextOptions::conv_wgrad).
enum class WgradPath { Cudnn, Own, Auto };
inline const char* wgrad_path_name(WgradPath p) {
  return p == WgradPath::Cudnn ? "cudnn" : p == WgradPath::Own ? "own" : "auto";
}
// The path `name` names (CMSEG_CONV_WGRAD's values) into `out`; false when it names none.
inline bool wgrad_path_of(const std::string& name, WgradPath& out) {
  for (WgradPath p : {WgradPath::Cudnn, WgradPath::Own, WgradPath::Auto})
    if (name == wgrad_path_name(p)) return out = p, true;
  return false;
}
// "gemm", "cudnn", "cudnn-cl" (the names CMSEG_UPCONV takes).
inline const char* upconv_path_name(UpconvPath p) {
  return p == UpconvPath::Gemm ? "gemm" : p == UpconvPath::Cudnn ? "cudnn" : "cudnn-cl";
}

struct ContextOptions {
  int device = 0;
  // Convolutions may use TF32 tensor cores (cuDNN default math). Off: FMA math only,
  // bit-for-bit closer to the fp32 CPU reference and slower.
  bool tf32 = true;
  // 3x3(x3) convolutions on bfloat16 copies of their inputs and weights with fp32
  // accumulation (like torch.autocast(dtype=torch.bfloat16) for convolutions); the
  // model's tensors, the other layers, the loss and Adam stay fp32.
  bool bf16 = false;
  // Upper bound for one convolution's cuDNN workspace; 0: a sixteenth of the
  // device's memory, at least 1 GiB (the channels-last 3D filter gradient of the
  // brats3d-gpu step asks for 1034 MiB). CMSEG_CUDNN_WORKSPACE_MB overrides it.
  size_t max_workspace_bytes = 0;
  // Choose each convolution's algorithm by timing cuDNN's candidates once per shape
  // (like torch.backends.cudnn.benchmark) instead of by cuDNN's legacy heuristics,
  // whose picks for 3D NCDHW backward passes ran ~40x below the tensor cores on an
  // H200 (BENCHMARKS.md). CMSEG_CUDNN_BENCHMARK=0 in the environment turns it off.
  bool conv_benchmark = true;
  // conv3 runs cuDNN on NDHWC (2D: NHWC) copies of its tensors, where cuDNN has
  // tensor-core kernels for 3D; off: directly on the model's NCDHW tensors.
  // CMSEG_CONV_CHANNELS_LAST=0 in the environment turns it off.
  bool conv_channels_last = true;
  // conv3 through cuDNN's graph (backend) API first, on the same tensors (NCDHW or the
  // channels-last copies), its engines timed once per shape like PyTorch's
  // cudnn.benchmark (native/cuda/conv_graph.cu); a shape it cannot run takes the
  // legacy API. CMSEG_CUDNN_GRAPH=1 in the environment turns it on.
  bool conv_graph = false;
  // conv3's path chosen per direction and shape by timing the four fp32 ones (legacy
  // or graph API, channels-last copies or NCDHW) inside the first call, the fastest
  // kept (native/cuda/conv_cudnn.cu); conv_channels_last and conv_graph are then
  // ignored for conv3. On an H200 it took 1-1.5 ms off the brats3d-gpu step's 78 ms
  // of layer time and 0.7 GiB off its peak (BENCHMARKS.md). Not with bf16 (that runs
  // the graph API on bf16 copies). CMSEG_CONV_AUTOTUNE=0 in the environment turns it off.
  bool conv_autotune = true;
  // conv3's filter gradient runs on a second stream while its data gradient runs on
  // the model's stream, joined before the call returns (native/cuda/conv_cudnn.cu).
  // cuDNN's 3D filter-gradient kernels run at a third of the forward's TFLOP/s, so
  // this was tried; on an H200 each direction slowed the other (filter gradients
  // 34 -> 43 ms, data gradients 12 -> 18 ms per step) and the step gained nothing,
  // so it stays off. CMSEG_CONV_OVERLAP=1 turns it on.
  bool conv_overlap = false;
  // The fused heads' weight and bias gradients in one pass over the features and the
  // heads' gradients (native/cuda/conv1_cublas.cu), instead of cuBLAS per head and a
  // bias reduction per head. Off until a device run has timed it;
  // CMSEG_HEADS_WGRAD=fused in the environment turns it on (=cublas off).
  bool heads_fused_weight_grad = false;
  // The decoder's up-convolutions write their output straight into the second half of
  // each image's concat buffer, and their backward reads its gradient from there: the
  // concat copies (and the split) move the skip half only. GEMM upconv path only (the
  // default; the cuDNN paths keep the copies). Off until a device run has timed it;
  // CMSEG_CONCAT_IN_PLACE=1 in the environment turns it on.
  bool concat_in_place = false;
  // conv3's filter gradient (3D, TF32) through our own tensor-core kernel on the NCDHW
  // tensors (native/cuda/conv3_filter_grad.cu) instead of cuDNN: Cudnn never, Own for
  // every 3D TF32 call, Auto per shape whichever of the two ran faster when timed
  // inside its first call, where their filter gradients agree to TF32's rounding (see
  // own_wgrad_wanted). cuDNN's 3D filter gradient was 33 of the 78 ms of an H200
  // brats3d-gpu step, at a third of its forward's TFLOP/s. Cudnn until a device run
  // has timed the kernel; CMSEG_CONV_WGRAD=cudnn|own|auto in the environment chooses.
  WgradPath conv_wgrad = WgradPath::Cudnn;
  // How the transposed convolutions (upconv2) run: as cuBLAS GEMMs with our own
  // scatter and gather kernels (native/cuda/upconv2.cu), or through cuDNN on the
  // NCDHW tensors or on channels-last copies. CMSEG_UPCONV=gemm|cudnn|cudnn-cl in the
  // environment chooses.
  UpconvPath upconv = UpconvPath::Gemm;
  // Most bytes of one GEMM chunk's scratch (the product before its scatter, the
  // gathered gradient); 0: 128 MiB.
  size_t upconv_chunk_bytes = 0;
  // Blocks per SM the instance-norm passes aim for (native/cuda/instance_norm.cu): at 4,
  // brats3d-gpu's top level (64 planes of 2M voxels) gets 9 blocks a plane, about 1100
  // threads an SM with one 16-byte load in flight each, and the passes moved 58-72% of
  // an H200's bandwidth (BENCHMARKS.md), so more may pay; 4 until a device run has timed
  // others. CMSEG_IN_BLOCKS_PER_SM (1..32) in the environment sets it.
  int instance_norm_blocks_per_sm = 4;
  // Most bytes this context may hold at once (0: no limit of its own); past it
  // alloc() throws OutOfMemory like a full device.
  size_t memory_limit_bytes = 0;
};

// The CMSEG_* variables of the environment over `o` (each named at its option above):
// how the device check and the benchmarks switch paths without a rebuild. A value that
// names no path is an error, not silently the default.
inline void apply_environment(ContextOptions& o) {
  auto var = [](const char* name) -> const char* {
    const char* v = std::getenv(name);
    return v && *v ? v : nullptr;
  };
  auto flag = [&](const char* name, bool& out) {
    if (const char* v = var(name)) out = std::string(v) != "0";
  };
  flag("CMSEG_CUDNN_BENCHMARK", o.conv_benchmark);
  flag("CMSEG_CONV_CHANNELS_LAST", o.conv_channels_last);
  flag("CMSEG_CUDNN_GRAPH", o.conv_graph);
  flag("CMSEG_CONV_AUTOTUNE", o.conv_autotune);
  flag("CMSEG_CONV_OVERLAP", o.conv_overlap);
  flag("CMSEG_CONCAT_IN_PLACE", o.concat_in_place);
  if (const char* mb = var("CMSEG_CUDNN_WORKSPACE_MB")) o.max_workspace_bytes = (size_t)std::strtoull(mb, nullptr, 10) << 20;
  if (const char* v = var("CMSEG_IN_BLOCKS_PER_SM"); v && std::atoi(v) >= 1 && std::atoi(v) <= 32)
    o.instance_norm_blocks_per_sm = std::atoi(v);  // others keep the default, as before
  if (const char* v = var("CMSEG_UPCONV")) {
    bool known = false;
    for (UpconvPath p : {UpconvPath::Gemm, UpconvPath::Cudnn, UpconvPath::CudnnChannelsLast})
      if (std::string(v) == upconv_path_name(p)) o.upconv = p, known = true;
    if (!known) throw Error(str("CMSEG_UPCONV must be gemm, cudnn or cudnn-cl, not '", v, "'"));
  }
  if (const char* v = var("CMSEG_CONV_WGRAD"); v && !wgrad_path_of(v, o.conv_wgrad))
    throw Error(str("CMSEG_CONV_WGRAD must be cudnn, own or auto, not '", v, "'"));
  if (const char* v = var("CMSEG_HEADS_WGRAD")) {
    const std::string h = v;
    if (h != "fused" && h != "cublas") throw Error(str("CMSEG_HEADS_WGRAD must be fused or cublas, not '", h, "'"));
    o.heads_fused_weight_grad = h == "fused";
  }
}

// Whether the options send a conv3 filter gradient of this many spatial dimensions to
// our own kernel (ContextOptions::conv_wgrad, 3D TF32 without bf16), before asking the
// device whether it can run it (and, with Auto, timing it per shape).
inline bool own_wgrad_wanted(const ContextOptions& o, int ndim) {
  return o.conv_wgrad != WgradPath::Cudnn && ndim == 3 && o.tf32 && !o.bf16;
}

// v rounded to bfloat16 (nearest, ties to even) and back, on the host: what the
// device's __float2bfloat16_rn does to a finite value (used by the host emulation
// and the tests to reproduce the bf16 path's rounding).
inline float round_to_bf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  std::memcpy(&v, &u, 4);
  return v;
}

// Bytes as MiB with one decimal, for messages ("4294967296.0 MiB", not "4.29e+09").
// Sizes under 0.1 MiB in KiB: a small allocation or a tiny gpuMemoryLimitMB read "0.0 MiB".
inline std::string mib_text(size_t bytes) {
  char b[48];
  if (bytes < 104858)
    std::snprintf(b, sizeof b, "%.1f KiB", bytes / 1024.0);
  else
    std::snprintf(b, sizeof b, "%.1f MiB", bytes / 1048576.0);
  return b;
}

// The limit rule of Context::alloc (also used by the host emulation, so both say
// the same thing): throws OutOfMemory when `bytes` more would pass the limit.
inline void check_memory_limit(const ContextOptions& o, size_t in_use, size_t bytes) {
  if (o.memory_limit_bytes && in_use + bytes > o.memory_limit_bytes)
    throw OutOfMemory(str("GPU out of memory: allocating ", mib_text(bytes), " would pass this model's limit of ",
                          mib_text(o.memory_limit_bytes), " (gpuMemoryLimitMB) with ", mib_text(in_use),
                          " in use; use a smaller batch or patch, or raise the limit"));
}

struct PoolStats {
  size_t in_use_bytes = 0;      // allocated through this context and not yet freed
  size_t peak_in_use_bytes = 0;
  size_t reserved_bytes = 0;    // held by the device memory pool (cached for reuse)
};

class Context {
 public:
  explicit Context(const ContextOptions& options = {});
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;

  const ContextOptions& options() const;
  // Makes this context's device the calling thread's current one. CUDA's current
  // device is per thread, and a model's work runs on whichever thread calls it
  // (Node's worker pool), so every entry point of ModelGpu calls this first.
  void make_current();
  // Options that may change between calls (the tests and the benchmarks switch paths).
  void set_tf32(bool on) { options_ref().tf32 = on; }
  void set_conv_channels_last(bool on) { options_ref().conv_channels_last = on; }
  void set_conv_graph(bool on) { options_ref().conv_graph = on; }
  void set_conv_autotune(bool on) { options_ref().conv_autotune = on; }
  void set_conv_overlap(bool on) { options_ref().conv_overlap = on; }
  void set_heads_fused_weight_grad(bool on) { options_ref().heads_fused_weight_grad = on; }
  void set_concat_in_place(bool on) { options_ref().concat_in_place = on; }
  void set_conv_wgrad(WgradPath path) { options_ref().conv_wgrad = path; }
  void set_bf16(bool on) { options_ref().bf16 = on; }
  void set_upconv(UpconvPath path, size_t chunk_bytes = 0) {
    options_ref().upconv = path;
    options_ref().upconv_chunk_bytes = chunk_bytes;
  }
  int device() const;

  // Stream-ordered allocation from the device's memory pool (cudaMallocAsync).
  // Memory freed on the stream is reused by later allocations without a device
  // synchronisation; the pool keeps it cached (release threshold: unlimited).
  // Throws cmseg::OutOfMemory naming the size when the pool cannot grow.
  void* alloc(size_t bytes);
  void free(void* p);
  PoolStats pool_stats() const;
  // Starts a new peak from what is in use now (like torch.cuda.reset_peak_memory_stats):
  // the benchmark measures steady-state steps, after the first step's algorithm search.
  void reset_peak();
  // Returns cached pool memory beyond `keep_bytes` to the device.
  void trim(size_t keep_bytes = 0);

  // Copies on the context's stream. Host memory may be pageable.
  void upload(void* device_dst, const void* host_src, size_t bytes);
  void download(void* host_dst, const void* device_src, size_t bytes);
  void copy(void* device_dst, const void* device_src, size_t bytes);
  void zero(void* device_dst, size_t bytes);
  void synchronize();

  // ---- batch staging: uploads that overlap the work queued before them -------
  // Two slots, alternated by a training run. A slot's batch goes through pinned host
  // memory and is copied on a second stream once the main stream has released the
  // slot (after the step that last read it), so the copy runs under the previous
  // step's backward; the main stream waits for the copies before reading them.
  //   stage_begin(slot, bytes)  host-waits for the slot's previous copies, sizes its
  //                             pinned memory, and orders the copies after the release
  //   stage_copy(slot, dst, src, bytes)  host memcpy into pinned memory, then the copy
  //   stage_end(slot)           the main stream waits for the slot's copies
  //   stage_release(slot)       the main stream is done with the slot (never throws)
  //   stage_abort(slot)         after a failed stage_copy/stage_end: fences the copies
  //                             already queued, as stage_end would (never throws)
  //   stage_after_alloc()       the copy stream waits for allocations just made on the
  //                             main stream (a slot's device buffers were (re)allocated)
  static constexpr int kStageSlots = 2;
  void stage_begin(int slot, size_t bytes);
  void stage_copy(int slot, void* device_dst, const void* host_src, size_t bytes);
  void stage_end(int slot);
  void stage_release(int slot) noexcept;
  void stage_abort(int slot) noexcept;
  void stage_after_alloc();

  // Times `fn` (which launches work on this context) with CUDA events: one untimed
  // call, then the mean of `reps` calls, in milliseconds.
  float time_ms(const std::function<void()>& fn, int reps = 10);

  // Convolution shapes (per direction and path) for which cuDNN had no usable
  // algorithm, so the call took the next path (channels-last -> NCDHW, bf16 -> fp32).
  size_t conv_fallbacks() const;
  // Convolutions run through cuDNN's graph API so far (ContextOptions::conv_graph).
  size_t conv_graph_runs() const;
  // conv3 filter gradients our own kernel computed (conv3_backward_filter_own) so far.
  size_t conv_own_wgrad_runs() const;

  // With CMSEG_GPU_PROFILE=1 set when the context was made: the device time of each
  // layer call since the last report, summed by layer, per step over `steps`, largest
  // first (waits for the stream). Empty when profiling is off.
  // With profiling on, it also reports the training steps marked since: the device
  // time from a step's first operation to its last (ModelGpu::run to the optimiser
  // update), the part of it outside any layer call, and the device's idle time from
  // one step's end to the next one's start.
  std::string profile_report(int steps = 1);
  // Marks where a training step's work begins and ends on the stream (with
  // profiling on; otherwise nothing).
  void profile_step_begin();
  void profile_step_end();

  // The cudaStream_t, as an opaque pointer (for interop; the backend's own code
  // reaches it through impl()).
  void* stream_handle() const;

  struct Impl;
  Impl& impl() { return *impl_; }

 private:
  // The options held in Impl (each backend's: context.cu, the host emulation, cuda_off.cpp).
  ContextOptions& options_ref();
  std::unique_ptr<Impl> impl_;
};

// A typed device array owned by a context (freed on its stream).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  Buffer(Context& ctx, size_t count) : ctx_(&ctx), count_(count) {
    if (count) ptr_ = static_cast<T*>(ctx.alloc(count * sizeof(T)));
  }
  Buffer(Context& ctx, const std::vector<T>& host) : Buffer(ctx, host.size()) { upload(host.data()); }
  ~Buffer() { reset(); }
  Buffer(Buffer&& o) noexcept { *this = std::move(o); }
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) {
      reset();
      ctx_ = o.ctx_, ptr_ = o.ptr_, count_ = o.count_;
      o.ptr_ = nullptr, o.count_ = 0;
    }
    return *this;
  }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  T* data() const { return ptr_; }
  size_t size() const { return count_; }
  size_t bytes() const { return count_ * sizeof(T); }
  void upload(const T* host) { if (count_) ctx_->upload(ptr_, host, bytes()); }
  void download(T* host) const { if (count_) ctx_->download(host, ptr_, bytes()); }
  std::vector<T> to_host() const {
    std::vector<T> v(count_);
    download(v.data());
    return v;
  }
  void zero() { if (count_) ctx_->zero(ptr_, bytes()); }
  // Never throws: it runs in destructors, also after a device error.
  void reset() noexcept {
    if (ptr_) {
      try {
        ctx_->free(ptr_);
      } catch (...) {
      }
    }
    ptr_ = nullptr, count_ = 0;
  }

 private:
  Context* ctx_ = nullptr;
  T* ptr_ = nullptr;
  size_t count_ = 0;
};

// ---- layers on device pointers (cuDNN: conv_cudnn.cu) ---------------------------
// Layout NCDHW (N, C, *S); 2D is depth 1 with ndim == 2, as in layers.hpp.
void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int ndim);
// dx may be null; dw is accumulated.
void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim);
// dw += conv3's filter gradient (3D) through our own TF32 tensor-core kernel
// (conv3_filter_grad.cu), whatever ContextOptions::conv_wgrad says (conv3_backward
// calls it as that option says). Needs compute capability 8.0 or newer.
void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s);
// Transposed convolution, kernel 2, stride 2, with bias; s is the input extent.
// y_image_stride: floats from one image of y to the next (0: cout * output positions,
// packed); larger when y is a part of each image of a concat buffer (ContextOptions::
// concat_in_place).
void upconv2_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                     Spatial s, int ndim, int64_t y_image_stride = 0);
// dx may be null; dw and db are accumulated. dy_image_stride: as y_image_stride.
void upconv2_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                      int n, int cin, int cout, Spatial s, int ndim, int64_t dy_image_stride = 0);

// ---- instance norm (+ fused ReLU): instance_norm.cu -----------------------------
// mean, rstd: [n * c] device arrays written by the forward and read by the backward.
void instance_norm_forward(Context& ctx, const float* x, const float* gamma, const float* beta, float* y, float* mean,
                           float* rstd, int n, int c, int64_t V, bool relu);
// dx may be null, or dy itself (in place); dgamma and dbeta are accumulated. The
// forward's output is not an argument: the ReLU's mask is recomputed from x, the
// statistics, gamma and beta as the forward computed it (bit for bit), so the output
// need not be kept for the backward, and each of its two passes reads one tensor fewer.
void instance_norm_backward(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                            const float* beta, const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c,
                            int64_t V, bool relu);
// The forward's output again, from its input and the statistics the forward wrote:
// bit for bit what instance_norm_forward wrote (the model's backward recomputes each
// block's first activation instead of keeping it).
void instance_norm_apply(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                         const float* beta, float* y, int n, int c, int64_t V, bool relu);

// ---- max-pool 2, stride 2: maxpool.cu ------------------------------------------
void maxpool2_forward(Context& ctx, const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim);
void maxpool2_backward(Context& ctx, const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim);

// ---- fused CM loss (SPEC section 4): cm_loss.cu --------------------------------
// Same structures as the CPU cm_loss, with every pointer in `in` and the gradient
// pointers in `out` on the device (present may be null). Fills out.loss, out.ce and
// out.trace on the host: the call waits for the loss kernels to finish.
void cm_loss(Context& ctx, const CmLossInput& in, CmLossOutput& out);
// The main kernel the last cm_loss call on this thread ran: "pixel" (default),
// "pairs" or "prefetch" (CMSEG_CM_LOSS_KERNEL=pairs|prefetch, where each applies);
// "none" before any.
const char* last_cm_loss_kernel();

// ---- multi-tensor Adam / AdamW: adam.cu ----------------------------------------
struct AdamTensor {
  float* w = nullptr;        // value (updated)
  const float* g = nullptr;  // gradient
  float* m = nullptr;        // first moment (updated)
  float* v = nullptr;        // second moment (updated)
  int64_t numel = 0;
};
// One optimiser step for every tensor in one launch; `step` is the step number
// after the increment (1 for the first update), as Model::apply_optimizer uses it.
// `refused` (device memory, optional): when it holds a nonzero value the launch
// changes nothing (the guard find_unsquarable set, read on the device: no host wait).
void adam_step(Context& ctx, const std::vector<AdamTensor>& tensors, const OptimConfig& o, int64_t step,
               const unsigned long long* refused = nullptr);
// Adam's guard: for the first k < n where g[k] + l2 * w[k] is not a finite number of
// magnitude <= limit, raises *flag (device memory, zeroed by the caller) to n - k (so
// the largest value names the first such k); leaves it alone when there is none.
void find_unsquarable(Context& ctx, const float* g, const float* w, int64_t n, float l2, float limit,
                      unsigned long long* flag);

// ---- 1x1(x1) convolution with bias, the heads: conv1_cublas.cu -------------------
// w: [cout, cin]. As layers.hpp: dx_accumulate is added to (+=), dw and db accumulate.
void conv1_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                   int64_t V);
void conv1_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx_accumulate, float* dw,
                    float* db, int n, int cin, int cout, int64_t V);
// Several heads on the same features (layers.hpp's Conv1Head, device pointers): the
// features are read once for every head, and each head's gradient once for dx.
// Same results as one call per head, to rounding.
void conv1_forward_heads(Context& ctx, const float* x, const std::vector<Conv1Head>& heads, int n, int cin,
                         int64_t V);
void conv1_backward_heads(Context& ctx, const float* x, const std::vector<Conv1Head>& heads, float* dx_accumulate,
                          int n, int cin, int64_t V);

// ---- channel concat of the decoder and elementwise sums: concat.cu ----------------
// y = cat([a, b], channel).
// b may be null: y's second part is written already (the decoder's up-convolution wrote
// it in place).
void concat_forward(Context& ctx, const float* a, int ca, const float* b, int cb, float* y, int n, int64_t V);
// Splits dy: da and db may be null; db is overwritten; da is overwritten, or added
// to when da_accumulate (the skip gradient meeting the encoder's own).
void concat_backward(Context& ctx, const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V,
                     bool da_accumulate = false);
// y += x over count elements.
void add_inplace(Context& ctx, float* y, const float* x, int64_t count);

// ---- plain cross-entropy on the consensus logits (naive / oracle): ce_loss.cu ------
// The CPU reference's ce_loss_hard / ce_loss_soft on device arrays: d_logits may be
// null; the loss is returned to the host (the call waits for the loss kernels).
double ce_loss_hard(Context& ctx, const float* logits, const uint8_t* labels, int n, int L, int64_t V,
                    float* d_logits);
double ce_loss_soft(Context& ctx, const float* logits, const float* target, int n, int L, int64_t V,
                    float* d_logits);

// ---- prediction: softmax.cu and cm_loss.cu -----------------------------------------
void softmax_forward(Context& ctx, const float* z, float* p, int n, int c, int64_t V);
// Per pixel and annotator, A_r from its raw head channels ([n, K, V], or one [L, L]
// raw matrix for global mode: the same CM everywhere) as cm_from_raw computes it;
// cms (may be null): [n, R, L*L, V]; annotator_probs (may be null): [n, R, L, V],
// q_r = A_r p with probs [n, L, V].
void cm_predict(Context& ctx, CmMode mode, int L, int rank, const std::vector<const float*>& cm_raw,
                const float* probs, int n, int R, int64_t V, float* cms, float* annotator_probs);

// ---- the whole U-Net on the device: unet_cuda.cpp ----------------------------------
// An optimiser step the device refused (see ModelGpu::adam), reported late: `step`
// is the refused step's number; the weights and moments are those from before it.
class RefusedUpdate : public Error {
 public:
  RefusedUpdate(const std::string& message, int64_t step) : Error(message), step(step) {}
  int64_t step;
};

// The GPU half of a cmseg::Model with ModelConfig::device == Device::Cuda (Model
// owns one and dispatches to it; use Model, not this class, from outside). It holds
// the parameters (values, gradients, Adam moments) as four contiguous device arrays,
// the activations of the last forward pass (reused while the batch shape stays the
// same) and the uploaded batch. Same graph, same order of operations and the same
// conventions as the CPU reference in native/model/unet.cpp.
// TODO(bf16): activations and convolutions in bf16 (with fp32 master weights) are
// not attempted yet.
class ModelGpu {
 public:
  // `params`: the model's parameters, named as SPEC section 2 (the graph is found
  // from the names); uploaded here. Throws cmseg::Error when no device is usable.
  ModelGpu(const ModelConfig& config, const std::vector<Param>& params);
  ~ModelGpu();
  ModelGpu(const ModelGpu&) = delete;
  ModelGpu& operator=(const ModelGpu&) = delete;

  Context& context();
  void set_tf32(bool on);

  // Host -> device (value, grad, m, v of every parameter) and back.
  void upload_params(const std::vector<Param>& params);
  void download_params(std::vector<Param>& params);

  // Forward + loss (+ backward into the device gradients, overwritten). The batch is
  // on the host and already validated. Waits for the loss, not for the backward.
  StepResult run(const Batch& batch, bool backward, float trace_weight);
  // One Adam / AdamW step on the device gradients; `step` counted after the increment.
  // The device refuses the update (changes nothing) when a gradient's square would
  // overflow float32, as the CPU's check_gradients_squarable; the host learns of it
  // without waiting for the update: from the next call that waits for the stream
  // anyway (run, after the next forward pass; download_params; adam), which throws
  // RefusedUpdate once. predict leaves it pending (the weights it reads are valid).
  void adam(const OptimConfig& o, int64_t step);
  // Host arrays as Model::predict (cms, annotator_probs may be null). Waits.
  void predict(const float* images, int n, Spatial s, float* probs, float* cms, float* annotator_probs);
  // Frees every activation, scratch and batch buffer (kept between steps for reuse);
  // the parameters stay. After an out-of-memory step, so a smaller batch can follow.
  void release_activations();

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// ---- the same layers on host arrays (copy in, run, copy out) --------------------
namespace host {
void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int ndim);
void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int ndim);
void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s);
void upconv2_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                     Spatial s, int ndim);
void upconv2_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                      int n, int cin, int cout, Spatial s, int ndim);
void instance_norm_forward(Context& ctx, const float* x, const float* gamma, const float* beta, float* y, float* mean,
                           float* rstd, int n, int c, int64_t V, bool relu);
void instance_norm_backward(Context& ctx, const float* x, const float* mean, const float* rstd, const float* gamma,
                            const float* beta, const float* dy, float* dx, float* dgamma, float* dbeta, int n, int c,
                            int64_t V, bool relu);
void maxpool2_forward(Context& ctx, const float* x, float* y, uint8_t* arg, int nc, Spatial s, int ndim);
void maxpool2_backward(Context& ctx, const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int ndim);
// Host pointers in, host results out; the shapes are those of the CPU cm_loss.
void cm_loss(Context& ctx, const CmLossInput& in, CmLossOutput& out);
// Updates the host arrays of each Param (value, m, v) from its grad.
void adam_step(Context& ctx, std::vector<Param>& params, const OptimConfig& o, int64_t step);
}  // namespace host

}  // namespace cuda
}  // namespace cmseg
