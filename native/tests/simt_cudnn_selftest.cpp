// Checks of the emulated cuDNN graph API (native/cuda/emulation/simt_cudnn_graph.cpp)
// that test_cuda_simt runs conv_graph.cu against: its convolutions against results
// worked out by hand, its engines' notes and what they mean for the numbers, and the
// refusals cuDNN documents for misuse (which conv_graph.cu must not rely on).
#include <cuda_runtime.h>
#include <cudnn.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "check.hpp"

namespace {

// A backend descriptor for the scope of a test.
struct Desc {
  cudnnBackendDescriptor_t d = nullptr;
  explicit Desc(cudnnBackendDescriptorType_t t) { CHECK(cudnnBackendCreateDescriptor(t, &d) == CUDNN_STATUS_SUCCESS); }
  ~Desc() { cudnnBackendDestroyDescriptor(d); }
  Desc(const Desc&) = delete;
};

cudnnStatus_t set_i64(const Desc& d, cudnnBackendAttributeName_t n, std::vector<int64_t> v) {
  return cudnnBackendSetAttribute(d.d, n, CUDNN_TYPE_INT64, (int64_t)v.size(), v.data());
}
cudnnStatus_t set_desc(const Desc& d, cudnnBackendAttributeName_t n, const Desc& v) {
  return cudnnBackendSetAttribute(d.d, n, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &v.d);
}

// A packed NCHW tensor [a, b, h, w] (finalized unless told not to).
void tensor(Desc& t, int64_t uid, std::vector<int64_t> dims, cudnnDataType_t type = CUDNN_DATA_FLOAT,
            bool finalize = true) {
  std::vector<int64_t> strides(4);
  strides[3] = 1, strides[2] = dims[3], strides[1] = dims[2] * dims[3], strides[0] = dims[1] * strides[1];
  CHECK(cudnnBackendSetAttribute(t.d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &type) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_DIMENSIONS, dims) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_STRIDES, strides) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, {uid}) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, {16}) == CUDNN_STATUS_SUCCESS);
  if (finalize) CHECK(cudnnBackendFinalize(t.d) == CUDNN_STATUS_SUCCESS);
}

// 2D, 3x3 taps, zero padding 1 each side, stride 1, cross-correlation.
void conv2d(Desc& c) {
  const cudnnDataType_t comp = CUDNN_DATA_FLOAT;
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  CHECK(cudnnBackendSetAttribute(c.d, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &comp) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendSetAttribute(c.d, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(c, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, {2}) == CUDNN_STATUS_SUCCESS);
  for (auto n : {CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
                 CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS})
    CHECK(set_i64(c, n, {1, 1}) == CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendFinalize(c.d) == CUDNN_STATUS_SUCCESS);
}

// The forward graph y = alpha conv(x, w) + beta y of 1-channel 3x3 images (w [1, 1, 3, 3]).
struct ForwardGraph {
  cudnnHandle_t h = nullptr;
  Desc x{CUDNN_BACKEND_TENSOR_DESCRIPTOR}, w{CUDNN_BACKEND_TENSOR_DESCRIPTOR}, y{CUDNN_BACKEND_TENSOR_DESCRIPTOR};
  Desc conv{CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR}, op{CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR};
  Desc graph{CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR};
  explicit ForwardGraph(float alpha = 1.f, float beta = 0.f, int64_t channels = 1,
                        cudnnDataType_t type = CUDNN_DATA_FLOAT) {
    CHECK(cudnnCreate(&h) == CUDNN_STATUS_SUCCESS);
    tensor(x, 1, {1, channels, 3, 3}, type);
    tensor(w, 2, {channels, channels, 3, 3}, type);
    tensor(y, 3, {1, channels, 3, 3}, type);
    conv2d(conv);
    CHECK(set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, x) == CUDNN_STATUS_SUCCESS);
    CHECK(set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, w) == CUDNN_STATUS_SUCCESS);
    CHECK(set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, y) == CUDNN_STATUS_SUCCESS);
    CHECK(set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, conv) == CUDNN_STATUS_SUCCESS);
    CHECK(cudnnBackendSetAttribute(op.d, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, 1, &alpha) ==
          CUDNN_STATUS_SUCCESS);
    CHECK(cudnnBackendSetAttribute(op.d, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, 1, &beta) ==
          CUDNN_STATUS_SUCCESS);
    CHECK(cudnnBackendFinalize(op.d) == CUDNN_STATUS_SUCCESS);
    CHECK(set_desc(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS, op) == CUDNN_STATUS_SUCCESS);
    CHECK(cudnnBackendSetAttribute(graph.d, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &h) ==
          CUDNN_STATUS_SUCCESS);
    CHECK(cudnnBackendFinalize(graph.d) == CUDNN_STATUS_SUCCESS);
  }
  ~ForwardGraph() { cudnnDestroy(h); }
};

// The engines' global indices a heuristics mode lists for a graph, best first.
std::vector<int64_t> listed(const Desc& graph, cudnnBackendHeurMode_t mode, std::vector<std::vector<int>>* notes) {
  Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  CHECK(set_desc(heur, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph) == CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendSetAttribute(heur.d, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendFinalize(heur.d) == CUDNN_STATUS_SUCCESS);
  int64_t count = -1;
  CHECK(cudnnBackendGetAttribute(heur.d, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count,
                                 nullptr) == CUDNN_STATUS_SUCCESS);
  std::vector<std::unique_ptr<Desc>> cfgs;
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i)
    cfgs.push_back(std::make_unique<Desc>(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)), raw.push_back(cfgs.back()->d);
  int64_t got = 0;
  CHECK(cudnnBackendGetAttribute(heur.d, CUDNN_ATTR_ENGINEHEUR_RESULTS, CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &got,
                                 raw.data()) == CUDNN_STATUS_SUCCESS);
  std::vector<int64_t> out;
  for (cudnnBackendDescriptor_t cfg : raw) {
    Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR);
    CHECK(cudnnBackendGetAttribute(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &got,
                                   &engine.d) == CUDNN_STATUS_SUCCESS);
    int64_t index = -1;
    CHECK(cudnnBackendGetAttribute(engine.d, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &got, &index) ==
          CUDNN_STATUS_SUCCESS);
    out.push_back(index);
    cudnnBackendNumericalNote_t n[CUDNN_NUMERICAL_NOTE_TYPE_COUNT];
    CHECK(cudnnBackendGetAttribute(engine.d, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE,
                                   CUDNN_NUMERICAL_NOTE_TYPE_COUNT, &got, n) == CUDNN_STATUS_SUCCESS);
    if (notes) notes->push_back(std::vector<int>(n, n + got));
  }
  return out;
}

// A plan of the engine with this global index (from mode A's list), finalized.
bool plan_of(const ForwardGraph& g, int64_t index, Desc& plan, int64_t* workspace) {
  Desc engine(CUDNN_BACKEND_ENGINE_DESCRIPTOR), cfg(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
  if (set_desc(engine, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, g.graph) != CUDNN_STATUS_SUCCESS ||
      set_i64(engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, {index}) != CUDNN_STATUS_SUCCESS ||
      cudnnBackendFinalize(engine.d) != CUDNN_STATUS_SUCCESS ||
      set_desc(cfg, CUDNN_ATTR_ENGINECFG_ENGINE, engine) != CUDNN_STATUS_SUCCESS ||
      cudnnBackendFinalize(cfg.d) != CUDNN_STATUS_SUCCESS)
    return false;
  int64_t got = 0;
  return cudnnBackendSetAttribute(plan.d, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &g.h) ==
             CUDNN_STATUS_SUCCESS &&
         set_desc(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, cfg) == CUDNN_STATUS_SUCCESS &&
         cudnnBackendFinalize(plan.d) == CUDNN_STATUS_SUCCESS &&
         cudnnBackendGetAttribute(plan.d, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &got,
                                  workspace) == CUDNN_STATUS_SUCCESS;
}

float* device(const std::vector<float>& v) {
  void* p = nullptr;
  CHECK(cudaMallocAsync(&p, v.size() * sizeof(float), nullptr) == cudaSuccess);
  cudaMemcpyAsync(p, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice, nullptr);
  return static_cast<float*>(p);
}

cudnnStatus_t execute(const ForwardGraph& g, const Desc& plan, std::vector<const void*> ptrs, void* ws,
                      std::vector<int64_t> uids = {1, 2, 3}) {
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  CHECK(set_i64(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, uids) == CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendSetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
                                 (int64_t)ptrs.size(), ptrs.data()) == CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendSetAttribute(pack.d, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendFinalize(pack.d) == CUDNN_STATUS_SUCCESS);
  return cudnnBackendExecute(g.h, plan.d, pack.d);
}

std::vector<float> host(const float* p, size_t n) {
  std::vector<float> v(n);
  cudaMemcpyAsync(v.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost, nullptr);
  return v;
}

}  // namespace

// x = 1..9 row-major, w one-hot at the top-left tap: cross-correlation with padding 1
// gives y[i][j] = x[i-1][j-1] (zero off the image); with alpha 2 and beta 1 onto y = 10:
// 2 x[i-1][j-1] + 10.
TEST(graph_api_convolves_as_worked_out_by_hand) {
  ForwardGraph g(2.f, 1.f);
  std::vector<float> w(9, 0.f);
  w[0] = 1.f;
  float *x = device({1, 2, 3, 4, 5, 6, 7, 8, 9}), *wd = device(w), *y = device(std::vector<float>(9, 10.f));
  for (int64_t engine : {0, 1}) {
    cudaMemcpyAsync(y, std::vector<float>(9, 10.f).data(), 9 * sizeof(float), cudaMemcpyHostToDevice, nullptr);
    Desc plan(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    int64_t ws_bytes = -1;
    CHECK(plan_of(g, engine, plan, &ws_bytes));
    CHECK(ws_bytes == (engine == 1 ? 4096 : 0));
    void* ws = nullptr;
    CHECK(cudaMallocAsync(&ws, 4096, nullptr) == cudaSuccess);
    CHECK(execute(g, plan, {x, wd, y}, ws) == CUDNN_STATUS_SUCCESS);
    const std::vector<float> want = {10, 10, 10, 10, 12, 14, 10, 18, 20};
    CHECK(host(y, 9) == want);
    cudaFreeAsync(ws, nullptr);
  }
  for (float* p : {x, wd, y}) cudaFreeAsync(p, nullptr);
}

// What an engine's notes mean for the numbers: x = 1 + 2^-10 through the centre tap is
// kept by FMA (0) and by TF32 (1: 10 explicit mantissa bits), and becomes 1 through the
// engine that down-converts its inputs to bf16 (6: 7 bits).
TEST(graph_api_engines_read_operands_as_their_notes_say) {
  ForwardGraph g;
  std::vector<std::vector<int>> notes;
  CHECK((listed(g.graph, CUDNN_HEUR_MODE_A, &notes) == std::vector<int64_t>{6, 9, 7, 1, 0}));
  CHECK((notes[0] == std::vector<int>{CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS}));
  CHECK((notes[3] == std::vector<int>{CUDNN_NUMERICAL_NOTE_TENSOR_CORE}) && notes[4].empty());
  CHECK((listed(g.graph, CUDNN_HEUR_MODE_FALLBACK, nullptr) == std::vector<int64_t>{0}));
  const float v = 1.f + std::ldexp(1.f, -10);
  std::vector<float> w(9, 0.f);
  w[4] = 1.f;
  float *x = device(std::vector<float>(9, v)), *wd = device(w), *y = device(std::vector<float>(9, 0.f));
  void* ws = nullptr;
  CHECK(cudaMallocAsync(&ws, 4096, nullptr) == cudaSuccess);
  for (int64_t engine : {0, 1, 6}) {
    Desc plan(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
    int64_t ws_bytes = -1;
    CHECK(plan_of(g, engine, plan, &ws_bytes));
    CHECK(execute(g, plan, {x, wd, y}, ws) == CUDNN_STATUS_SUCCESS);
    CHECK(host(y, 9)[4] == (engine == 6 ? 1.f : v));
  }
  // Engine 7 asks a workspace no caller has: executing it without one is refused.
  Desc plan7(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  int64_t ws7 = -1;
  CHECK(plan_of(g, 7, plan7, &ws7));
  CHECK(ws7 == int64_t(1) << 40);
  CHECK(execute(g, plan7, {x, wd, y}, ws) == CUDNN_STATUS_BAD_PARAM);
  // bf16 data with channel counts not multiples of 8: no engine at all.
  ForwardGraph b(1.f, 0.f, 3, CUDNN_DATA_BFLOAT16);
  CHECK(listed(b.graph, CUDNN_HEUR_MODE_A, nullptr).empty());
  ForwardGraph b8(1.f, 0.f, 8, CUDNN_DATA_BFLOAT16);
  CHECK((listed(b8.graph, CUDNN_HEUR_MODE_A, nullptr) == std::vector<int64_t>{1}));
  cudaFreeAsync(ws, nullptr);
  for (float* p : {x, wd, y}) cudaFreeAsync(p, nullptr);
}

// The misuse cuDNN's documentation names, refused with its statuses.
TEST(graph_api_refuses_what_cudnn_refuses) {
  // A tensor without strides; an attribute set after finalization; a read before it.
  Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
  const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;
  CHECK(cudnnBackendSetAttribute(t.d, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32) ==
        CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_DIMENSIONS, {1, 1, 3, 3}) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, {1}) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, {16}) == CUDNN_STATUS_SUCCESS);
  int64_t got = 0, uid = 0;
  CHECK(cudnnBackendGetAttribute(t.d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &got, &uid) ==
        CUDNN_STATUS_BAD_PARAM);
  CHECK(cudnnBackendFinalize(t.d) == CUDNN_STATUS_BAD_PARAM);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_STRIDES, {9, 9, 3, 1}) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_DIMENSIONS, {1, 1, 3}) == CUDNN_STATUS_SUCCESS);  // 3 dims, 4 strides
  CHECK(cudnnBackendFinalize(t.d) == CUDNN_STATUS_BAD_PARAM);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_DIMENSIONS, {1, 1, 3, 3}) == CUDNN_STATUS_SUCCESS);
  CHECK(cudnnBackendFinalize(t.d) == CUDNN_STATUS_SUCCESS);
  CHECK(set_i64(t, CUDNN_ATTR_TENSOR_UNIQUE_ID, {5}) == CUDNN_STATUS_BAD_PARAM);
  CHECK(cudnnBackendGetAttribute(t.d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, 1, &got, &uid) ==
            CUDNN_STATUS_SUCCESS &&
        uid == 1 && got == 1);
  CHECK(cudnnBackendGetAttribute(t.d, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_FLOAT, 1, &got, &uid) ==
        CUDNN_STATUS_BAD_PARAM);  // the wrong type
  // A convolution descriptor whose paddings do not have its spatial dimensions' count.
  Desc c(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR);
  const cudnnConvolutionMode_t mode = CUDNN_CROSS_CORRELATION;
  cudnnBackendSetAttribute(c.d, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, 1, &f32);
  cudnnBackendSetAttribute(c.d, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE, 1, &mode);
  set_i64(c, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, {2});
  for (auto n : {CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
                 CUDNN_ATTR_CONVOLUTION_POST_PADDINGS})
    set_i64(c, n, {1, 1});
  set_i64(c, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, {1, 1, 1});
  CHECK(cudnnBackendFinalize(c.d) == CUDNN_STATUS_BAD_PARAM);
  // An operation whose output is not the convolution's size (4x3 where 3x3 comes out).
  Desc x(CUDNN_BACKEND_TENSOR_DESCRIPTOR), w(CUDNN_BACKEND_TENSOR_DESCRIPTOR), y(CUDNN_BACKEND_TENSOR_DESCRIPTOR),
      conv(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR), op(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR);
  tensor(x, 1, {1, 1, 3, 3});
  tensor(w, 2, {1, 1, 3, 3});
  tensor(y, 3, {1, 1, 4, 3});
  conv2d(conv);
  set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X, x);
  set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W, w);
  set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y, y);
  set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, conv);
  const float one = 1.f, zero = 0.f;
  cudnnBackendSetAttribute(op.d, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA, CUDNN_TYPE_FLOAT, 1, &one);
  cudnnBackendSetAttribute(op.d, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA, CUDNN_TYPE_FLOAT, 1, &zero);
  CHECK(cudnnBackendFinalize(op.d) == CUDNN_STATUS_BAD_PARAM);
  // A tensor where a convolution descriptor belongs.
  CHECK(set_desc(op, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC, x) == CUDNN_STATUS_BAD_PARAM);

  // Execution: every tensor's pointer, aligned as declared, inside device memory.
  ForwardGraph g;
  Desc plan(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
  int64_t ws_bytes = -1;
  CHECK(plan_of(g, 0, plan, &ws_bytes));
  float *xd = device(std::vector<float>(9, 1.f)), *wd = device(std::vector<float>(9, 1.f)),
        *yd = device(std::vector<float>(9, 0.f));
  CHECK(execute(g, plan, {xd, wd, yd}, nullptr) == CUDNN_STATUS_SUCCESS);
  CHECK(execute(g, plan, {xd, wd}, nullptr, {1, 2}) == CUDNN_STATUS_BAD_PARAM);  // y not given
  CHECK(execute(g, plan, {xd + 1, wd, yd}, nullptr) == CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER);
  std::vector<float> on_host(64, 0.f);
  CHECK(execute(g, plan, {xd, wd, on_host.data()}, nullptr) == CUDNN_STATUS_EXECUTION_FAILED);
  for (float* p : {xd, wd, yd}) cudaFreeAsync(p, nullptr);
}
