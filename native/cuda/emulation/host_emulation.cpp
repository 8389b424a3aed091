// Host emulation of the CUDA backend's layer API (cmseg/cuda.hpp), for CI on
// machines without a GPU: "device" memory is malloc'd host memory, poisoned with
// 0xff bytes (NaN) on allocation so a read of never-written memory shows up in
// the results, and every kernel is the CPU reference layer it mirrors.
//
// What it checks: the GPU U-Net's orchestration (native/cuda/unet_cuda.cpp and
// native/model/model_device.cpp: graph, buffer sizes and reuse, parameter
// offsets, accumulate-vs-overwrite, the lazy host/device parameter sync) against
// the CPU model, under AddressSanitizer (test_cuda_emulated, CMake option
// CMSEG_CUDA_EMULATION). What it cannot check: the CUDA kernels themselves,
// cuDNN/cuBLAS calls and stream ordering: that is test_cuda on a GPU.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"
#include "../shape_cache.hpp"
#include "../upconv2_gemm.hpp"

namespace cmseg {
namespace cuda {

bool built() { return true; }
bool available() { return true; }  // the emulation is always "there"
std::string unavailable_reason() { return ""; }
DeviceInfo device_info(int) {
  DeviceInfo d;
  d.name = "host emulation (no GPU)";
  return d;
}
size_t cudnn_version() { return 0; }

struct Context::Impl {
  ContextOptions options;
  size_t in_use = 0, peak = 0;
  size_t own_wgrad_runs = 0;
  std::unordered_map<void*, size_t> sizes;
  // Stands in for the device context's per-shape caches (shape_cache.hpp): one entry per
  // conv3 direction and shape run, under the same capacity and eviction, so that
  // test_cuda's cache cases run here too (conv_cache_stats reports it as the algorithms').
  ShapeCache<std::array<int, 9>, int> conv_shapes;
};
Context::Context(const ContextOptions& o) : impl_(new Impl) {
  impl_->options = o;
  apply_environment(impl_->options);  // as context.cu
}
Context::~Context() { for (auto& kv : impl_->sizes) std::free(kv.first); }
const ContextOptions& Context::options() const { return impl_->options; }
void Context::make_current() {}
// Staging is a plain copy on the host (no streams to overlap); the slot checks hold.
void Context::stage_begin(int slot, size_t) {
  if (slot < 0 || slot >= kStageSlots) throw Error("stage slot out of range");
}
void Context::stage_copy(int, void* dst, const void* src, size_t bytes) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void Context::stage_end(int) {}
void Context::stage_release(int) noexcept {}
void Context::stage_abort(int) noexcept {}
void Context::stage_after_alloc() {}
ContextOptions& Context::options_ref() { return impl_->options; }
int Context::device() const { return 0; }
void* Context::alloc(size_t bytes) {
  if (!bytes) return nullptr;
  check_memory_limit(impl_->options, impl_->in_use, bytes);  // the rule and words of context.cu
  void* p = std::malloc(bytes);
  // Poison (0xff bytes are a NaN): reads of memory nobody wrote show up in the results.
  std::memset(p, 0xff, bytes);
  impl_->sizes[p] = bytes; impl_->in_use += bytes; impl_->peak = std::max(impl_->peak, impl_->in_use);
  return p;
}
void Context::free(void* p) {
  if (!p) return;
  auto it = impl_->sizes.find(p);
  if (it == impl_->sizes.end()) throw Error("emulated free: unknown pointer");
  impl_->in_use -= it->second; impl_->sizes.erase(it); std::free(p);
}
PoolStats Context::pool_stats() const { PoolStats s; s.in_use_bytes = impl_->in_use; s.peak_in_use_bytes = impl_->peak; return s; }
void Context::trim(size_t) {}
void Context::reset_peak() { impl_->peak = impl_->in_use; }
void Context::upload(void* d, const void* s, size_t b) { if (b) std::memcpy(d, s, b); }
void Context::download(void* d, const void* s, size_t b) { if (b) std::memcpy(d, s, b); }
void Context::copy(void* d, const void* s, size_t b) { if (b) std::memmove(d, s, b); }
void Context::zero(void* d, size_t b) { if (b) std::memset(d, 0, b); }
void Context::synchronize() {}
float Context::time_ms(const std::function<void()>& fn, int) { fn(); return 1.f; }
void* Context::stream_handle() const { return nullptr; }
std::string Context::profile_report(int) { return ""; }
void Context::profile_step_begin() {}
void Context::profile_step_end() {}
size_t Context::conv_fallbacks() const { return 0; }
size_t Context::conv_graph_runs() const { return 0; }
size_t Context::conv_own_wgrad_runs() const { return impl_->own_wgrad_runs; }
ConvCacheStats conv_cache_stats(Context& ctx) {
  const auto& c = ctx.impl().conv_shapes;
  ConvCacheStats s;
  s.entries[0] = c.size(), s.added[0] = c.added(), s.evicted[0] = c.evicted();
  s.capacity = c.capacity();
  return s;
}
void set_conv_cache_capacity(Context& ctx, size_t entries) { ctx.impl().conv_shapes.set_capacity(entries); }
// A conv3 call's entry, looked up (made the most recent) or added, as the device's choice.
static void remember_conv_shape(Context& ctx, int op, int n, int cin, int cout, Spatial s, int nd) {
  auto& c = ctx.impl().conv_shapes;
  const std::array<int, 9> key{op, n, cin, cout, s.d, s.h, s.w, nd, ctx.options().bf16 ? 1 : 0};
  if (!c.find(key)) c.put(key, 0);
}

// ContextOptions::bf16: the operands rounded to bf16 (nearest even) as the device
// path rounds its copies, then fp32 sums; the gradients cuDNN writes in bf16 are
// rounded too. Lets the emulated tests check that their tolerances hold bf16's error.
float round_bf16(float v) { return round_to_bf16(v); }
std::vector<float> rounded(const float* x, size_t count) {
  std::vector<float> r(x, x + count);
  for (float& v : r) v = round_bf16(v);
  return r;
}
// The pool memory the device holds during a call besides its arguments, taken and
// given back like the device path's scratch, so that the emulated peak counts it
// (cuDNN's workspace aside, which depends on the algorithm cuDNN picks).
struct Held {
  Context& ctx;
  std::vector<void*> taken;
  explicit Held(Context& c) : ctx(c) {}
  void* take(size_t bytes) {
    taken.push_back(ctx.alloc(bytes));
    return taken.back();
  }
  void give(void* p) {
    for (auto& t : taken)
      if (t == p) ctx.free(t), t = nullptr;
  }
  ~Held() {
    for (void* t : taken)
      if (t) ctx.free(t);
  }
};
// Bytes per element of conv3's channels-last copies (0: none, the NCDHW path).
size_t conv_copy_bytes(Context& ctx) {
  return ctx.options().bf16 ? 2 : ctx.options().conv_channels_last ? 4 : 0;
}

void conv3_forward(Context& ctx, const float* x, const float* w, float* y, int n, int cin, int cout, Spatial s,
                   int nd) {
  remember_conv_shape(ctx, 0, n, cin, cout, s, nd);
  Held held(ctx);
  if (const size_t e = conv_copy_bytes(ctx)) held.take(e * n * cin * s.size()), held.take(e * n * cout * s.size());
  if (!ctx.options().bf16) return cmseg::conv3_forward(x, w, y, n, cin, cout, s, nd);
  const size_t V = (size_t)s.size(), T = conv3_taps(nd);
  const auto xr = rounded(x, (size_t)n * cin * V), wr = rounded(w, (size_t)cout * cin * T);
  cmseg::conv3_forward(xr.data(), wr.data(), y, n, cin, cout, s, nd);
  for (size_t i = 0; i < (size_t)n * cout * V; ++i) y[i] = round_bf16(y[i]);
}
void conv3_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, int n,
                    int cin, int cout, Spatial s, int nd) {
  remember_conv_shape(ctx, (dx ? 1 : 0) + (dw ? 2 : 0), n, cin, cout, s, nd);
  Held held(ctx);
  if (const size_t e = conv_copy_bytes(ctx)) {
    held.take(e * n * cout * s.size());  // dy's copy, for both directions
    if (dx) held.give(held.take(e * n * cin * s.size()));  // dx's, until it is transposed back
    held.take(e * n * cin * s.size());  // x's, for the filter gradient
  }
  const ContextOptions& o = ctx.options();
  // As conv_cudnn.cu: 3D TF32 filter gradients through the own kernel with conv_wgrad
  // own or auto (no timings here: auto takes it too).
  if (dw && own_wgrad_wanted(o, nd)) {
    if (dx) {  // the CPU layer always adds a filter gradient: into scratch here
      std::vector<float> unused((size_t)cout * cin * conv3_taps(nd), 0.f);
      cmseg::conv3_backward(x, w, dy, dx, unused.data(), n, cin, cout, s, nd);
    }
    return conv3_backward_filter_own(ctx, x, dy, dw, n, cin, cout, s);
  }
  if (!o.bf16) return cmseg::conv3_backward(x, w, dy, dx, dw, n, cin, cout, s, nd);
  const size_t V = (size_t)s.size(), T = conv3_taps(nd), wn = (size_t)cout * cin * T;
  const auto xr = rounded(x, (size_t)n * cin * V), wr = rounded(w, wn), dyr = rounded(dy, (size_t)n * cout * V);
  std::vector<float> dw_step(wn, 0.f);
  cmseg::conv3_backward(xr.data(), wr.data(), dyr.data(), dx, dw_step.data(), n, cin, cout, s, nd);
  if (dx)
    for (size_t i = 0; i < (size_t)n * cin * V; ++i) dx[i] = round_bf16(dx[i]);
  for (size_t i = 0; i < wn; ++i) dw[i] += round_bf16(dw_step[i]);
}
// The emulated model runs the CPU reference's filter gradient here (the kernel itself
// is emulated, thread by thread, by test_conv3_filter_grad).
void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s) {
  cmseg::conv3_backward(x, nullptr, dy, nullptr, dw, n, cin, cout, s, 3);
  ++ctx.impl().own_wgrad_runs;
}
// The GEMM path (the default) runs its plan with the reference GEMM (upconv2_gemm.hpp),
// so the whole-model cases check the plan's chunks and indices; the cuDNN paths are
// the CPU layer.
// n rows of `run` floats between row strides, as concat.cu's copy_rows (upconv2's images
// into and out of packed scratch).
void copy_rows_host(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t run, int n) {
  for (int i = 0; i < n; ++i) std::copy(src + i * src_stride, src + i * src_stride + run, dst + i * dst_stride);
}
void upconv2_forward(Context& ctx, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout,
                     Spatial s, int nd, int64_t y_image_stride) {
  const int64_t run = (int64_t)cout * s.size() * (nd == 3 ? 8 : 4);
  if (y_image_stride && y_image_stride != run) {
    std::vector<float> packed((size_t)n * run);
    upconv2_forward(ctx, x, w, b, packed.data(), n, cin, cout, s, nd, 0);
    return copy_rows_host(y, y_image_stride, packed.data(), run, run, n);
  }
  if (ctx.options().upconv != UpconvPath::Gemm) return cmseg::upconv2_forward(x, w, b, y, n, cin, cout, s, nd);
  const UpGemmGeom g = up_gemm_geom(nd, n, cin, cout, s.d, s.h, s.w, ctx.options().upconv_chunk_bytes);
  Buffer<float> ycol(ctx, (size_t)g.M * g.units_per_chunk * g.unit);
  up_gemm_forward_host(g, x, w, b, y, ycol.data());
}
void upconv2_backward(Context& ctx, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db,
                      int n, int cin, int cout, Spatial s, int nd, int64_t dy_image_stride) {
  const int64_t run = (int64_t)cout * s.size() * (nd == 3 ? 8 : 4);
  if (dy_image_stride && dy_image_stride != run) {
    std::vector<float> packed((size_t)n * run);
    copy_rows_host(packed.data(), run, dy, dy_image_stride, run, n);
    return upconv2_backward(ctx, x, w, packed.data(), dx, dw, db, n, cin, cout, s, nd, 0);
  }
  if (ctx.options().upconv != UpconvPath::Gemm) return cmseg::upconv2_backward(x, w, dy, dx, dw, db, n, cin, cout, s, nd);
  const UpGemmGeom g = up_gemm_geom(nd, n, cin, cout, s.d, s.h, s.w, ctx.options().upconv_chunk_bytes);
  Buffer<float> dycol(ctx, (size_t)g.M * g.units_per_chunk * g.unit);
  Buffer<float> partial(ctx, (size_t)(kFilterSplitMax + 1) * g.M * g.cin);
  up_gemm_backward_host(g, x, w, dy, dx, dw, db, dycol.data(), partial.data());
}
void instance_norm_forward(Context&, const float* x, const float* g, const float* b, float* y, float* mean, float* rstd,
                           int n, int c, int64_t V, bool relu) {
  cmseg::instance_norm_forward(x, g, b, y, mean, rstd, n, c, V, relu);
}
// The forward's output from x and its statistics, with the CPU reference's float
// expressions (native/layers/instance_norm.cpp), as the device's apply does with its own.
static void apply_from_stats(const float* x, const float* mean, const float* rstd, const float* gamma,
                             const float* beta, float* y, int n, int c, int64_t V, bool relu) {
  for (int64_t p = 0; p < (int64_t)n * c; ++p) {
    const int ch = (int)(p % c);
    const float r = rstd[p], g = gamma[ch] * r, b = beta[ch] - mean[p] * gamma[ch] * r;
    for (int64_t v = 0; v < V; ++v) {
      const float o = x[p * V + v] * g + b;
      y[p * V + v] = relu ? std::max(o, 0.f) : o;
    }
  }
}
void instance_norm_apply(Context&, const float* x, const float* mean, const float* rstd, const float* g,
                         const float* b, float* y, int n, int c, int64_t V, bool relu) {
  apply_from_stats(x, mean, rstd, g, b, y, n, c, V, relu);
}
// The device recomputes the ReLU's mask; the CPU reference reads it from y, which is
// recomputed here the same way.
void instance_norm_backward(Context&, const float* x, const float* mean, const float* rstd, const float* g,
                            const float* b, const float* dy, float* dx, float* dg, float* db, int n, int c, int64_t V,
                            bool relu) {
  std::vector<float> y;
  if (relu) {
    if (!b) throw Error("instance_norm_backward: the fused ReLU's mask needs beta");
    y.resize((size_t)n * c * V);
    apply_from_stats(x, mean, rstd, g, b, y.data(), n, c, V, true);
  }
  cmseg::instance_norm_backward(x, relu ? y.data() : nullptr, mean, rstd, g, dy, dx, dg, db, n, c, V, relu);
}
void maxpool2_forward(Context&, const float* x, float* y, uint8_t* arg, int nc, Spatial s, int nd) {
  cmseg::maxpool2_forward(x, y, arg, nc, s, nd);
}
void maxpool2_backward(Context&, const float* dy, const uint8_t* arg, float* dx, int nc, Spatial s, int nd) {
  cmseg::maxpool2_backward(dy, arg, dx, nc, s, nd);
}
void cm_loss(Context&, const CmLossInput& in, CmLossOutput& out) { cmseg::cm_loss(in, out); }
const char* last_cm_loss_kernel() { return "cpu"; }
void find_unsquarable(Context&, const float* g, const float* w, int64_t n, float l2, float limit,
                      unsigned long long* flag) {
  for (int64_t k = 0; k < n; ++k)
    if (!(std::fabs(g[k] + l2 * w[k]) <= limit)) {
      *flag = std::max(*flag, (unsigned long long)(n - k));
      return;
    }
}
void adam_step(Context&, const std::vector<AdamTensor>& ts, const OptimConfig& o, int64_t step,
               const unsigned long long* refused) {
  if (refused && *refused) return;
  const float bc1 = 1.f - std::pow(o.beta1, (float)step), bc2 = 1.f - std::pow(o.beta2, (float)step);
  const float step_size = o.lr / bc1, rbc2 = 1.f / std::sqrt(bc2);
  for (auto& t : ts)
    for (int64_t k = 0; k < t.numel; ++k) {
      float w = t.w[k], gk = t.g[k];
      if (o.kind == OptimKind::Adam) gk += o.weight_decay * w; else w -= o.lr * o.weight_decay * w;
      t.m[k] = o.beta1 * t.m[k] + (1.f - o.beta1) * gk;
      t.v[k] = o.beta2 * t.v[k] + (1.f - o.beta2) * gk * gk;
      t.w[k] = w - step_size * t.m[k] / (std::sqrt(t.v[k]) * rbc2 + o.eps);
    }
}
void conv1_forward(Context&, const float* x, const float* w, const float* b, float* y, int n, int cin, int cout, int64_t V) {
  cmseg::conv1_forward(x, w, b, y, n, cin, cout, V);
}
void conv1_backward(Context&, const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int n,
                    int cin, int cout, int64_t V) {
  cmseg::conv1_backward(x, w, dy, dx, dw, db, n, cin, cout, V);
}
void conv1_forward_heads(Context&, const float* x, const std::vector<Conv1Head>& heads, int n, int cin, int64_t V) {
  cmseg::conv1_forward_heads(x, heads, n, cin, V);
}
void conv1_backward_heads(Context&, const float* x, const std::vector<Conv1Head>& heads, float* dx, int n, int cin,
                          int64_t V) {
  cmseg::conv1_backward_heads(x, heads, dx, n, cin, V);
}
void concat_forward(Context&, const float* a, int ca, const float* b, int cb, float* y, int n, int64_t V) {
  cmseg::concat_forward(a, ca, b, cb, y, n, V);
}
void concat_backward(Context&, const float* dy, float* da, int ca, float* db, int cb, int n, int64_t V, bool acc) {
  for (int i = 0; i < n; ++i) {
    const float* d = dy + (int64_t)i * (ca + cb) * V;
    if (da) for (int64_t e = 0; e < ca * V; ++e) { float& t = da[(int64_t)i * ca * V + e]; t = acc ? t + d[e] : d[e]; }
    if (db) std::memcpy(db + (int64_t)i * cb * V, d + ca * V, sizeof(float) * cb * V);
  }
}
void add_inplace(Context&, float* y, const float* x, int64_t count) { for (int64_t k = 0; k < count; ++k) y[k] += x[k]; }
double ce_loss_hard(Context&, const float* z, const uint8_t* l, int n, int L, int64_t V, float* d) { return cmseg::ce_loss_hard(z, l, n, L, V, d); }
double ce_loss_soft(Context&, const float* z, const float* t, int n, int L, int64_t V, float* d) { return cmseg::ce_loss_soft(z, t, n, L, V, d); }
void softmax_forward(Context&, const float* z, float* p, int n, int c, int64_t V) { cmseg::softmax_forward(z, p, n, c, V); }
void cm_predict(Context&, CmMode mode, int L, int rank, const std::vector<const float*>& raw, const float* probs, int n,
                int R, int64_t V, float* cms, float* q) {
  const int K = cm_head_channels(mode, L, rank);
  float A[kMaxClasses * kMaxClasses];
  for (int i = 0; i < n; ++i)
    for (int r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) {
        if (mode == CmMode::Global) cm_from_raw(mode, L, rank, raw[r], 1, A);
        else cm_from_raw(mode, L, rank, raw[r] + (int64_t)i * K * V + v, V, A);
        if (cms) for (int e = 0; e < L * L; ++e) cms[(((int64_t)i * R + r) * L * L + e) * V + v] = A[e];
        if (q) for (int a = 0; a < L; ++a) { float s = 0; for (int j = 0; j < L; ++j) s += A[a * L + j] * probs[((int64_t)i * L + j) * V + v]; q[(((int64_t)i * R + r) * L + a) * V + v] = s; }
      }
}
namespace host {
[[noreturn]] static void no() { throw Error("host emulation: the cuda::host:: helpers are not emulated"); }
void conv3_forward(Context&, const float*, const float*, float*, int, int, int, Spatial, int) { no(); }
void conv3_backward(Context&, const float*, const float*, const float*, float*, float*, int, int, int, Spatial, int) { no(); }
// "Device" memory is host memory here: the own kernel's emulation on the arrays as they are.
void conv3_backward_filter_own(Context& ctx, const float* x, const float* dy, float* dw, int n, int cin, int cout,
                               Spatial s) {
  cuda::conv3_backward_filter_own(ctx, x, dy, dw, n, cin, cout, s);
}
void upconv2_forward(Context&, const float*, const float*, const float*, float*, int, int, int, Spatial, int) { no(); }
void upconv2_backward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int, int, Spatial, int) { no(); }
void instance_norm_forward(Context&, const float*, const float*, const float*, float*, float*, float*, int, int, int64_t, bool) { no(); }
void instance_norm_backward(Context&, const float*, const float*, const float*, const float*, const float*, const float*, float*, float*, float*, int, int, int64_t, bool) { no(); }
void maxpool2_forward(Context&, const float*, float*, uint8_t*, int, Spatial, int) { no(); }
void maxpool2_backward(Context&, const float*, const uint8_t*, float*, int, Spatial, int) { no(); }
void cm_loss(Context&, const CmLossInput&, CmLossOutput&) { no(); }
void adam_step(Context&, std::vector<Param>&, const OptimConfig&, int64_t) { no(); }
}  // namespace host
}  // namespace cuda
}  // namespace cmseg
