// The native Model as a JS class. Long work (trainStep, computeGradients,
// evaluate, predict) runs in a Napi::AsyncWorker and returns a Promise; a GPU model's
// inputs are referenced, not copied, for the duration; a CPU model's are copied (HeldInputs).
#include "model_wrap.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <array>
#include "args.h"
#include "promise_worker.h"
#include "cmseg/backend.hpp"
#include "cmseg/cuda.hpp"
#include "cmseg/error.hpp"

namespace cmseg_js {
namespace {

using cmseg::Spatial;

cmseg::ModelConfig parse_config(Napi::Env env, const Napi::Value& v) {
  Napi::Object o = expect_object(env, v, "model config");
  check_keys(env, o, "model config",
             {"ndim", "inChannels", "classes", "annotators", "depth", "baseChannels", "cmMode", "cmRank",
              "cmHeadBlocks", "cmInit", "seed", "device", "tf32", "bf16", "gpuMemoryLimitMB"});
  const char* w = "config";
  cmseg::ModelConfig c;
  c.ndim = get_int(env, o, "ndim", 2, w);
  c.in_channels = get_int(env, o, "inChannels", 1, w);
  if (o.Get("classes").IsUndefined()) throw_invalid(env, "config.classes is required");
  if (o.Get("annotators").IsUndefined()) throw_invalid(env, "config.annotators is required");
  c.classes = get_int(env, o, "classes", 2, w);
  c.annotators = get_int(env, o, "annotators", 1, w);
  c.depth = get_int(env, o, "depth", 4, w);
  c.base = get_int(env, o, "baseChannels", c.ndim == 3 ? 16 : 32, w);
  c.cm_mode = guard(env, [&] { return cmseg::parse_cm_mode(get_string(env, o, "cmMode", "full", w)); });
  c.cm_rank = get_int(env, o, "cmRank", 1, w);
  c.cm_head_blocks = get_int(env, o, "cmHeadBlocks", 0, w);
  const std::string init = get_string(env, o, "cmInit", "identity", w);
  if (init != "identity" && init != "uniform")
    throw_invalid(env, "config.cmInit must be 'identity' or 'uniform', got '" + init + "'");
  c.cm_init = init == "identity" ? cmseg::CmInit::Identity : cmseg::CmInit::Uniform;
  const double seed = get_number(env, o, "seed", 0, w);
  // Above 2^53 a JS number no longer holds every integer (and past 2^64 the cast is undefined).
  if (seed < 0 || seed != std::floor(seed) || seed > 9007199254740991.0)
    throw_invalid(env, "config.seed must be an integer in 0..2^53-1, got " + number_text(seed));
  c.seed = (uint64_t)seed;
  const std::string device = get_string(env, o, "device", "cpu", w);
  if (device != "cpu" && device != "cuda" && device != "auto")
    throw_invalid(env, "config.device must be 'cpu', 'cuda' or 'auto', got '" + device + "'");
  if (device == "cuda" && !cmseg::cuda::built())
    throw_invalid(env, "config.device is 'cuda' but this build has no CUDA backend (backendInfo().cuda is false)");
  if (device == "cuda" && !cmseg::cuda::available())
    throw_invalid(env, "config.device is 'cuda' but no GPU can be used: " + cmseg::cuda::unavailable_reason());
  // 'auto': the GPU when this build has the backend and a device is usable now.
  const bool gpu = device == "cuda" || (device == "auto" && cmseg::cuda::available());
  c.device = gpu ? cmseg::Device::Cuda : cmseg::Device::Cpu;
  const Napi::Value tf32 = o.Get("tf32");
  if (!tf32.IsUndefined()) {
    if (!tf32.IsBoolean()) throw_invalid(env, "config.tf32 must be a boolean");
    c.tf32 = tf32.As<Napi::Boolean>().Value();
  }
  const Napi::Value bf16 = o.Get("bf16");
  if (!bf16.IsUndefined()) {
    if (!bf16.IsBoolean()) throw_invalid(env, "config.bf16 must be a boolean");
    c.bf16 = bf16.As<Napi::Boolean>().Value();
  }
  const double limit_mb = get_number(env, o, "gpuMemoryLimitMB", 0, w);
  if (!(limit_mb >= 0) || limit_mb > 1e9) throw_invalid(env, "config.gpuMemoryLimitMB must be a number of MiB >= 0 (0: no limit)");
  c.gpu_memory_limit = (size_t)(limit_mb * 1048576.0);
  guard(env, [&] { cmseg::validate_config(c); });
  return c;
}

// images + shape ([N, C, H, W] or [N, C, D, H, W]) -> n, spatial; checks the array length.
struct ImageArgs {
  int n = 0;
  Spatial s;
  Napi::Float32Array images;
};

// The shape alone (n, spatial); the images are taken by take_images once no more caller
// code (getters, Proxy traps) can run before the call copies them.
ImageArgs parse_shape(Napi::Env env, const cmseg::ModelConfig& c, const Napi::Value& shape_v) {
  const auto wrong_length = [&](size_t got) {
    throw_invalid(env, "shape must have " + std::to_string(c.ndim + 2) + " entries (" +
                           (c.ndim == 3 ? "N, C, D, H, W" : "N, C, H, W") + ") for a " + std::to_string(c.ndim) +
                           "D model, got " + std::to_string(got));
  };
  if (shape_v.IsArray() && shape_v.As<Napi::Array>().Length() != (uint32_t)(c.ndim + 2))
    wrong_length(shape_v.As<Napi::Array>().Length());  // before its entries are read
  std::vector<int64_t> shape = expect_int_array(env, shape_v, "shape");
  if ((int)shape.size() != c.ndim + 2) wrong_length(shape.size());
  if (shape[1] != c.in_channels)
    throw_invalid(env, "shape[1] (channels) is " + std::to_string(shape[1]) + " but the model has inChannels " +
                           std::to_string(c.in_channels));
  ImageArgs a;
  a.n = (int)shape[0];
  if (a.n < 1) throw_invalid(env, "shape[0] (batch size) must be >= 1");
  double elements = 1;  // entries are <= INT_MAX each, but their product may still overflow int64
  for (int64_t e : shape) elements *= (double)e;
  if (elements > 9007199254740992.0)
    throw_invalid(env, "shape describes " + number_text(elements) + " elements, more than 2^53");
  if (c.ndim == 3)
    a.s = {(int)shape[2], (int)shape[3], (int)shape[4]};
  else
    a.s = {1, (int)shape[2], (int)shape[3]};
  return a;
}

void take_images(Napi::Env env, const cmseg::ModelConfig& c, ImageArgs& a, const Napi::Value& images) {
  a.images = expect_f32(env, images, "images", (int64_t)a.n * c.in_channels * a.s.size());
}

// predict's optional 4th argument: arrays to write the outputs into instead of new ones, each
// exactly its output's length (Model's internal predictInto: sliding-window inference reuses
// one set per volume, where 100 MB of fresh outputs a batch cost their page faults). Held
// here, by name, not on a JS object read back later: a name not given was looked up on
// Object.prototype, whose getter ran after every check and could hand over a 1-element array
// the worker then filled (a heap overflow). Null when not given.
struct GivenOutputs {
  std::array<Napi::Reference<Napi::Float32Array>, 3> arrays;  // empty where not given
  bool has(int k) const { return !arrays[k].IsEmpty(); }
};

std::shared_ptr<GivenOutputs> take_outputs(Napi::Env env, const Napi::CallbackInfo& info, const double counts[3],
                                           const char* const names[3]) {
  if (info.Length() < 4 || info[3].IsUndefined()) return nullptr;
  Napi::Object given = expect_object(env, info[3], "predict outputs");
  check_keys(env, given, "predict outputs", {"probs", "cms", "annotatorProbs"});
  // Every value read before any is checked: a getter met later (the caller's last code) could
  // otherwise transfer or shrink an array checked before it, which the worker then wrote
  // into freed memory (RunBatch reads its batch the same way).
  Napi::Value values[3];
  for (int k = 0; k < 3; ++k) values[k] = given.Get(names[k]);
  auto own = std::make_shared<GivenOutputs>();
  for (int k = 0; k < 3; ++k) {
    if (values[k].IsUndefined()) continue;
    const std::string what = std::string("predict outputs.") + names[k];
    if (counts[k] == 0) throw_invalid(env, what + " was given for an output not asked for");
    own->arrays[k] = Napi::Persistent(expect_f32(env, values[k], what.c_str(), (int64_t)counts[k]));
  }
  return own;
}

// The outputs are written on the worker thread while a GPU model may still read the images in
// place, and q is computed from p: two of them sharing memory would give wrong numbers.
void check_no_overlap(Napi::Env env, const GivenOutputs& into, const Napi::Float32Array& images,
                      const char* const names[3]) {
  std::vector<std::pair<std::string, Napi::Float32Array>> arrays{{"the images", images}};
  for (int k = 0; k < 3; ++k)
    if (into.has(k)) arrays.push_back({std::string("predict outputs.") + names[k], into.arrays[k].Value()});
  for (size_t i = 0; i < arrays.size(); ++i)
    for (size_t j = i + 1; j < arrays.size(); ++j) {
      if (shares_memory(arrays[i].second, arrays[j].second)) throw_invalid(env, arrays[j].first + " shares memory with " + arrays[i].first);
    }
}

// A prediction output allocated natively (calloc: no exception, no V8 abort when it
// cannot be had), handed to JS as an external ArrayBuffer that frees it.
struct HostBuffer {
  float* data = nullptr;
  size_t count = 0;
  HostBuffer() = default;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  ~HostBuffer() { std::free(data); }
};

// The most elements one Float32Array holds in Node 18-20 (v8::TypedArray::kMaxLength);
// V8 aborts the process instead of throwing past it.
constexpr double kMaxTypedArrayLength = 4294967296.0;

using cmseg::gib_text;

// Wraps b's memory as a Float32Array that owns it (b gives it up). Runtimes that
// forbid external buffers (Electron's sandbox) get a copy instead.
Napi::Float32Array adopt(Napi::Env env, HostBuffer& b) {
  const size_t bytes = b.count * sizeof(float);
  try {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(env, b.data, bytes, [](Napi::Env, void* d) { std::free(d); });
    b.data = nullptr;  // the ArrayBuffer owns it now
    return Napi::Float32Array::New(env, b.count, ab, 0);
  } catch (const Napi::Error&) {
    if (!b.data) throw;
  }
  Napi::Float32Array a = Napi::Float32Array::New(env, b.count);
  std::memcpy(a.Data(), b.data, bytes);
  std::free(b.data);
  b.data = nullptr;
  return a;
}

Napi::Object step_result(Napi::Env env, const cmseg::StepResult& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("loss", r.loss);
  Napi::Array ce = Napi::Array::New(env, r.ce.size()), tr = Napi::Array::New(env, r.trace.size());
  for (size_t i = 0; i < r.ce.size(); ++i) ce.Set((uint32_t)i, r.ce[i]);
  for (size_t i = 0; i < r.trace.size(); ++i) tr.Set((uint32_t)i, r.trace[i]);
  o.Set("ce", ce);
  o.Set("trace", tr);
  o.Set("traceWeight", r.trace_weight);
  o.Set("step", (double)r.step);
  return o;
}

// The inputs of one async call, copied for a CPU model. A typed array is a view of an
// ArrayBuffer whose memory moves to another when the buffer is transferred
// (postMessage, structuredClone): the view then reads as empty, and the memory is freed
// with its new owner, while the worker thread may still be reading it (a segfault, not an
// error). Holding a reference to the view does not prevent that. A CPU call reads its
// inputs for seconds and copies them in milliseconds (the images are C floats a voxel
// against the forward pass's 6 * baseChannels and more), so it works on copies. A GPU
// model reads them in place (uploaded at the start of the call; a copy there would cost a
// visible part of a step): its inputs must not be transferred until the Promise settles.
struct HeldInputs {
  std::vector<float> images, soft_target;
  std::vector<uint8_t> present, target;
  std::vector<std::vector<uint8_t>> labels;
};

template <class T>
const T* hold(std::vector<T>& into, const T* data, size_t count) {
  into.assign(data, data + count);
  return into.data();
}

// The number the caller gave for key, for messages. Float options are checked after their
// rounding to float32, whose value ("got -0.10000000149011612", or "got 0" for an eps of
// 1e-50) is not what was typed; one that rounds to 0 says so.
std::string given_text(const Napi::Object& o, const char* key, float stored) {
  const Napi::Value v = o.Get(key);
  const double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : stored;
  return number_text(d) + (stored == 0 && d != 0 ? " (0 in float32, the precision it is kept in)" : "");
}

}  // namespace

Napi::Function ModelWrap::Define(Napi::Env env) {
  return DefineClass(env, "NativeModel",
                     {InstanceMethod("trainStep", &ModelWrap::TrainStep),
                      InstanceMethod("computeGradients", &ModelWrap::ComputeGradients),
                      InstanceMethod("evaluate", &ModelWrap::Evaluate),
                      InstanceMethod("predict", &ModelWrap::Predict),
                      InstanceMethod("parameters", &ModelWrap::Parameters),
                      InstanceMethod("getWeights", &ModelWrap::GetWeights),
                      InstanceMethod("getGradients", &ModelWrap::GetGradients),
                      InstanceMethod("setWeights", &ModelWrap::SetWeights),
                      InstanceMethod("getOptimizerState", &ModelWrap::GetOptimizerState),
                      InstanceMethod("setOptimizerState", &ModelWrap::SetOptimizerState),
                      InstanceMethod("getOptimizer", &ModelWrap::GetOptimizer),
                      InstanceMethod("setOptimizer", &ModelWrap::SetOptimizer),
                      InstanceMethod("getLoss", &ModelWrap::GetLoss),
                      InstanceMethod("setLoss", &ModelWrap::SetLoss),
                      InstanceMethod("config", &ModelWrap::Config),
                      InstanceMethod("memory", &ModelWrap::Memory),
                      InstanceMethod("resetPeakMemory", &ModelWrap::ResetPeakMemory),
                      InstanceMethod("releaseBuffers", &ModelWrap::ReleaseBuffers),
                      InstanceMethod("dispose", &ModelWrap::Dispose)});
}

ModelWrap::ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
  Napi::Env env = info.Env();
  cmseg::ModelConfig c = parse_config(env, info[0]);
  model_ = guard(env, [&] { return std::make_unique<cmseg::Model>(c); });
  // Tell V8 about the native heap (parameters, gradients and Adam moments, 16 bytes
  // per parameter) so that dropped models are collected before memory runs short.
  env_ = env;
  for (const cmseg::Param& p : model_->param_layout())
    external_bytes_ += (int64_t)(p.value.capacity() + p.grad.capacity() + p.m.capacity() + p.v.capacity()) * sizeof(float);
  if (external_bytes_ > 0) Napi::MemoryManagement::AdjustExternalMemory(env, external_bytes_);
}

ModelWrap::~ModelWrap() { release_model(); }

void ModelWrap::release_model() {
  model_.reset();  // frees host and GPU memory
  if (external_bytes_ > 0 && env_) {
    try {
      Napi::MemoryManagement::AdjustExternalMemory(Napi::Env(env_), -external_bytes_);
    } catch (...) {
      // Env teardown: nothing left to report to.
    }
  }
  external_bytes_ = 0;
  workspace_bytes_ = 0;
}

// A CPU model keeps its activation buffers between calls and reuses them (they only grow),
// so it holds about what its largest call needed: for a 3D step, tens of MB against its
// parameters' hundreds of KB. Reported to V8 with the parameters, so that a model dropped
// without dispose() counts for what it holds: with the parameters alone, a loop creating
// and training 2x32^3 models grew by 44 MB a model, to 3 GB in 60 rounds, without one
// collection. Called on the main thread once a call has succeeded (before any of the
// caller's code can run and dispose of the model); the figure is the engine's lower bound
// of the buffers a call keeps at once (Model::host_bytes_lower_bound, 0 for a GPU model).
void ModelWrap::report_workspace(const cmseg::Model& model, int n, cmseg::Spatial s, bool backward, bool heads) {
  if (!env_) return;
  const double bytes = model.host_bytes_lower_bound(n, s, backward, heads);
  if (!(bytes > (double)workspace_bytes_) || bytes > 9.0e18) return;
  const int64_t grow = (int64_t)bytes - workspace_bytes_;
  try {
    Napi::MemoryManagement::AdjustExternalMemory(Napi::Env(env_), grow);
  } catch (...) {
    return;  // nothing reported, nothing to take back in release_model
  }
  workspace_bytes_ += grow;
  external_bytes_ += grow;
}

cmseg::Model& ModelWrap::live(Napi::Env env) const {
  if (!model_) throw_error(env, "this model was disposed", "CMSEG_DISPOSED");
  return *model_;
}

cmseg::Model& ModelWrap::idle(Napi::Env env) const {
  cmseg::Model& m = live(env);
  if (busy_) throw_invalid(env, "model is busy with an earlier trainStep/predict: await it before calling again");
  return m;
}

// Frees the activation buffers the model keeps between calls (Model::release_buffers);
// V8 is told that the memory reported for them is gone.
Napi::Value ModelWrap::ReleaseBuffers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cmseg::Model& model = idle(env);
  guard(env, [&] { model.release_buffers(); });
  if (workspace_bytes_ > 0 && env_) {
    try {
      Napi::MemoryManagement::AdjustExternalMemory(env, -workspace_bytes_);
      external_bytes_ -= workspace_bytes_;
      workspace_bytes_ = 0;
    } catch (...) {
      // Left as reported: release_model takes back what external_bytes_ says.
    }
  }
  return env.Undefined();
}

// Frees the native model now (the garbage collector would do it later). Refused
// while an async call runs on it; a second call does nothing. Every other method
// throws "this model was disposed" afterwards.
Napi::Value ModelWrap::Dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!model_) return env.Undefined();
  if (busy_) throw_invalid(env, "model is busy with an earlier trainStep/predict: await it before calling dispose()");
  release_model();
  return env.Undefined();
}

Napi::Value ModelWrap::RunBatch(const Napi::CallbackInfo& info, Mode mode) {
  Napi::Env env = info.Env();
  // A copy: the caller's getters below may dispose of the model (see the re-check below).
  const cmseg::ModelConfig c = idle(env).config();
  Napi::Object o = expect_object(env, info[0], "batch");
  check_keys(env, o, "batch", {"images", "shape", "labels", "present", "target", "softTarget"});
  // Every field is read once, and the arrays are taken (their pointers read) only after the
  // last of the caller's code has run: a getter, a Proxy trap or an array element getter met
  // while reading the batch may transfer, shrink or refill an array checked before it, and a
  // pointer read earlier would then point into freed memory or at values never checked.
  const Napi::Value images_v = o.Get("images"), shape_v = o.Get("shape"), labels_v = o.Get("labels"),
                    target_v = o.Get("target"), soft_v = o.Get("softTarget"), present_v = o.Get("present");
  // Exactly one of labels (CM loss), target and softTarget (plain CE) says what to fit.
  {
    std::vector<std::string> given;
    for (const auto& [k, v] : {std::pair<const char*, Napi::Value>{"labels", labels_v}, {"target", target_v},
                               {"softTarget", soft_v}})
      if (!v.IsUndefined()) given.push_back(k);
    if (given.size() > 1) {
      std::string list;
      for (size_t i = 0; i < given.size(); ++i)
        list += (i == 0 ? "" : i + 1 == given.size() ? " and " : ", ") + given[i];
      throw_invalid(env, "batch has both " + list +
                             "; pass only one of labels (annotator maps, CM loss), target (one label map) or "
                             "softTarget (soft labels)");
    }
  }
  // present says which annotators labelled an image: it has no meaning for one fused target.
  if (!present_v.IsUndefined() && (!target_v.IsUndefined() || !soft_v.IsUndefined()))
    throw_invalid(env, std::string("batch.present applies to labels (one map per annotator); with ") +
                           (target_v.IsUndefined() ? "softTarget" : "target") +
                           " it would be ignored: drop it, or pass labels");
  ImageArgs im = parse_shape(env, c, shape_v);
  take_images(env, c, im, images_v);  // its errors first, as before; taken again below
  const int64_t NV = (int64_t)im.n * im.s.size();
  std::vector<Napi::Value> label_vs;
  if (target_v.IsUndefined() && soft_v.IsUndefined()) {
    const Napi::Value& lv = labels_v;
    if (!lv.IsArray())
      throw_invalid(env, "batch.labels must be an array of one Uint8Array per annotator" + proxy_hint(env, lv));
    Napi::Array labels = lv.As<Napi::Array>();
    if ((int)labels.Length() != c.annotators)
      throw_invalid(env, "batch.labels has " + std::to_string(labels.Length()) + " maps but the model has " +
                             std::to_string(c.annotators) + " annotators");
    for (uint32_t r = 0; r < labels.Length(); ++r) label_vs.push_back(labels.Get(r));
  }
  // No caller code runs from here on. The model is looked up again: a getter met above may
  // have disposed of it (freed: the call would step freed memory) or started a call of its
  // own on it (two calls at once on one model).
  cmseg::Model* model = &idle(env);
  auto batch = std::make_shared<cmseg::Batch>();
  take_images(env, c, im, images_v);
  batch->n = im.n, batch->s = im.s, batch->images = im.images.Data();
  std::vector<Napi::Value> keep = {im.images};
  if (!target_v.IsUndefined()) {
    Napi::Uint8Array t = expect_u8(env, target_v, "batch.target", NV);
    batch->target = t.Data();
    keep.push_back(t);
  } else if (!soft_v.IsUndefined()) {
    Napi::Float32Array t = expect_f32(env, soft_v, "batch.softTarget", NV * c.classes);
    batch->soft_target = t.Data();
    keep.push_back(t);
  } else {
    for (size_t r = 0; r < label_vs.size(); ++r) {
      const std::string what = "batch.labels[" + std::to_string(r) + "]";
      Napi::Uint8Array l = expect_u8(env, label_vs[r], what.c_str(), NV);
      batch->labels.push_back(l.Data());
      keep.push_back(l);
    }
    if (!present_v.IsUndefined()) {
      Napi::Uint8Array p = expect_u8(env, present_v, "batch.present", (int64_t)im.n * c.annotators);
      for (size_t k = 0; k < p.ElementLength(); ++k)
        if (p[k] > 1)
          throw_invalid(env, "batch.present[" + std::to_string(k) + "] is " + std::to_string(p[k]) +
                                 "; entries must be 0 (annotator absent) or 1 (present)");
      batch->present = p.Data();
      keep.push_back(p);
    }
  }
  auto held = std::make_shared<HeldInputs>();
  if (c.device == cmseg::Device::Cpu) {  // copies the call owns (HeldInputs says why)
    guard(env, [&] {  // bad_alloc -> a CMSEG_OUT_OF_MEMORY rejection, not std::terminate
      const size_t V = (size_t)NV;
      batch->images = hold(held->images, batch->images, V * c.in_channels);
      for (auto& l : batch->labels) {
        held->labels.emplace_back();
        l = hold(held->labels.back(), l, V);
      }
      if (batch->present) batch->present = hold(held->present, batch->present, (size_t)im.n * c.annotators);
      if (batch->target) batch->target = hold(held->target, batch->target, V);
      if (batch->soft_target) batch->soft_target = hold(held->soft_target, batch->soft_target, V * c.classes);
    });
    keep.clear();
  }
  auto result = std::make_shared<cmseg::StepResult>();
  const bool heads = target_v.IsUndefined() && soft_v.IsUndefined();  // the CM loss runs the CM heads
  const int n_images = im.n;
  const cmseg::Spatial s = im.s;
  auto* w = new PromiseWorker(
      env, &busy_,
      [=] {
        if (mode == Mode::Train)
          *result = model->train_step(*batch);
        else if (mode == Mode::Gradients)
          *result = model->compute_gradients(*batch);
        else
          *result = model->evaluate(*batch);
        (void)held;  // the copies live as long as the call
      },
      [=](Napi::Env e) {
        if (model_) report_workspace(*model_, n_images, s, mode != Mode::Evaluate, heads);
        return step_result(e, *result);
      });
  for (auto& k : keep) w->keep(k);
  w->keep(info.This());
  busy_ = true;
  w->Queue();
  return w->promise();
}

Napi::Value ModelWrap::TrainStep(const Napi::CallbackInfo& info) { return RunBatch(info, Mode::Train); }
Napi::Value ModelWrap::ComputeGradients(const Napi::CallbackInfo& info) { return RunBatch(info, Mode::Gradients); }
Napi::Value ModelWrap::Evaluate(const Napi::CallbackInfo& info) { return RunBatch(info, Mode::Evaluate); }

Napi::Value ModelWrap::Predict(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::ModelConfig c = idle(env).config();  // a copy (RunBatch says why)
  ImageArgs im = parse_shape(env, c, info[1]);
  take_images(env, c, im, info[0]);  // its errors before the options', as before; taken again below
  bool want_cms = false, want_q = false;
  if (info.Length() > 2 && !info[2].IsUndefined()) {
    Napi::Object opts = expect_object(env, info[2], "predict options");
    check_keys(env, opts, "predict options", {"cms", "annotatorProbs"});
    auto flag = [&](const char* key) {
      Napi::Value f = opts.Get(key);
      if (f.IsUndefined()) return false;
      if (!f.IsBoolean()) throw_invalid(env, std::string("predict options.") + key + " must be a boolean");
      return f.As<Napi::Boolean>().Value();
    };
    want_cms = flag("cms");
    want_q = flag("annotatorProbs");
  }
  // Sizes in double: n * R * L * L * V can pass int64 for absurd requests.
  const double V = (double)im.s.size(), n = im.n, L = c.classes, R = c.annotators;
  const double counts[3] = {n * L * V, want_cms ? n * R * L * L * V : 0, want_q ? n * R * L * V : 0};
  const char* names[3] = {"probs", "cms", "annotatorProbs"};
  const std::shared_ptr<GivenOutputs> into = take_outputs(env, info, counts, names);
  // The options' getters are the caller's last code to run: the images and the model are
  // taken after them (RunBatch says why).
  take_images(env, c, im, info[0]);
  cmseg::Model* model = &idle(env);
  if (into) check_no_overlap(env, *into, im.images, names);
  // Only what is allocated here counts against the memory: given outputs exist already.
  auto given = [&](int k) { return into && into->has(k); };
  const double total_bytes =
      ((given(0) ? 0 : counts[0]) + (given(1) ? 0 : counts[1]) + (given(2) ? 0 : counts[2])) * sizeof(float);
  const std::string advice = "; predict fewer or smaller images at a time" +
                             std::string(want_cms || want_q ? ", or without cms / annotatorProbs" : "");
  const double ram = cmseg::physical_memory_bytes();
  const std::string oom = "out of memory allocating the prediction outputs (" + gib_text(total_bytes) + ")";
  if (ram > 0 && total_bytes > ram)
    throw_error(env, oom + ": this machine has " + gib_text(ram) + " of memory" + advice, "CMSEG_OUT_OF_MEMORY");
  for (int k = 0; k < 3; ++k)
    if (counts[k] > kMaxTypedArrayLength)
      throw_error(env,
                  "the prediction output " + std::string(names[k]) + " would have " + std::to_string((int64_t)counts[k]) +
                      " elements (" + gib_text(counts[k] * sizeof(float)) +
                      "), more than one Float32Array can hold (2^32)" + advice,
                  "CMSEG_OUT_OF_MEMORY");
  // The outputs and the forward pass's maps are held at once (a CPU model): each may fit
  // while both do not, and the outputs are written last, when Linux would kill the process.
  const double forward = model->host_bytes_lower_bound(im.n, im.s, false, want_cms || want_q);
  if (ram > 0 && forward > 0 && total_bytes + forward > ram)
    throw_error(env,
                "a prediction on " + std::to_string(im.n) + " image(s) of " + std::to_string(im.s.d) + "x" +
                    std::to_string(im.s.h) + "x" + std::to_string(im.s.w) + " needs more than " +
                    gib_text(total_bytes + forward) + " (outputs " + gib_text(total_bytes) + ", forward pass " +
                    gib_text(forward) + "), more than this machine's " + gib_text(ram) + " of memory" + advice,
                "CMSEG_OUT_OF_MEMORY");
  auto out = std::make_shared<std::array<HostBuffer, 3>>();
  float* ptr[3] = {nullptr, nullptr, nullptr};
  for (int k = 0; k < 3; ++k) {
    if (counts[k] == 0) continue;
    if (given(k)) {
      ptr[k] = into->arrays[k].Value().Data();
      continue;
    }
    HostBuffer& b = (*out)[k];
    b.count = (size_t)counts[k];
    b.data = static_cast<float*>(std::calloc(b.count, sizeof(float)));
    if (!b.data) throw_error(env, oom + advice, "CMSEG_OUT_OF_MEMORY");  // `out` frees the others
    ptr[k] = b.data;
  }
  float* pp = ptr[0];
  float* cp = ptr[1];
  float* qp = ptr[2];
  const float* img = im.images.Data();
  // A CPU model predicts from a copy (HeldInputs says why).
  auto held = std::make_shared<HeldInputs>();
  const bool copy = c.device == cmseg::Device::Cpu;
  if (copy) img = guard(env, [&] { return hold(held->images, img, (size_t)im.n * c.in_channels * im.s.size()); });
  const cmseg::Spatial s = im.s;
  const int nn = im.n;
  auto* w = new PromiseWorker(
      env, &busy_, [=] {
        (void)held;
        model->predict(img, nn, s, pp, cp, qp);
      },
      [=](Napi::Env e) {
        if (model_) report_workspace(*model_, nn, s, false, want_cms || want_q);
        Napi::Object o = Napi::Object::New(e);
        const bool wanted[3] = {true, want_cms, want_q};
        for (int k = 0; k < 3; ++k) {
          if (!wanted[k]) continue;
          o.Set(names[k], into && into->has(k) ? Napi::Value(into->arrays[k].Value()) : Napi::Value(adopt(e, (*out)[k])));
        }
        return o;
      });
  if (!copy) w->keep(im.images);
  if (into)
    for (int k = 0; k < 3; ++k)
      if (into->has(k)) w->keep(into->arrays[k].Value());
  w->keep(info.This());
  busy_ = true;
  w->Queue();
  return w->promise();
}

Napi::Value ModelWrap::Parameters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Names and shapes (no GPU download), read before any JS object is built: a setter on
  // Object.prototype runs in Set and could dispose of the model under the loop.
  std::vector<std::pair<std::string, std::vector<int64_t>>> layout;
  for (auto& p : live(env).param_layout()) layout.push_back({p.name, std::vector<int64_t>(p.shape.begin(), p.shape.end())});
  Napi::Array out = Napi::Array::New(env);
  uint32_t i = 0;
  for (auto& [name, dims] : layout) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", name);
    Napi::Array shape = Napi::Array::New(env, dims.size());
    for (size_t k = 0; k < dims.size(); ++k) shape.Set((uint32_t)k, (double)dims[k]);
    o.Set("shape", shape);
    out.Set(i++, o);
  }
  return out;
}

Napi::Value ModelWrap::named_arrays(Napi::Env env, std::vector<float> cmseg::Param::*field) {
  const cmseg::Model& model = idle(env);
  Napi::Object out = Napi::Object::New(env);
  // Read-only access: a GPU model downloads its parameters (once, if the device is
  // newer) without marking the host copy as edited.
  const std::vector<cmseg::Param>& params =
      guard(env, [&]() -> const std::vector<cmseg::Param>& { return model.params(); });
  // Every array is copied before the first Set: a setter on Object.prototype runs there
  // and could dispose of the model under the loop.
  std::vector<std::pair<std::string, Napi::Float32Array>> arrays;
  for (auto& p : params) {
    const std::vector<float>& src = p.*field;
    Napi::Float32Array a = Napi::Float32Array::New(env, src.size());
    std::copy(src.begin(), src.end(), a.Data());
    arrays.push_back({p.name, a});
  }
  for (auto& [name, a] : arrays) out.Set(name, a);
  return out;
}

ModelWrap::Entries ModelWrap::read_named_arrays(Napi::Env env, const Napi::Value& v, const char* what) {
  cmseg::Model& model = idle(env);
  Napi::Object o = expect_object(env, v, what);
  Napi::Array names = o.GetPropertyNames();
  Entries entries;
  for (uint32_t i = 0; i < names.Length(); ++i) {
    const std::string name = names.Get(i).ToString().Utf8Value();
    cmseg::Param* p = guard(env, [&] { return model.find(name); });  // may download from the GPU
    if (!p) throw_invalid(env, std::string(what) + ": unknown parameter '" + name + "'");
    entries.push_back({p, o.Get(name)});
  }
  return entries;
}

ModelWrap::Updates ModelWrap::check_named_arrays(Napi::Env env, const Entries& entries, const char* what, Values values) {
  // The getters that read_named_arrays ran may have disposed of the model (the Param
  // pointers would point into freed memory) or started a call on it: looked up again.
  idle(env);
  Updates updates;
  for (auto& [p, value] : entries) {
    const std::string label = std::string(what) + "['" + p->name + "']";
    Napi::Float32Array a = expect_f32(env, value, label.c_str(), p->numel());
    const float* d = a.Data();
    for (int64_t k = 0; k < p->numel(); ++k) {
      if (!std::isfinite(d[k])) throw_invalid(env, label + " contains a non-finite value at index " + std::to_string(k));
      if (values == Values::FiniteNonNegative && d[k] < 0)
        throw_invalid(env, label + " contains a negative value (" + std::to_string(d[k]) + ") at index " +
                               std::to_string(k) + "; second moments are >= 0");
    }
    updates.push_back({p, a});
  }
  return updates;
}

void ModelWrap::apply_named_arrays(const Updates& updates, std::vector<float> cmseg::Param::*field) {
  for (auto& [p, a] : updates) std::copy(a.Data(), a.Data() + p->numel(), (p->*field).begin());
}

Napi::Value ModelWrap::GetWeights(const Napi::CallbackInfo& info) { return named_arrays(info.Env(), &cmseg::Param::value); }
Napi::Value ModelWrap::GetGradients(const Napi::CallbackInfo& info) { return named_arrays(info.Env(), &cmseg::Param::grad); }

// Validates everything first so a bad entry leaves the model untouched.
// The arrays are checked only once every getter of the object has run (read_named_arrays):
// a later getter could otherwise refill or transfer one checked before it.
Napi::Value ModelWrap::SetWeights(const Napi::CallbackInfo& info) {
  const Entries entries = read_named_arrays(info.Env(), info[0], "weights");
  apply_named_arrays(check_named_arrays(info.Env(), entries, "weights", Values::Finite), &cmseg::Param::value);
  return info.Env().Undefined();
}

Napi::Value ModelWrap::GetOptimizerState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::Model& model = idle(env);
  Napi::Object o = Napi::Object::New(env);
  o.Set("step", (double)model.step);
  o.Set("m", named_arrays(env, &cmseg::Param::m));
  o.Set("v", named_arrays(env, &cmseg::Param::v));
  return o;
}

Napi::Value ModelWrap::SetOptimizerState(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::Model& model = idle(env);  // read before the caller's getters run only
  Napi::Object o = expect_object(env, info[0], "optimizer state");
  check_keys(env, o, "optimizer state", {"step", "m", "v"});
  const double step = get_number(env, o, "step", (double)model.step, "optimizer state");
  if (step < 0 || step != std::floor(step) || step > 9007199254740992.0)
    throw_invalid(env, "optimizer state.step must be a non-negative integer, got " + number_text(step));
  // Both moments are checked in full before either is written (atomic, like setWeights), and
  // only once both have been read: v's getters could otherwise change m's arrays after their check.
  const Napi::Value m_v = o.Get("m"), v_v = o.Get("v");
  Entries m_in, v_in;
  if (!m_v.IsUndefined()) m_in = read_named_arrays(env, m_v, "optimizer state.m");
  if (!v_v.IsUndefined()) v_in = read_named_arrays(env, v_v, "optimizer state.v");
  const Updates m = check_named_arrays(env, m_in, "optimizer state.m", Values::Finite);
  const Updates v = check_named_arrays(env, v_in, "optimizer state.v", Values::FiniteNonNegative);
  cmseg::Model& now = idle(env);  // again, after the caller's getters (check_named_arrays says why)
  apply_named_arrays(m, &cmseg::Param::m);
  apply_named_arrays(v, &cmseg::Param::v);
  now.step = (int64_t)step;
  return env.Undefined();
}

Napi::Value ModelWrap::GetOptimizer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::OptimConfig c = live(env).optim;  // a copy: a setter on Object.prototype may run in Set
  Napi::Object o = Napi::Object::New(env);
  o.Set("kind", c.kind == cmseg::OptimKind::Adam ? "adam" : "adamw");
  o.Set("lr", c.lr);
  o.Set("beta1", c.beta1);
  o.Set("beta2", c.beta2);
  o.Set("eps", c.eps);
  o.Set("weightDecay", c.weight_decay);
  return o;
}

Napi::Value ModelWrap::SetOptimizer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::Model& model = idle(env);  // read before the caller's getters run only
  Napi::Object o = expect_object(env, info[0], "optimizer");
  check_keys(env, o, "optimizer", {"kind", "lr", "beta1", "beta2", "eps", "weightDecay"});
  cmseg::OptimConfig c = model.optim;
  const char* w = "optimizer";
  const std::string kind = get_string(env, o, "kind", c.kind == cmseg::OptimKind::Adam ? "adam" : "adamw", w);
  if (kind != "adam" && kind != "adamw") throw_invalid(env, "optimizer.kind must be 'adam' or 'adamw', got '" + kind + "'");
  c.kind = kind == "adam" ? cmseg::OptimKind::Adam : cmseg::OptimKind::AdamW;
  c.lr = get_float(env, o, "lr", c.lr, w);
  c.beta1 = get_float(env, o, "beta1", c.beta1, w);
  c.beta2 = get_float(env, o, "beta2", c.beta2, w);
  c.eps = get_float(env, o, "eps", c.eps, w);
  c.weight_decay = get_float(env, o, "weightDecay", c.weight_decay, w);
  if (!(c.lr >= 0)) throw_invalid(env, "optimizer.lr must be >= 0, got " + given_text(o, "lr", c.lr));
  for (const auto& [name, beta] : {std::pair<const char*, float>{"beta1", c.beta1}, {"beta2", c.beta2}}) {
    if (beta >= 0 && beta < 1) continue;
    // Betas are floats: 0.99999999 is below 1 as given but 1 once stored, which says nothing
    // to whoever typed it; the message names the value given and the rounding.
    const Napi::Value given = o.Get(name);
    const double typed = given.IsNumber() ? given.As<Napi::Number>().DoubleValue() : beta;
    const std::string rounds = typed >= 0 && typed < 1 && beta == 1 ? " (" + number_text(typed) + " rounds to 1 in float32, the precision betas are kept in)" : "";
    throw_invalid(env, std::string("optimizer.") + name + " must be in [0, 1), got " + number_text(typed) + rounds);
  }
  // eps keeps the update finite where a parameter's gradients have all been 0 (an absent
  // annotator's head): with eps 0 that update is 0/0 and the weights turn NaN.
  if (!(c.eps > 0)) throw_invalid(env, "optimizer.eps must be > 0, got " + given_text(o, "eps", c.eps));
  if (!(c.weight_decay >= 0)) throw_invalid(env, "optimizer.weightDecay must be >= 0, got " + given_text(o, "weightDecay", c.weight_decay));
  idle(env).optim = c;  // looked up again: a getter above may have disposed of the model
  return env.Undefined();
}

Napi::Value ModelWrap::GetLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  // Copies: a setter on Object.prototype may run in Set.
  const cmseg::LossConfig loss = live(env).loss;
  const double step = (double)live(env).step;
  Napi::Object o = Napi::Object::New(env);
  o.Set("lambda", loss.lambda);
  o.Set("lambdaWarmup", loss.lambda_warmup);
  o.Set("warmupSteps", (double)loss.warmup_steps);
  o.Set("step", step);
  return o;
}

Napi::Value ModelWrap::SetLoss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::Model& model = idle(env);  // read before the caller's getters run only
  Napi::Object o = expect_object(env, info[0], "loss");
  check_keys(env, o, "loss", {"lambda", "lambdaWarmup", "warmupSteps"});
  cmseg::LossConfig c = model.loss;
  c.lambda = get_float(env, o, "lambda", c.lambda, "loss");
  c.lambda_warmup = get_float(env, o, "lambdaWarmup", c.lambda_warmup, "loss");
  c.warmup_steps = get_int(env, o, "warmupSteps", (int)c.warmup_steps, "loss");
  if (c.warmup_steps < 0) throw_invalid(env, "loss.warmupSteps must be >= 0, got " + number_text(c.warmup_steps));
  // The warm-up's sign is the schedule's (SPEC section 4): both weights are magnitudes.
  if (c.lambda < 0) throw_invalid(env, "loss.lambda must be >= 0, got " + given_text(o, "lambda", c.lambda));
  if (c.lambda_warmup < 0)
    throw_invalid(env, "loss.lambdaWarmup must be >= 0 (the warm-up negates it itself), got " + given_text(o, "lambdaWarmup", c.lambda_warmup));
  idle(env).loss = c;  // looked up again: a getter above may have disposed of the model
  return env.Undefined();
}

Napi::Value ModelWrap::Config(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::ModelConfig c = live(env).config();  // a copy: a setter on Object.prototype may run in Set
  Napi::Object o = Napi::Object::New(env);
  o.Set("ndim", c.ndim);
  o.Set("inChannels", c.in_channels);
  o.Set("classes", c.classes);
  o.Set("annotators", c.annotators);
  o.Set("depth", c.depth);
  o.Set("baseChannels", c.base);
  o.Set("cmMode", cmseg::cm_mode_name(c.cm_mode));
  o.Set("cmRank", c.cm_rank);
  o.Set("cmHeadBlocks", c.cm_head_blocks);
  o.Set("cmInit", c.cm_init == cmseg::CmInit::Identity ? "identity" : "uniform");
  o.Set("seed", (double)c.seed);
  o.Set("device", c.device == cmseg::Device::Cuda ? "cuda" : "cpu");  // 'auto' resolved
  o.Set("tf32", c.tf32);
  o.Set("bf16", c.bf16);
  o.Set("gpuMemoryLimitMB", c.gpu_memory_limit / 1048576.0);
  return o;
}

// Device memory of a GPU model (its context's stream-ordered pool); for a CPU
// model only the device name (the process's RSS is Node's to report).
Napi::Value ModelWrap::Memory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cmseg::Model& model = live(env);
  if (busy_) throw_invalid(env, "model is busy with an earlier trainStep/predict: await it before calling memory()");
  cmseg::cuda::ModelGpu* gpu = model.gpu();
  cmseg::cuda::PoolStats st{};
  if (gpu) {
    try {  // read before any Set: a setter on Object.prototype could dispose of the model
      st = gpu->context().pool_stats();
    } catch (const std::exception& e) {
      throw_invalid(env, std::string("memory(): ") + e.what());
    }
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("device", gpu ? "cuda" : "cpu");
  if (!gpu) return o;
  const double mb = 1024.0 * 1024.0;
  o.Set("inUseMB", st.in_use_bytes / mb);
  o.Set("peakInUseMB", st.peak_in_use_bytes / mb);
  o.Set("reservedMB", st.reserved_bytes / mb);
  return o;
}

// GPU model: the pool's peak starts again from what is in use now. CPU model: nothing to reset.
Napi::Value ModelWrap::ResetPeakMemory(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cmseg::Model& model = live(env);
  if (busy_) throw_invalid(env, "model is busy with an earlier trainStep/predict: await it before calling resetPeakMemory()");
  if (cmseg::cuda::ModelGpu* gpu = model.gpu()) {
    try {
      gpu->context().reset_peak();
    } catch (const std::exception& e) {
      throw_invalid(env, std::string("resetPeakMemory(): ") + e.what());
    }
  }
  return env.Undefined();
}

}  // namespace cmseg_js
