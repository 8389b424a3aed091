// cuDNN's graph (backend) API on the host, for test_cuda_simt: conv_graph.cu itself (its
// descriptors, the heuristics' engine configurations and its filter on their notes,
// execution plans within a workspace limit, plan timing, the per-shape plan cache,
// refusals that send a shape to the legacy API) runs against it.
//
// Descriptors are checked as cuDNN documents them (cudnn_graph.h): an attribute of the
// wrong type or count, one set after finalization, a descriptor finalized without a
// required attribute, an operation whose tensors are not a convolution of its descriptor,
// a read of an unfinalized descriptor or into a descriptor of the wrong type: each gives
// the status cuDNN's documentation names. A descriptor set as another's attribute is
// copied there (cuDNN keeps what it needs at finalization), so destroying it afterwards
// is fine, as it is with cuDNN.
//
// The engines (global indices are this emulation's own): the heuristics list, in mode A,
//   6  FMA on inputs down-converted to bf16 (note DOWN_CONVERT_INPUTS), fp32 data only;
//   9  tensor cores, needs runtime compilation (behaviour note RUNTIME_COMPILATION);
//   7  tensor cores, a 1 TiB workspace (no caller can give it);
//   1  tensor cores (fp32 operands rounded to TF32), a 4 KiB workspace; bf16 data only with
//      channel counts that are multiples of 8;
//   0  FMA, exact fp32 operands; fp32 data only (bf16 data with other channel counts has
//      no engine: the caller's legacy fallback runs);
// and in mode FALLBACK engine 0 alone. A caller that ran 6 without asking would miss fp32
// tolerances, 1 without TF32 allowed likewise, and 7 would run out of memory; 9 computes
// as 1 does (only its time would show on a GPU). Executing a plan checks the variant pack
// (every tensor's pointer given, aligned as its descriptor says, inside one device
// allocation; the workspace when the plan needs one) at the call, and computes the
// convolution in the handle's stream order with the legacy emulation's direct sums
// (simt_cudnn.cpp), so the results are exact sums of the operands as the engine reads them.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "simt_cuda.hpp"

struct SimtBackendDesc;
namespace {
using Snapshot = std::shared_ptr<const SimtBackendDesc>;
}

// One backend descriptor: its attributes as set (or computed at finalization).
struct SimtBackendDesc {
  cudnnBackendDescriptorType_t type;
  bool finalized = false;
  struct Value {
    cudnnBackendAttributeType_t type;
    int64_t count = 0;
    std::vector<unsigned char> bytes;  // count elements (not for descriptors)
    std::vector<Snapshot> descs;       // CUDNN_TYPE_BACKEND_DESCRIPTOR: copies
  };
  std::map<int, Value> attrs;
};

namespace {

using Desc = SimtBackendDesc;

size_t element_size(cudnnBackendAttributeType_t t) {
  switch (t) {
    case CUDNN_TYPE_HANDLE: return sizeof(cudnnHandle_t);
    case CUDNN_TYPE_DATA_TYPE: return sizeof(cudnnDataType_t);
    case CUDNN_TYPE_BOOLEAN: return sizeof(bool);
    case CUDNN_TYPE_INT64: return sizeof(int64_t);
    case CUDNN_TYPE_FLOAT: return sizeof(float);
    case CUDNN_TYPE_DOUBLE: return sizeof(double);
    case CUDNN_TYPE_VOID_PTR: return sizeof(void*);
    case CUDNN_TYPE_CONVOLUTION_MODE: return sizeof(cudnnConvolutionMode_t);
    case CUDNN_TYPE_HEUR_MODE: return sizeof(cudnnBackendHeurMode_t);
    case CUDNN_TYPE_NUMERICAL_NOTE: return sizeof(cudnnBackendNumericalNote_t);
    case CUDNN_TYPE_BEHAVIOR_NOTE: return sizeof(cudnnBackendBehaviorNote_t);
    case CUDNN_TYPE_BACKEND_DESCRIPTOR: return sizeof(cudnnBackendDescriptor_t);
  }
  return 0;
}

// What a caller may set: per descriptor type, each attribute's type (a second accepted
// type for alpha and beta) and element counts. Read-only attributes are absent.
struct Settable {
  cudnnBackendDescriptorType_t desc;
  cudnnBackendAttributeName_t name;
  cudnnBackendAttributeType_t type, alt;
  int64_t min, max;
  cudnnBackendDescriptorType_t refers = (cudnnBackendDescriptorType_t)0;  // for descriptors
};
constexpr int64_t kMaxDims = 8;  // CUDNN_MAX_DIMS

#define CONV_OP(D, P, X, W, Y)                                                                                  \
  {D, P##_ALPHA, CUDNN_TYPE_FLOAT, CUDNN_TYPE_DOUBLE, 1, 1}, {D, P##_BETA, CUDNN_TYPE_FLOAT, CUDNN_TYPE_DOUBLE, 1, 1}, \
      {D, P##_CONV_DESC, CUDNN_TYPE_BACKEND_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1,                      \
       CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR},                                                                     \
      {D, P##_##X, CUDNN_TYPE_BACKEND_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_TENSOR_DESCRIPTOR}, \
      {D, P##_##W, CUDNN_TYPE_BACKEND_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_TENSOR_DESCRIPTOR}, \
      {D, P##_##Y, CUDNN_TYPE_BACKEND_DESCRIPTOR, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_TENSOR_DESCRIPTOR}
const Settable kSettable[] = {
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1, 1},
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_TYPE_DATA_TYPE, 1, 1},
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1, 1},
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1, kMaxDims},
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1, kMaxDims},
    {CUDNN_BACKEND_TENSOR_DESCRIPTOR, CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, CUDNN_TYPE_BOOLEAN, 1, 1},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_TYPE_DATA_TYPE, CUDNN_TYPE_DATA_TYPE,
     1, 1},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_TYPE_CONVOLUTION_MODE,
     CUDNN_TYPE_CONVOLUTION_MODE, 1, 1},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1,
     1},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1,
     kMaxDims},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1,
     kMaxDims},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1,
     kMaxDims},
    {CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1,
     kMaxDims},
    CONV_OP(CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD, X, W, Y),
    CONV_OP(CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA, DX,
            W, DY),
    CONV_OP(CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR, CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER,
            X, DW, DY),
    {CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, CUDNN_TYPE_HANDLE, 1,
     1},
    {CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR, CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR,
     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 64},
    {CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR,
     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR},
    {CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR, CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, 1},
    {CUDNN_BACKEND_ENGINECFG_DESCRIPTOR, CUDNN_ATTR_ENGINECFG_ENGINE, CUDNN_TYPE_BACKEND_DESCRIPTOR,
     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_ENGINE_DESCRIPTOR},
    {CUDNN_BACKEND_ENGINE_DESCRIPTOR, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_TYPE_BACKEND_DESCRIPTOR,
     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR},
    {CUDNN_BACKEND_ENGINE_DESCRIPTOR, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 1, 1},
    {CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, CUDNN_TYPE_HANDLE, 1,
     1},
    {CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR,
     CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, 1, CUDNN_BACKEND_ENGINECFG_DESCRIPTOR},
    {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, CUDNN_TYPE_INT64, 0,
     64},
    {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR,
     CUDNN_TYPE_VOID_PTR, 0, 64},
    {CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR, CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, CUDNN_TYPE_VOID_PTR,
     1, 1},
};
#undef CONV_OP

const Settable* settable(cudnnBackendDescriptorType_t d, cudnnBackendAttributeName_t name) {
  for (const Settable& s : kSettable)
    if (s.desc == d && s.name == name) return &s;
  return nullptr;
}

// ---- reading attributes --------------------------------------------------------------
const Desc::Value* find(const Desc& d, int name) {
  const auto it = d.attrs.find(name);
  return it == d.attrs.end() ? nullptr : &it->second;
}
template <class T>
std::vector<T> values(const Desc& d, int name) {
  const Desc::Value* v = find(d, name);
  if (!v || v->descs.size()) return {};
  std::vector<T> out((size_t)v->count);
  if (v->count) std::memcpy(out.data(), v->bytes.data(), (size_t)v->count * sizeof(T));
  return out;
}
template <class T>
bool one(const Desc& d, int name, T* out) {
  const Desc::Value* v = find(d, name);
  if (!v || v->count != 1 || v->bytes.size() != sizeof(T)) return false;
  std::memcpy(out, v->bytes.data(), sizeof(T));
  return true;
}
const Desc* ref(const Desc& d, int name, size_t i = 0) {
  const Desc::Value* v = find(d, name);
  return v && i < v->descs.size() ? v->descs[i].get() : nullptr;
}
double scalar(const Desc& d, int name) {  // alpha or beta, set as float or double
  const Desc::Value* v = find(d, name);
  if (v->type == CUDNN_TYPE_DOUBLE) return values<double>(d, name)[0];
  return values<float>(d, name)[0];
}
void put(Desc& d, int name, cudnnBackendAttributeType_t type, int64_t count, const void* data) {
  Desc::Value v;
  v.type = type, v.count = count;
  v.bytes.assign(static_cast<const unsigned char*>(data),
                 static_cast<const unsigned char*>(data) + (size_t)count * element_size(type));
  d.attrs[name] = std::move(v);
}
void put_descs(Desc& d, int name, std::vector<Snapshot> descs) {
  Desc::Value v;
  v.type = CUDNN_TYPE_BACKEND_DESCRIPTOR, v.count = (int64_t)descs.size(), v.descs = std::move(descs);
  d.attrs[name] = std::move(v);
}
bool has(const Desc& d, std::initializer_list<int> names) {
  for (int n : names)
    if (!find(d, n)) return false;
  return true;
}

// ---- the one convolution of a graph -----------------------------------------------------
enum class Part { Forward, BackwardData, BackwardFilter };

// A tensor as a finalized descriptor says.
struct Tensor {
  int64_t uid = 0, alignment = 0;
  cudnnDataType_t type = CUDNN_DATA_FLOAT;
  std::vector<int64_t> dims, strides;
  size_t element() const { return type == CUDNN_DATA_BFLOAT16 ? 2 : 4; }
  size_t bytes() const {  // the span its strides reach
    int64_t last = 0;
    for (size_t k = 0; k < dims.size(); ++k) last += (dims[k] - 1) * strides[k];
    return (size_t)(last + 1) * element();
  }
};
Tensor tensor_of(const Desc& d) {
  Tensor t;
  one(d, CUDNN_ATTR_TENSOR_UNIQUE_ID, &t.uid);
  one(d, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &t.alignment);
  one(d, CUDNN_ATTR_TENSOR_DATA_TYPE, &t.type);
  t.dims = values<int64_t>(d, CUDNN_ATTR_TENSOR_DIMENSIONS);
  t.strides = values<int64_t>(d, CUDNN_ATTR_TENSOR_STRIDES);
  return t;
}

struct Problem {
  Part part;
  Tensor x, w, y;  // dx, w, dy for the data gradient; x, dw, dy for the filter gradient
  int spatial = 0;
  std::vector<int64_t> pre, post, stride, dilation;
  double alpha = 1, beta = 0;
  int64_t cin() const { return x.dims[1]; }
  int64_t cout() const { return y.dims[1]; }
};

struct OpNames {
  cudnnBackendAttributeName_t x, w, y, conv, alpha, beta;
};
bool op_names(cudnnBackendDescriptorType_t type, Part* part, OpNames* n) {
  if (type == CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR) {
    *part = Part::Forward;
    *n = {CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,         CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
          CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,         CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
          CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,     CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA};
  } else if (type == CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR) {
    *part = Part::BackwardData;
    *n = {CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,       CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
          CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,       CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
          CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,    CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA};
  } else if (type == CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR) {
    *part = Part::BackwardFilter;
    *n = {CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,      CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
          CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,     CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
          CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,  CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA};
  } else {
    return false;
  }
  return true;
}

// The problem of a finalized convolution operation (or of the one operation of a graph).
Problem problem_of_op(const Desc& op) {
  Problem p;
  OpNames n;
  op_names(op.type, &p.part, &n);
  p.x = tensor_of(*ref(op, n.x)), p.w = tensor_of(*ref(op, n.w)), p.y = tensor_of(*ref(op, n.y));
  const Desc& c = *ref(op, n.conv);
  int64_t spatial = 0;
  one(c, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &spatial);
  p.spatial = (int)spatial;
  p.pre = values<int64_t>(c, CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS);
  p.post = values<int64_t>(c, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS);
  p.stride = values<int64_t>(c, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES);
  p.dilation = values<int64_t>(c, CUDNN_ATTR_CONVOLUTION_DILATIONS);
  p.alpha = scalar(op, n.alpha), p.beta = scalar(op, n.beta);
  return p;
}
Problem problem_of_graph(const Desc& graph) { return problem_of_op(*ref(graph, CUDNN_ATTR_OPERATIONGRAPH_OPS)); }

// ---- the engines ------------------------------------------------------------------------
struct Engine {
  int64_t index;
  bool tensor_core, down_convert, runtime_compilation;
  int64_t workspace;
};
const Engine kEngines[] = {
    {6, false, true, false, 0},
    {9, true, false, true, 4096},
    {7, true, false, false, int64_t(1) << 40},
    {1, true, false, false, 4096},
    {0, false, false, false, 0},
};
const Engine* engine_by_index(int64_t index) {
  for (const Engine& e : kEngines)
    if (e.index == index) return &e;
  return nullptr;
}
bool supports(const Engine& e, const Problem& p) {
  if (p.x.type == CUDNN_DATA_BFLOAT16)  // bf16: the tensor-core engines, channels in eights
    return e.tensor_core && !e.runtime_compilation && e.workspace <= 4096 && p.cin() % 8 == 0 && p.cout() % 8 == 0;
  return true;
}

// An engine descriptor as the heuristics or a finalization fill it in.
void describe_engine(Desc& d, const Engine& e, const Snapshot& graph) {
  put_descs(d, CUDNN_ATTR_ENGINE_OPERATION_GRAPH, {graph});
  put(d, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, CUDNN_TYPE_INT64, 1, &e.index);
  std::vector<cudnnBackendNumericalNote_t> notes;
  if (e.tensor_core) notes.push_back(CUDNN_NUMERICAL_NOTE_TENSOR_CORE);
  if (e.down_convert) notes.push_back(CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS);
  put(d, CUDNN_ATTR_ENGINE_NUMERICAL_NOTE, CUDNN_TYPE_NUMERICAL_NOTE, (int64_t)notes.size(), notes.data());
  std::vector<cudnnBackendBehaviorNote_t> behaviour;
  if (e.runtime_compilation) behaviour.push_back(CUDNN_BEHAVIOR_NOTE_RUNTIME_COMPILATION);
  put(d, CUDNN_ATTR_ENGINE_BEHAVIOR_NOTE, CUDNN_TYPE_BEHAVIOR_NOTE, (int64_t)behaviour.size(), behaviour.data());
  d.finalized = true;
}

// The engine configurations of a heuristics query, best first.
std::vector<Snapshot> heuristics(const Snapshot& graph, cudnnBackendHeurMode_t mode) {
  const Problem p = problem_of_graph(*graph);
  std::vector<Snapshot> out;
  for (const Engine& e : kEngines) {
    if (mode == CUDNN_HEUR_MODE_FALLBACK && e.index != 0) continue;
    if (!supports(e, p)) continue;
    auto engine = std::make_shared<Desc>();
    engine->type = CUDNN_BACKEND_ENGINE_DESCRIPTOR;
    describe_engine(*engine, e, graph);
    auto cfg = std::make_shared<Desc>();
    cfg->type = CUDNN_BACKEND_ENGINECFG_DESCRIPTOR;
    put_descs(*cfg, CUDNN_ATTR_ENGINECFG_ENGINE, {engine});
    cfg->finalized = true;
    out.push_back(cfg);
  }
  return out;
}

// ---- finalization -----------------------------------------------------------------------
bool positive(const std::vector<int64_t>& v) {
  for (int64_t e : v)
    if (e < 1) return false;
  return true;
}

cudnnStatus_t finalize_tensor(Desc& d) {
  if (!has(d, {CUDNN_ATTR_TENSOR_UNIQUE_ID, CUDNN_ATTR_TENSOR_DATA_TYPE, CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT,
               CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_ATTR_TENSOR_STRIDES}))
    return CUDNN_STATUS_BAD_PARAM;
  const Tensor t = tensor_of(d);
  if (t.type != CUDNN_DATA_FLOAT && t.type != CUDNN_DATA_BFLOAT16) return CUDNN_STATUS_NOT_SUPPORTED;
  if (t.dims.size() != t.strides.size() || !positive(t.dims) || !positive(t.strides)) return CUDNN_STATUS_BAD_PARAM;
  if (t.alignment < 1 || t.alignment % (int64_t)t.element() != 0) return CUDNN_STATUS_BAD_PARAM;
  bool is_virtual = false;
  if (one(d, CUDNN_ATTR_TENSOR_IS_VIRTUAL, &is_virtual) && is_virtual) return CUDNN_STATUS_NOT_SUPPORTED;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_convolution(Desc& d) {
  if (!has(d, {CUDNN_ATTR_CONVOLUTION_COMP_TYPE, CUDNN_ATTR_CONVOLUTION_CONV_MODE, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS,
               CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
               CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS}))
    return CUDNN_STATUS_BAD_PARAM;
  int64_t spatial = 0;
  one(d, CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &spatial);
  for (int name : {CUDNN_ATTR_CONVOLUTION_DILATIONS, CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES,
                   CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, CUDNN_ATTR_CONVOLUTION_POST_PADDINGS})
    if (find(d, name)->count != spatial) return CUDNN_STATUS_BAD_PARAM;
  cudnnDataType_t comp;
  cudnnConvolutionMode_t mode;
  one(d, CUDNN_ATTR_CONVOLUTION_COMP_TYPE, &comp);
  one(d, CUDNN_ATTR_CONVOLUTION_CONV_MODE, &mode);
  // The emulation's limits (cuDNN has more): fp32 accumulation, cross-correlation, 2D or 3D.
  if (comp != CUDNN_DATA_FLOAT || mode != CUDNN_CROSS_CORRELATION || spatial < 2 || spatial > 3)
    return CUDNN_STATUS_NOT_SUPPORTED;
  return CUDNN_STATUS_SUCCESS;
}

// x [n, c, s], w [k, c, taps], y [n, k, o] with o = (s + pre + post - dil (taps - 1) - 1) / stride + 1.
cudnnStatus_t finalize_operation(Desc& d) {
  Part part;
  OpNames n;
  op_names(d.type, &part, &n);
  if (!has(d, {n.x, n.w, n.y, n.conv, n.alpha, n.beta})) return CUDNN_STATUS_BAD_PARAM;
  for (int name : {n.x, n.w, n.y})
    if (ref(d, name)->type != CUDNN_BACKEND_TENSOR_DESCRIPTOR || !ref(d, name)->finalized) return CUDNN_STATUS_BAD_PARAM;
  if (!ref(d, n.conv)->finalized) return CUDNN_STATUS_BAD_PARAM;
  const Problem p = problem_of_op(d);
  const size_t nb = (size_t)p.spatial + 2;
  if (p.x.dims.size() != nb || p.w.dims.size() != nb || p.y.dims.size() != nb) return CUDNN_STATUS_BAD_PARAM;
  if (p.x.dims[0] != p.y.dims[0] || p.x.dims[1] != p.w.dims[1] || p.y.dims[1] != p.w.dims[0])
    return CUDNN_STATUS_BAD_PARAM;
  for (int a = 0; a < p.spatial; ++a) {
    const int64_t span = p.x.dims[2 + a] + p.pre[a] + p.post[a] - p.dilation[a] * (p.w.dims[2 + a] - 1) - 1;
    if (p.stride[a] < 1 || span < 0 || span / p.stride[a] + 1 != p.y.dims[2 + a]) return CUDNN_STATUS_BAD_PARAM;
  }
  if (p.x.uid == p.w.uid || p.x.uid == p.y.uid || p.w.uid == p.y.uid) return CUDNN_STATUS_BAD_PARAM;
  if (p.x.type != p.w.type || p.x.type != p.y.type) return CUDNN_STATUS_NOT_SUPPORTED;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_graph(Desc& d) {
  if (!has(d, {CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_ATTR_OPERATIONGRAPH_OPS})) return CUDNN_STATUS_BAD_PARAM;
  cudnnHandle_t h = nullptr;
  one(d, CUDNN_ATTR_OPERATIONGRAPH_HANDLE, &h);
  if (!h) return CUDNN_STATUS_BAD_PARAM;
  const Desc::Value* ops = find(d, CUDNN_ATTR_OPERATIONGRAPH_OPS);
  for (const Snapshot& op : ops->descs)
    if (!op->finalized) return CUDNN_STATUS_BAD_PARAM;
  Part part;
  OpNames n;
  // The emulation's engines run one convolution, as conv_graph.cu's graphs are.
  if (ops->descs.size() != 1 || !op_names(ops->descs[0]->type, &part, &n)) return CUDNN_STATUS_NOT_SUPPORTED;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_heuristics(Desc& d) {
  if (!has(d, {CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, CUDNN_ATTR_ENGINEHEUR_MODE})) return CUDNN_STATUS_BAD_PARAM;
  const Snapshot graph = find(d, CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH)->descs[0];
  if (!graph->finalized) return CUDNN_STATUS_BAD_PARAM;
  cudnnBackendHeurMode_t mode;
  one(d, CUDNN_ATTR_ENGINEHEUR_MODE, &mode);
  if (mode != CUDNN_HEUR_MODE_A && mode != CUDNN_HEUR_MODE_FALLBACK && mode != CUDNN_HEUR_MODE_INSTANT)
    return CUDNN_STATUS_NOT_SUPPORTED;
  put_descs(d, CUDNN_ATTR_ENGINEHEUR_RESULTS, heuristics(graph, mode));
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_engine(Desc& d) {
  if (!has(d, {CUDNN_ATTR_ENGINE_OPERATION_GRAPH, CUDNN_ATTR_ENGINE_GLOBAL_INDEX})) return CUDNN_STATUS_BAD_PARAM;
  const Snapshot graph = find(d, CUDNN_ATTR_ENGINE_OPERATION_GRAPH)->descs[0];
  if (!graph->finalized) return CUDNN_STATUS_BAD_PARAM;
  int64_t index = -1;
  one(d, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, &index);
  const Engine* e = engine_by_index(index);
  if (!e || !supports(*e, problem_of_graph(*graph))) return CUDNN_STATUS_NOT_SUPPORTED;
  describe_engine(d, *e, graph);
  return CUDNN_STATUS_SUCCESS;
}

const Engine* engine_of_config(const Desc& cfg) {
  const Desc* engine = ref(cfg, CUDNN_ATTR_ENGINECFG_ENGINE);
  int64_t index = -1;
  return engine && one(*engine, CUDNN_ATTR_ENGINE_GLOBAL_INDEX, &index) ? engine_by_index(index) : nullptr;
}

cudnnStatus_t finalize_plan(Desc& d) {
  if (!has(d, {CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG})) return CUDNN_STATUS_BAD_PARAM;
  cudnnHandle_t h = nullptr;
  one(d, CUDNN_ATTR_EXECUTION_PLAN_HANDLE, &h);
  const Desc& cfg = *ref(d, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG);
  if (!h || !cfg.finalized) return CUDNN_STATUS_BAD_PARAM;
  const Engine* e = engine_of_config(cfg);
  if (!e) return CUDNN_STATUS_BAD_PARAM;
  put(d, CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1, &e->workspace);
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_engine_config(Desc& d) {
  if (!has(d, {CUDNN_ATTR_ENGINECFG_ENGINE}) || !ref(d, CUDNN_ATTR_ENGINECFG_ENGINE)->finalized)
    return CUDNN_STATUS_BAD_PARAM;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t finalize_pack(Desc& d) {
  if (!has(d, {CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
               CUDNN_ATTR_VARIANT_PACK_WORKSPACE}))
    return CUDNN_STATUS_BAD_PARAM;
  if (find(d, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS)->count != find(d, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS)->count)
    return CUDNN_STATUS_BAD_PARAM;
  return CUDNN_STATUS_SUCCESS;
}

// ---- execution --------------------------------------------------------------------------
// A legacy descriptor of a graph tensor (the emulation's tensor and filter descriptors
// are one type: the filter keeps the graph's strides too).
struct LegacyTensor {
  cudnnTensorDescriptor_t d = nullptr;
  explicit LegacyTensor(const Tensor& t) {
    cudnnCreateTensorDescriptor(&d);
    std::vector<int> dims(t.dims.begin(), t.dims.end()), strides(t.strides.begin(), t.strides.end());
    cudnnSetTensorNdDescriptor(d, t.type, (int)dims.size(), dims.data(), strides.data());
  }
  ~LegacyTensor() { cudnnDestroyTensorDescriptor(d); }
};

// An fp32 operand's storage rounded to bf16 (what a down-converting engine reads).
std::vector<float> down_converted(const Tensor& t, const void* p) {
  std::vector<float> v(t.bytes() / sizeof(float));
  std::memcpy(v.data(), p, v.size() * sizeof(float));
  for (float& e : v) e = __bfloat162float(__float2bfloat16_rn(e));
  return v;
}

cudnnStatus_t run(const Problem& p, const Engine& e, const void* px, const void* pw, const void* py, void* ws) {
  LegacyTensor x(p.x), w(p.w), y(p.y);
  cudnnConvolutionDescriptor_t conv;
  cudnnCreateConvolutionDescriptor(&conv);
  std::vector<int> pads(p.pre.begin(), p.pre.end()), strides(p.stride.begin(), p.stride.end()),
      dilations(p.dilation.begin(), p.dilation.end());
  cudnnStatus_t st = cudnnSetConvolutionNdDescriptor(conv, p.spatial, pads.data(), strides.data(), dilations.data(),
                                                     CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT);
  if (st == CUDNN_STATUS_SUCCESS) {
    cudnnSetConvolutionMathType(conv, e.tensor_core ? CUDNN_TENSOR_OP_MATH : CUDNN_FMA_MATH);
    // Legacy algorithm 1 is the tensor-op one (its 4 KiB workspace within any of these engines').
    const int algo = e.tensor_core ? 1 : 0;
    const size_t bytes = e.tensor_core ? 4096 : 0;
    const float alpha = (float)p.alpha, beta = (float)p.beta;
    // A down-converting engine reads bf16-rounded copies of its inputs; the output is
    // always the caller's (each direction's output pointer is never replaced).
    std::vector<float> x_low, w_low, y_low;
    if (e.down_convert && p.part != Part::BackwardData) px = (x_low = down_converted(p.x, px)).data();
    if (e.down_convert && p.part != Part::BackwardFilter) pw = (w_low = down_converted(p.w, pw)).data();
    if (e.down_convert && p.part != Part::Forward) py = (y_low = down_converted(p.y, py)).data();
    void* out = const_cast<void*>(p.part == Part::Forward ? py : p.part == Part::BackwardData ? px : pw);
    if (p.part == Part::Forward)
      st = cudnnConvolutionForward(nullptr, &alpha, x.d, px, w.d, pw, conv, (cudnnConvolutionFwdAlgo_t)algo, ws, bytes,
                                   &beta, y.d, out);
    else if (p.part == Part::BackwardData)
      st = cudnnConvolutionBackwardData(nullptr, &alpha, w.d, pw, y.d, py, conv, (cudnnConvolutionBwdDataAlgo_t)algo,
                                        ws, bytes, &beta, x.d, out);
    else
      st = cudnnConvolutionBackwardFilter(nullptr, &alpha, x.d, px, y.d, py, conv,
                                          (cudnnConvolutionBwdFilterAlgo_t)algo, ws, bytes, &beta, w.d, out);
  }
  cudnnDestroyConvolutionDescriptor(conv);
  return st;
}

}  // namespace

cudnnStatus_t cudnnBackendCreateDescriptor(cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t* d) {
  if (!d) return CUDNN_STATUS_BAD_PARAM;
  switch (type) {
    case CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR:
    case CUDNN_BACKEND_ENGINE_DESCRIPTOR:
    case CUDNN_BACKEND_ENGINECFG_DESCRIPTOR:
    case CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR:
    case CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR:
    case CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR:
    case CUDNN_BACKEND_TENSOR_DESCRIPTOR: break;
    default: return CUDNN_STATUS_NOT_SUPPORTED;
  }
  Desc* desc = new Desc;
  desc->type = type;
  *d = desc;
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendDestroyDescriptor(cudnnBackendDescriptor_t d) {
  delete static_cast<Desc*>(d);
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendSetAttribute(cudnnBackendDescriptor_t dp, cudnnBackendAttributeName_t name,
                                       cudnnBackendAttributeType_t type, int64_t count, const void* values) {
  if (!dp) return CUDNN_STATUS_BAD_PARAM;
  Desc& d = *static_cast<Desc*>(dp);
  if (d.finalized) return CUDNN_STATUS_BAD_PARAM;  // attributes are read-only after finalization
  const Settable* s = settable(d.type, name);
  if (!s) return CUDNN_STATUS_NOT_SUPPORTED;
  if ((type != s->type && type != s->alt) || count < s->min || count > s->max || (count > 0 && !values))
    return CUDNN_STATUS_BAD_PARAM;
  if (type != CUDNN_TYPE_BACKEND_DESCRIPTOR) {
    put(d, name, type, count, values);
    return CUDNN_STATUS_SUCCESS;
  }
  std::vector<Snapshot> descs;
  for (int64_t i = 0; i < count; ++i) {
    const Desc* r = static_cast<const Desc*>(static_cast<const cudnnBackendDescriptor_t*>(values)[i]);
    if (!r || (s->refers && r->type != s->refers)) return CUDNN_STATUS_BAD_PARAM;
    descs.push_back(std::make_shared<const Desc>(*r));
  }
  put_descs(d, name, std::move(descs));
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendFinalize(cudnnBackendDescriptor_t dp) {
  if (!dp) return CUDNN_STATUS_BAD_PARAM;
  Desc& d = *static_cast<Desc*>(dp);
  if (d.finalized) return CUDNN_STATUS_BAD_PARAM;
  cudnnStatus_t st = CUDNN_STATUS_NOT_SUPPORTED;
  switch (d.type) {
    case CUDNN_BACKEND_TENSOR_DESCRIPTOR: st = finalize_tensor(d); break;
    case CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR: st = finalize_convolution(d); break;
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR:
    case CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR: st = finalize_operation(d); break;
    case CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR: st = finalize_graph(d); break;
    case CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR: st = finalize_heuristics(d); break;
    case CUDNN_BACKEND_ENGINE_DESCRIPTOR: st = finalize_engine(d); break;
    case CUDNN_BACKEND_ENGINECFG_DESCRIPTOR: st = finalize_engine_config(d); break;
    case CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR: st = finalize_plan(d); break;
    case CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR: st = finalize_pack(d); break;
  }
  if (st == CUDNN_STATUS_SUCCESS) d.finalized = true;
  return st;
}

cudnnStatus_t cudnnBackendGetAttribute(cudnnBackendDescriptor_t const dp, cudnnBackendAttributeName_t name,
                                       cudnnBackendAttributeType_t type, int64_t requested, int64_t* count,
                                       void* values) {
  if (!dp || !count || requested < 0 || (requested > 0 && !values)) return CUDNN_STATUS_BAD_PARAM;
  const Desc& d = *static_cast<const Desc*>(dp);
  if (!d.finalized) return CUDNN_STATUS_BAD_PARAM;
  const Desc::Value* v = find(d, name);
  if (!v || v->type != type) return CUDNN_STATUS_BAD_PARAM;
  *count = v->count;
  const int64_t n = std::min(requested, v->count);
  if (type != CUDNN_TYPE_BACKEND_DESCRIPTOR) {
    if (n > 0) std::memcpy(values, v->bytes.data(), (size_t)n * element_size(type));
    return CUDNN_STATUS_SUCCESS;
  }
  // Descriptors are copied into ones the caller created, of the type the attribute holds.
  for (int64_t i = 0; i < n; ++i) {
    Desc* out = static_cast<Desc*>(static_cast<cudnnBackendDescriptor_t*>(values)[i]);
    if (!out || out->type != v->descs[(size_t)i]->type || out->finalized) return CUDNN_STATUS_BAD_PARAM;
    *out = *v->descs[(size_t)i];
  }
  return CUDNN_STATUS_SUCCESS;
}

cudnnStatus_t cudnnBackendExecute(cudnnHandle_t h, cudnnBackendDescriptor_t plan_p, cudnnBackendDescriptor_t pack_p) {
  if (!h || !plan_p || !pack_p) return CUDNN_STATUS_BAD_PARAM;
  const Desc &plan = *static_cast<const Desc*>(plan_p), &pack = *static_cast<const Desc*>(pack_p);
  if (plan.type != CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR || pack.type != CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR ||
      !plan.finalized || !pack.finalized)
    return CUDNN_STATUS_BAD_PARAM;
  const Desc& cfg = *ref(plan, CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG);
  const Engine& e = *engine_of_config(cfg);
  const Problem p = problem_of_graph(*ref(*ref(cfg, CUDNN_ATTR_ENGINECFG_ENGINE), CUDNN_ATTR_ENGINE_OPERATION_GRAPH));
  const std::vector<int64_t> uids = values<int64_t>(pack, CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS);
  const std::vector<void*> ptrs = values<void*>(pack, CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS);
  void* ws = values<void*>(pack, CUDNN_ATTR_VARIANT_PACK_WORKSPACE)[0];
  const void* at[3] = {nullptr, nullptr, nullptr};
  const Tensor* tensors[3] = {&p.x, &p.w, &p.y};
  for (int k = 0; k < 3; ++k) {
    for (size_t i = 0; i < uids.size(); ++i)
      if (uids[i] == tensors[k]->uid) at[k] = ptrs[i];
    if (!at[k]) return CUDNN_STATUS_BAD_PARAM;  // a tensor of the graph without a pointer
    if (reinterpret_cast<uintptr_t>(at[k]) % (uintptr_t)tensors[k]->alignment != 0)
      return CUDNN_STATUS_BAD_PARAM_MISALIGNED_POINTER;
    // On a GPU a tensor reaching past its buffer is an illegal address (or silent).
    if (::simt::device_bytes_from(at[k]) < tensors[k]->bytes()) {
      std::fprintf(stderr, "simt cuDNN graph: tensor %lld (%zu bytes) at %p is not inside one device allocation\n",
                   (long long)tensors[k]->uid, tensors[k]->bytes(), at[k]);
      return CUDNN_STATUS_EXECUTION_FAILED;
    }
  }
  if (e.workspace > 0 && (!ws || ::simt::device_bytes_from(ws) < (size_t)e.workspace)) return CUDNN_STATUS_BAD_PARAM;
  if (p.pre != p.post) return CUDNN_STATUS_NOT_SUPPORTED;  // the legacy emulation pads both sides alike
  // Checked now; computed in the handle's stream order (what run() checks again holds).
  const void *x = at[0], *w = at[1], *y = at[2];
  ::simt::enqueue(::simt::stream_of(h), [p, e, x, w, y, ws] {
    const cudnnStatus_t st = run(p, e, x, w, y, ws);
    if (st != CUDNN_STATUS_SUCCESS) std::fprintf(stderr, "simt cuDNN graph: a checked plan failed (%d)\n", (int)st);
  });
  return CUDNN_STATUS_SUCCESS;
}
