// conv3 through cuDNN's graph (backend) API, when ContextOptions::conv_graph asks for
// it (CMSEG_CUDNN_GRAPH=1). conv_cudnn.cu calls these before its legacy-API path, on
// the same tensors (the model's NCDHW ones, or the channels-last copies); each
// returns false, having written nothing the caller owns, when no engine of the
// graph API can run the shape, and the legacy path runs instead.
//
// Why a second API: the legacy entry points (cudnnFind*AlgorithmEx) offer one
// kernel per "algorithm"; the graph API's heuristics list every engine and knob
// setting cuDNN has for a shape, which is what PyTorch's cudnn.benchmark times. On
// an H200 the legacy API's best 3D filter gradient ran at a third of its forward's
// TFLOP/s (BENCHMARKS.md), the largest line of the brats3d-gpu step.
//
// Per (direction, shape, layout, math) the engine configurations of the heuristics
// (mode A) are filtered (no runtime compilation; FMA-only math without TF32; no
// down-converted inputs or reduced-precision reductions), finalized into execution
// plans within the workspace limit, and, with conv_benchmark, timed on the call's
// own tensors; the fastest plan is cached in the context.
#include <cudnn.h>

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "common.cuh"

// CUDNN_ATTR_OPERATIONGRAPH_HANDLE and CUDNN_ATTR_EXECUTION_PLAN_HANDLE are marked
// deprecated in cuDNN 9.2x headers, yet required by every 9.x library up to the
// ones PyTorch ships (9.19 on the GPU machine).
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
#pragma nv_diag_suppress 1444

namespace cmseg {
namespace cuda {

// One finalized execution plan (null: no usable engine for its key).
struct GraphPlan {
  cudnnBackendDescriptor_t plan = nullptr;
  // The engine configuration the plan was finalized from, kept as long as the plan
  // (as cudnn-frontend does): the API does not say whether a plan copies it.
  cudnnBackendDescriptor_t config = nullptr;
  int64_t workspace = 0;
  int64_t engine = -1;  // the engine's global index, for the report
  ~GraphPlan() {
    if (plan) cudnnBackendDestroyDescriptor(plan);
    if (config) cudnnBackendDestroyDescriptor(config);
  }
};

namespace {

// A backend descriptor destroyed at the end of its scope.
struct Desc {
  cudnnBackendDescriptor_t d = nullptr;
  explicit Desc(cudnnBackendDescriptorType_t type) { CMSEG_CUDNN(cudnnBackendCreateDescriptor(type, &d)); }
  ~Desc() {
    if (d) cudnnBackendDestroyDescriptor(d);
  }
  Desc(Desc&& o) noexcept : d(o.d) { o.d = nullptr; }
  Desc(const Desc&) = delete;
  cudnnBackendDescriptor_t release() {
    cudnnBackendDescriptor_t r = d;
    d = nullptr;
    return r;
  }
};

void set(cudnnBackendDescriptor_t d, cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type,
         int64_t count, const void* values, const char* what) {
  const cudnnStatus_t st = cudnnBackendSetAttribute(d, name, type, count, values);
  if (st != CUDNN_STATUS_SUCCESS) throw_cudnn(st, what, __FILE__, __LINE__);
}

void finalize(cudnnBackendDescriptor_t d, const char* what) {
  const cudnnStatus_t st = cudnnBackendFinalize(d);
  if (st != CUDNN_STATUS_SUCCESS) throw_cudnn(st, what, __FILE__, __LINE__);
}

// The tensors' unique ids in the graph: X the convolution's input (dX for the data
// gradient), W its filter (dW), Y its output (dY).
constexpr int64_t kUidX = 1, kUidW = 2, kUidY = 3;
constexpr int64_t kAlign = 16;  // bytes; calls with less aligned pointers take the legacy path

// [n, c, *s] in NCDHW or NDHWC (2D: NCHW / NHWC); a filter is [cout, cin, 3, 3(, 3)]
// in the PyTorch order or with the channels last ([cout, *taps, cin]).
Desc tensor(int64_t uid, int64_t n, int64_t c, Spatial s, int ndim, bool channels_last, bool bf16) {
  Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  const int64_t D = ndim == 3 ? s.d : 1, H = s.h, W = s.w;
  std::vector<int64_t> dims, strides;
  if (ndim == 3) {
    dims = {n, c, D, H, W};
    strides = channels_last ? std::vector<int64_t>{c * D * H * W, 1, H * W * c, W * c, c}
                            : std::vector<int64_t>{c * D * H * W, D * H * W, H * W, W, 1};
  } else {
    dims = {n, c, H, W};
    strides = channels_last ? std::vector<int64_t>{c * H * W, 1, W * c, c}
                            : std::vector<int64_t>{c * H * W, H * W, W, 1};
  }
  const cudnnDataType_t type = bf16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
  set(t.d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type, "graph tensor type");
  set(t.d, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, (int64_t)dims.size(), dims.data(), "graph tensor dims");
  set(t.d, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, (int64_t)strides.size(), strides.data(),
      "graph tensor strides");
  set(t.d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &uid, "graph tensor uid");
  set(t.d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, 1, &kAlign, "graph tensor alignment");
  finalize(t.d, "graph tensor");
  return t;
}

// Stride 1, zero padding 1, cross-correlation (SPEC's conv3), fp32 accumulation.
Desc conv3_descriptor(int ndim) {
  Desc c(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
  const int64_t dims = ndim;
  const int64_t one[3] = {1, 1, 1};
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  set(c.d, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp, "graph conv compute type");
  set(c.d, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode, "graph conv mode");
  set(c.d, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, 1, &dims, "graph conv dims");
  set(c.d, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, dims, one, "graph conv dilations");
  set(c.d, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, dims, one, "graph conv strides");
  set(c.d, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, dims, one, "graph conv pre-paddings");
  set(c.d, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, dims, one, "graph conv post-paddings");
  finalize(c.d, "graph conv descriptor");
  return c;
}

// The one-operation graph of a direction: alpha 1, beta 0 (outputs are written; the
// filter gradient is added into the model's dW by the caller).
Desc operation(GraphPart part, const Desc& x, const Desc& w, const Desc& y, const Desc& conv) {
  const float alpha = 1.f, beta = 0.f;
  cudnnBackendDescriptorType_t type;
  cudnnBackendAttributeName_t ax, aw, ay, ac, aa, ab;
  if (part == GraphPart::Forward) {
    type = CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR;
    ax = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, aw = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
    ay = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, ac = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
    aa = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, ab = CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA;
  } else if (part == GraphPart::BackwardData) {
    type = CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR;
    ax = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX, aw = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
    ay = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY, ac = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
    aa = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA, ab = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA;
  } else {
    type = CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR;
    ax = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X, aw = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
    ay = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY, ac = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
    aa = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA, ab = CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA;
  }
  Desc op(type);
  set(op.d, ax, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &x.d, "graph op x");
  set(op.d, aw, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &w.d, "graph op w");
  set(op.d, ay, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &y.d, "graph op y");
  set(op.d, ac, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &conv.d, "graph op conv");
  set(op.d, aa, CUDNN_TYPE_FLOAT, 1, &alpha, "graph op alpha");
  set(op.d, ab, CUDNN_TYPE_FLOAT, 1, &beta, "graph op beta");
  finalize(op.d, "graph operation");
  return op;
}

// Whether an engine configuration may run this call: no runtime compilation (NVRTC
// and seconds per shape), inputs kept in their type with fp32 accumulation, and
// tensor cores for fp32 data (TF32) only when the context allows TF32 (bf16 data
// has no other path: tensor_cores is true for it).
bool acceptable(cudnnBackendDescriptor_t cfg, bool tensor_cores, int64_t* engine_index) {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
  int64_t got = 0;
  if (cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &got, &engine.d) !=
          CUDNN_STATUS_SUCCESS ||
      got != 1)
    return false;
  cudnnBackendNumericalNote_t notes[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
  int64_t n_notes = 0;
  if (cudnnBackendGetAttribute(engine.d, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                               CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &n_notes, notes) != CUDNN_STATUS_SUCCESS)
    return false;
  for (int64_t i = 0; i < n_notes; ++i) {
    if (notes[i] == CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS || notes[i] == CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION)
      return false;
    if (notes[i] == CUDNN_NUMERICAL_NOTE_TENSOR_CORE && !tensor_cores) return false;
  }
  cudnnBackendBehaviorNote_t behaviour[16];
  int64_t n_behaviour = 0;
  if (cudnnBackendGetAttribute(engine.d, CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE, CUDNN_TYPE_BEHAVIOR_NOTE, 16, &n_behaviour,
                               behaviour) == CUDNN_STATUS_SUCCESS)
    for (int64_t i = 0; i < n_behaviour; ++i)
      if (behaviour[i] == CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION) return false;
  *engine_index = -1;
  cudnnBackendGetAttribute(engine.d, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &got, engine_index);
  return true;
}

// A variant pack and one execution of a plan on the context's stream. Never throws:
// the caller decides what a failed status means.
cudnnStatus_t execute(Context& ctx, const GraphPlan& p, void* x, void* w, void* y, void* workspace) {
  cudnnBackendDescriptor_t pack = nullptr;
  cudnnStatus_t st = cudnnBackendCreateDescriptor(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, &pack);
  if (st != CUDNN_STATUS_SUCCESS) return st;
  const int64_t uids[3] = {kUidX, kUidW, kUidY};
  void* ptrs[3] = {x, w, y};
  if ((st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, 3, uids)) ==
          CUDNN_STATUS_SUCCESS &&
      (st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, 3, ptrs)) ==
          CUDNN_STATUS_SUCCESS &&
      (st = cudnnBackendSetAttribute(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &workspace)) ==
          CUDNN_STATUS_SUCCESS &&
      (st = cudnnBackendFinalize(pack)) == CUDNN_STATUS_SUCCESS) {
    cudnnHandle_t h = nullptr;
    try {
      h = ctx.impl().cudnn();
    } catch (const OutOfMemory&) {
      // The handle's creation ran out of device memory: said as such, so that the caller's
      // throw_cudnn makes it an OutOfMemory again (the pool is given back, not a failed path).
      st = CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED;
    } catch (...) {
      st = CUDNN_STATUS_INTERNAL_ERROR;
    }
    if (h) st = cudnnBackendExecute(h, p.plan, pack);
  }
  cudnnBackendDestroyDescriptor(pack);
  return st;
}

const char* math_of(const GraphShape& g) { return g.bf16 ? "bf16" : g.tf32 ? "tf32" : "fp32"; }

const char* part_name(GraphPart part) {
  return part == GraphPart::Forward ? "forward" : part == GraphPart::BackwardData ? "backward data" : "backward filter";
}

// The engine configurations cuDNN's heuristics list for the graph, in their order
// (mode A, the ranked list; FALLBACK, the engines that run anything, e.g. FMA math).
std::vector<Desc> engine_configs(cudnnBackendDescriptor_t graph, cudnnBackendHeurMode_t mode) {
  Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  set(heur.d, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &graph, "heuristics graph");
  set(heur.d, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode, "heuristics mode");
  finalize(heur.d, "heuristics");
  int64_t count = 0;
  CMSEG_CUDNN(cudnnBackendGetAttribute(heur.d, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                                       nullptr));
  count = std::min<int64_t>(count, 64);
  std::vector<Desc> cfgs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) cfgs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR), raw.push_back(cfgs.back().d);
  int64_t got = 0;
  if (count > 0)
    CMSEG_CUDNN(cudnnBackendGetAttribute(heur.d, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count,
                                         &got, raw.data()));
  while ((int64_t)cfgs.size() > std::max<int64_t>(0, std::min(got, count))) cfgs.pop_back();  // only those filled
  return cfgs;
}

// A finalized plan for an acceptable configuration within the workspace limit, else null.
std::shared_ptr<GraphPlan> plan_of(cudnnHandle_t h, Desc& cfg, bool tensor_cores, size_t max_workspace) {
  int64_t engine = -1;
  if (!acceptable(cfg.d, tensor_cores, &engine)) return nullptr;
  Desc plan(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  if (cudnnBackendSetAttribute(plan.d, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &h) !=
          CUDNN_STATUS_SUCCESS ||
      cudnnBackendSetAttribute(plan.d, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1,
                               &cfg.d) != CUDNN_STATUS_SUCCESS ||
      cudnnBackendFinalize(plan.d) != CUDNN_STATUS_SUCCESS)
    return nullptr;
  int64_t ws = 0, n_ws = 0;
  if (cudnnBackendGetAttribute(plan.d, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &n_ws, &ws) !=
          CUDNN_STATUS_SUCCESS ||
      ws < 0 || (size_t)ws > max_workspace)
    return nullptr;
  auto p = std::make_shared<GraphPlan>();
  p->plan = plan.release(), p->config = cfg.release(), p->workspace = ws, p->engine = engine;
  return p;
}

// Two events on the context's stream, destroyed with the scope.
struct EventPair {
  cudaEvent_t a = nullptr, b = nullptr;
  EventPair() {
    CMSEG_CUDA(cudaEventCreate(&a));
    if (cudaEventCreate(&b) != cudaSuccess) {
      cudaEventDestroy(a);
      throw Error("cudaEventCreate failed (timing cuDNN graph plans)");
    }
  }
  ~EventPair() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  EventPair(const EventPair&) = delete;
};

// Milliseconds of `runs` executions of a plan, or -1 when one fails.
float time_plan(Context& ctx, const GraphPlan& p, void* x, void* w, void* y, void* ws, EventPair& ev, int runs) {
  cudaStream_t s = stream_of(ctx);
  float ms = -1;
  bool ok = cudaEventRecord(ev.a, s) == cudaSuccess;
  for (int i = 0; ok && i < runs; ++i) ok = execute(ctx, p, x, w, y, ws) == CUDNN_STATUS_SUCCESS;
  ok = ok && cudaEventRecord(ev.b, s) == cudaSuccess && cudaEventSynchronize(ev.b) == cudaSuccess &&
       cudaEventElapsedTime(&ms, ev.a, ev.b) == cudaSuccess;
  if (!ok) {
    cudaGetLastError();  // a failed launch is this plan's, not a sticky device error
    return -1;
  }
  return ms / runs;
}

// Workspace for timing: the largest plan's, but no more than half of what the device
// has free or the model's memory limit leaves (as the legacy search's).
size_t timing_workspace(Context& ctx, const std::vector<std::shared_ptr<GraphPlan>>& plans) {
  int64_t want = 0;
  for (const auto& p : plans) want = std::max(want, p->workspace);
  size_t free_b = 0, total_b = 0;
  CMSEG_CUDA(cudaMemGetInfo(&free_b, &total_b));
  size_t bytes = std::min((size_t)want, free_b / 2);
  const ContextOptions& o = ctx.options();
  if (o.memory_limit_bytes) {
    const size_t used = ctx.pool_stats().in_use_bytes;
    bytes = std::min(bytes, o.memory_limit_bytes > used ? (o.memory_limit_bytes - used) / 2 : 0);
  }
  return bytes;
}

// Chooses the plan of a key: the acceptable configurations of the heuristics (mode A,
// then FALLBACK when A offers none), at most 8 finalized; with conv_benchmark and more
// than one, each timed on the call's tensors (1 warm-up run, then 2 timed unless the
// warm-up was already 3x the best so far). What the timing writes into the outputs
// is overwritten by the real run. The choice goes to stderr, once per key.
std::shared_ptr<GraphPlan> choose(Context& ctx, GraphPart part, const GraphShape& g, void* x, void* w, void* y) {
  cudnnHandle_t h = ctx.impl().cudnn();
  const ContextOptions& o = ctx.options();
  const Desc xd = tensor(kUidX, g.n, g.cin, g.s, g.ndim, g.channels_last, g.bf16);
  const Desc yd = tensor(kUidY, g.n, g.cout, g.s, g.ndim, g.channels_last, g.bf16);
  // The filter [cout, cin, taps] is a "tensor" with cout images of cin channels over the taps.
  const Spatial taps{g.ndim == 3 ? 3 : 1, 3, 3};
  const Desc wd = tensor(kUidW, g.cout, g.cin, taps, g.ndim, g.channels_last, g.bf16);
  const Desc conv = conv3_descriptor(g.ndim);
  const Desc op = operation(part, xd, wd, yd, conv);
  Desc graph(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
  set(graph.d, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &op.d, "graph ops");
  set(graph.d, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h, "graph handle");
  finalize(graph.d, "graph");

  const size_t keep = o.conv_benchmark ? 8 : 1;
  std::vector<std::shared_ptr<GraphPlan>> plans;
  for (cudnnBackendHeurMode_t mode : {CUDNN_HEUR_MODE_A, CUDNN_HEUR_MODE_FALLBACK}) {
    std::vector<Desc> cfgs = engine_configs(graph.d, mode);
    for (size_t i = 0; i < cfgs.size() && plans.size() < keep; ++i)
      if (auto p = plan_of(h, cfgs[i], g.tf32 || g.bf16, o.max_workspace_bytes)) plans.push_back(std::move(p));
    if (!plans.empty()) break;
  }
  const std::string what = str("cmseg: cuDNN graph conv3 ", part_name(part), " ", g.cin, "->", g.cout, " ", g.s.d, "x",
                               g.s.h, "x", g.s.w, " n ", g.n, " ", g.channels_last ? "NDHWC" : "NCDHW", " ",
                               math_of(g));
  if (plans.empty()) return nullptr;
  if (plans.size() == 1) {
    std::fprintf(stderr, "%s: engine %lld (the only candidate)\n", what.c_str(), (long long)plans[0]->engine);
    return plans.front();
  }

  const size_t want = timing_workspace(ctx, plans);
  std::optional<Scratch> ws;
  try {
    ws.emplace(ctx, want);
  } catch (const Error&) {
    ws.reset();
  }
  std::shared_ptr<GraphPlan> best, smallest;
  float best_ms = 0;
  std::string tried;
  if (ws) {
    EventPair ev;
    for (const auto& p : plans) {
      if ((size_t)p->workspace > want) continue;
      float ms = time_plan(ctx, *p, x, w, y, ws->p, ev, 1);  // warm-up
      if (ms >= 0 && (!best || ms < 3 * best_ms)) ms = time_plan(ctx, *p, x, w, y, ws->p, ev, 2);
      tried += str(tried.empty() ? "" : ", ", "engine ", p->engine, " ", ms < 0 ? std::string("failed") : str(ms, " ms"));
      if (ms >= 0 && (!best || ms < best_ms)) best = p, best_ms = ms;
    }
  }
  if (!best) {  // nothing could be timed (no workspace to time in): the smallest workspace
    for (const auto& p : plans)
      if (!smallest || p->workspace < smallest->workspace) smallest = p;
    std::fprintf(stderr, "%s: engine %lld, untimed (no memory to time %zu candidates)\n", what.c_str(),
                 (long long)smallest->engine, plans.size());
    return smallest;
  }
  std::fprintf(stderr, "%s: engine %lld, %.3f ms (%s)\n", what.c_str(), (long long)best->engine, best_ms,
               tried.c_str());
  return best;
}

ConvKey key_of(GraphPart part, const GraphShape& g) {
  // Ops 20..31 (conv_cudnn.cu's legacy keys are below 20): direction, layout, type.
  const int op = 20 + (int)part + (g.channels_last ? 3 : 0) + (g.bf16 ? 6 : 0);
  return ConvKey{op, g.n, g.cin, g.cout, g.s.d, g.s.h, g.s.w, g.ndim, g.tf32};
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kAlign == 0; }

}  // namespace

bool graph_conv3(Context& ctx, GraphPart part, const GraphShape& g, const void* x, const void* w, const void* y) {
  if (!aligned(x) || !aligned(w) || !aligned(y)) return false;
  void* px = const_cast<void*>(x);
  void* pw = const_cast<void*>(w);
  void* py = const_cast<void*>(y);
  Context::Impl& im = ctx.impl();
  const ConvKey key = key_of(part, g);
  std::shared_ptr<GraphPlan> plan;  // held for the whole call: an eviction meanwhile leaves it alive
  if (const std::shared_ptr<GraphPlan>* known = im.graph_plans.find(key)) {
    plan = *known;
  } else {
    try {
      plan = choose(ctx, part, g, px, pw, py);
    } catch (const OutOfMemory&) {
      throw;
    } catch (const Error& e) {  // the graph API refused a descriptor: this shape takes the legacy path
      std::fprintf(stderr, "cmseg: cuDNN graph API, conv3 %s %d->%d: %s; the legacy API runs it\n", part_name(part),
                   g.cin, g.cout, e.what());
      im.remember_plan(key, nullptr);
      return false;
    }
    im.remember_plan(key, plan);
    if (!plan)
      std::fprintf(stderr, "cmseg: cuDNN graph API has no usable engine for conv3 %s %d->%d %dx%dx%d (%s, %s); the "
                           "legacy API runs it\n",
                   part_name(part), g.cin, g.cout, g.s.d, g.s.h, g.s.w, g.channels_last ? "NDHWC" : "NCDHW",
                   math_of(g));
  }
  if (!plan) return false;
  Scratch ws(ctx, (size_t)plan->workspace);
  const cudnnStatus_t st = execute(ctx, *plan, px, pw, py, ws.p);
  if (st == CUDNN_STATUS_SUCCESS) {
    ++im.graph_runs;
    return true;
  }
  const int category = CUDNN_STATUS_CATEGORY((int)st);
  if (category != CUDNN_STATUS_BAD_PARAM && category != CUDNN_STATUS_NOT_SUPPORTED)
    throw_cudnn(st, "cudnnBackendExecute (conv3)", __FILE__, __LINE__);
  im.remember_plan(key, nullptr);  // refused at run time: the legacy path from now on (while cached)
  std::fprintf(stderr, "cmseg: cuDNN graph API refused conv3 %s %d->%d: %s; the legacy API runs it\n",
               part_name(part), g.cin, g.cout, cudnnGetErrorString(st));
  return false;
}

}  // namespace cuda
}  // namespace cmseg
