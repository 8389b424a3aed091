// JS class NativeModel wrapping cmseg::Model (see model_wrap.cc).
#pragma once
#include <napi.h>

#include <memory>
#include <vector>

#include "cmseg/model.hpp"

namespace cmseg_js {

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env);
  explicit ModelWrap(const Napi::CallbackInfo& info);
  ~ModelWrap() override;

 private:
  enum class Mode { Train, Gradients, Evaluate };
  Napi::Value RunBatch(const Napi::CallbackInfo& info, Mode mode);
  Napi::Value TrainStep(const Napi::CallbackInfo& info);
  Napi::Value ComputeGradients(const Napi::CallbackInfo& info);
  Napi::Value Evaluate(const Napi::CallbackInfo& info);
  Napi::Value Predict(const Napi::CallbackInfo& info);
  Napi::Value Parameters(const Napi::CallbackInfo& info);
  Napi::Value GetWeights(const Napi::CallbackInfo& info);
  Napi::Value GetGradients(const Napi::CallbackInfo& info);
  Napi::Value SetWeights(const Napi::CallbackInfo& info);
  Napi::Value GetOptimizerState(const Napi::CallbackInfo& info);
  Napi::Value SetOptimizerState(const Napi::CallbackInfo& info);
  Napi::Value GetOptimizer(const Napi::CallbackInfo& info);
  Napi::Value SetOptimizer(const Napi::CallbackInfo& info);
  Napi::Value GetLoss(const Napi::CallbackInfo& info);
  Napi::Value SetLoss(const Napi::CallbackInfo& info);
  Napi::Value Config(const Napi::CallbackInfo& info);
  Napi::Value Memory(const Napi::CallbackInfo& info);
  Napi::Value ResetPeakMemory(const Napi::CallbackInfo& info);
  Napi::Value ReleaseBuffers(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);

  // The live model; throws "this model was disposed" after dispose().
  cmseg::Model& live(Napi::Env env) const;
  // live(), and throws "model is busy ..." while an async call runs on it.
  cmseg::Model& idle(Napi::Env env) const;
  Napi::Value named_arrays(Napi::Env env, std::vector<float> cmseg::Param::*field);
  // What a value check accepts in set_named_arrays: finite, or finite and >= 0.
  enum class Values { Finite, FiniteNonNegative };
  using Entries = std::vector<std::pair<cmseg::Param*, Napi::Value>>;
  using Updates = std::vector<std::pair<cmseg::Param*, Napi::Float32Array>>;
  // Reads an object of arrays by parameter name (names checked; the caller's getters run here).
  Entries read_named_arrays(Napi::Env env, const Napi::Value& v, const char* what);
  // Validates every entry (types, lengths, values) without changing the model; runs no caller code.
  Updates check_named_arrays(Napi::Env env, const Entries& entries, const char* what, Values values);
  static void apply_named_arrays(const Updates& updates, std::vector<float> cmseg::Param::*field);
  void release_model();
  // Reports to V8 the host memory a call on n images of size s leaves in the model's
  // activation buffers (ModelWrap::report_workspace says why).
  void report_workspace(const cmseg::Model& model, int n, cmseg::Spatial s, bool backward, bool heads);

  std::unique_ptr<cmseg::Model> model_;
  bool busy_ = false;
  napi_env env_ = nullptr;
  int64_t external_bytes_ = 0;  // host memory reported to V8 (AdjustExternalMemory)
  int64_t workspace_bytes_ = 0;  // the part of it that is activation buffers (report_workspace)
};

}  // namespace cmseg_js
