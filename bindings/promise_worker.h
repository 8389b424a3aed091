// A Promise-returning Napi::AsyncWorker shared by the wrap files.
#pragma once
#include <napi.h>

#include <functional>
#include <vector>

#include "args.h"
#include "cmseg/threads.hpp"

namespace cmseg_js {

// A Promise-returning worker: `work` runs off the main thread, `result`
// builds the resolved value on it. Keeps every referenced JS object alive.
// `busy` (may be null) is cleared when the work settles.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  PromiseWorker(Napi::Env env, bool* busy, std::function<void()> work, std::function<Napi::Value(Napi::Env)> result)
      : Napi::AsyncWorker(env, "cmseg"), deferred_(Napi::Promise::Deferred::New(env)), busy_(busy),
        work_(std::move(work)), result_(std::move(result)) {
    cmseg::begin_pool_call();  // setNumThreads is refused until this call is done (cmseg/threads.hpp)
  }
  ~PromiseWorker() override { cmseg::end_pool_call(); }

  void keep(const Napi::Value& v) { refs_.push_back(Napi::Persistent(v.As<Napi::Object>())); }
  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override {
    try {
      work_();
    } catch (...) {
      const std::exception_ptr e = std::current_exception();
      if (const char* code = exception_code(e)) code_ = code;
      SetError(describe_exception(e));
    }
  }
  // Neither may throw: in a worker thread being terminated the call completes during the
  // thread's teardown, where no JS can run and every napi call fails; an exception out of
  // here would then be rethrown by node-addon-api where nothing catches it, and
  // std::terminate would abort the whole process. There is nobody left to settle for.
  void OnOK() override {
    if (busy_) *busy_ = false;
    Napi::Env env = Env();
    try {
      try {
        deferred_.Resolve(result_(env));
      } catch (const Napi::Error& e) {
        deferred_.Reject(e.Value());
      } catch (...) {  // std::bad_alloc building the result: a rejection, not std::terminate
        const std::exception_ptr ex = std::current_exception();
        const char* code = exception_code(ex);
        Napi::Error err = Napi::Error::New(env, describe_exception(ex));
        err.Set("code", Napi::String::New(env, code ? code : code_));
        deferred_.Reject(err.Value());
      }
    } catch (...) {
    }
  }
  void OnError(const Napi::Error& e) override {
    if (busy_) *busy_ = false;
    try {
      Napi::Error err = Napi::Error::New(Env(), e.Message());
      err.Set("code", Napi::String::New(Env(), code_));
      deferred_.Reject(err.Value());
    } catch (...) {
    }
  }

 private:
  Napi::Promise::Deferred deferred_;
  bool* busy_;
  std::function<void()> work_;
  std::function<Napi::Value(Napi::Env)> result_;
  std::vector<Napi::ObjectReference> refs_;
  const char* code_ = "CMSEG_NATIVE_ERROR";
};

}  // namespace cmseg_js
