// Addon entry point: registers the exported classes and functions.
#include <napi.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>

#include "args.h"
#include "cmseg/backend.hpp"
#include "cmseg/peak.hpp"
#include "cmseg/threads.hpp"
#include "fusion_wrap.h"
#include "model_wrap.h"
#include "stitch_wrap.h"

namespace cmseg_js {
namespace {

Napi::Value BackendInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const cmseg::BackendInfo b = cmseg::backend_info();
  Napi::Object o = Napi::Object::New(env);
  o.Set("cpu", b.cpu);
  o.Set("onednn", b.onednn);
  o.Set("cuda", b.cuda);
  o.Set("cudnn", b.cudnn);
  o.Set("threads", b.threads);
  o.Set("defaultThreads", b.default_threads);
  o.Set("threadsReason", b.threads_reason);
  o.Set("usableCpus", b.usable_cpus);
  o.Set("gpuAvailable", b.gpu_available);
  o.Set("gpu", b.gpu.empty() ? env.Null() : Napi::String::New(env, b.gpu));
  o.Set("cudnnVersion", (double)b.cudnn_version);
  if (!b.gpu_unavailable_reason.empty()) o.Set("gpuUnavailableReason", b.gpu_unavailable_reason);
  o.Set("cudaTraining", b.cuda_training);
  // Precision modes a 'cuda' model offers: strict fp32 (tf32: false), TF32
  // convolutions (the default) and bf16 convolutions with fp32 accumulation (bf16: true).
  Napi::Array precisions = Napi::Array::New(env);
  if (b.cuda_training) {
    precisions.Set(0u, "fp32");
    precisions.Set(1u, "tf32");
    precisions.Set(2u, "bf16");
  }
  o.Set("gpuPrecisions", precisions);
  o.Set("simd", b.simd);
  o.Set("compiler", b.compiler);
  return o;
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string range = "an integer in 1.." + std::to_string(cmseg::kMaxThreads);
  if (!info[0].IsNumber()) throw_invalid(env, "setNumThreads expects " + range);
  const double d = info[0].As<Napi::Number>().DoubleValue();
  if (!(d >= 1 && d <= cmseg::kMaxThreads && d == std::floor(d)))
    throw_invalid(env, "setNumThreads expects " + range + ", got " + number_text(d));
  // May start fewer when the system refuses threads: see backendInfo().threads.
  if (const int running = cmseg::try_set_num_threads((int)d))
    throw_invalid(env, "setNumThreads: " + std::to_string(running) +
                           " native call(s) (trainStep, predict, fuse, ...) still running; await them first");
  return env.Undefined();
}

// Synchronous on purpose: it must not share the cores with other work while it runs.
Napi::Value MeasurePeakGflops(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const double seconds = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : 0.5;
  if (!(seconds > 0 && seconds <= 30)) throw_invalid(env, "measurePeakGflops expects seconds in (0, 30]");
  return Napi::Number::New(env, cmseg::measure_peak_gflops(seconds));
}

// Names claimed for the whole process. Every worker thread that loads the addon shares
// this library's statics, so src/data/files.ts records its lock files here: a lock file
// holds a pid, which cannot tell two threads of one process apart.
std::mutex claims_mutex;
std::set<std::string> claims;

// processClaim(name, take): take true claims `name`, false if it was claimed already;
// take false gives it up, false if it was not claimed.
Napi::Value ProcessClaim(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsString() || !info[1].IsBoolean()) throw_invalid(env, "processClaim expects (name: string, take: boolean)");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  std::lock_guard<std::mutex> lock(claims_mutex);
  const bool changed = info[1].As<Napi::Boolean>().Value() ? claims.insert(name).second : claims.erase(name) > 0;
  return Napi::Boolean::New(env, changed);
}

// exitNow(code): ends the process at once with `code`. process.exit() first waits for the
// native calls running on libuv's worker threads (a 3D step: seconds), which a second Ctrl-C
// promised not to do. The caller runs the 'exit' listeners first (src/cli/common.ts quitNow);
// stdout and stderr are synchronous on Linux pipes, files and terminals, so nothing is lost.
Napi::Value ExitNow(const Napi::CallbackInfo& info) {
  const int code = info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 1;
  std::fflush(nullptr);
  std::_Exit(code);
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NativeModel", ModelWrap::Define(env));
  exports.Set("fuse", Napi::Function::New(env, Fuse));
  exports.Set("stitchWindow", Napi::Function::New(env, StitchWindow));
  exports.Set("divideByWeights", Napi::Function::New(env, DivideByWeights));
  exports.Set("backendInfo", Napi::Function::New(env, BackendInfo));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads));
  exports.Set("measurePeakGflops", Napi::Function::New(env, MeasurePeakGflops));
  exports.Set("processClaim", Napi::Function::New(env, ProcessClaim));
  exports.Set("exitNow", Napi::Function::New(env, ExitNow));
  return exports;
}

}  // namespace cmseg_js

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return cmseg_js::Init(env, exports); }

NODE_API_MODULE(cmseg, InitAddon)
