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

  void check_idle(Napi::Env env) const;
  Napi::Value named_arrays(Napi::Env env, std::vector<float> cmseg::Param::*field);
  void set_named_arrays(Napi::Env env, const Napi::Value& v, std::vector<float> cmseg::Param::*field, const char* what);

  std::unique_ptr<cmseg::Model> model_;
  bool busy_ = false;
};

}  // namespace cmseg_js
