// fuse(maps, options): label fusion baselines (mean, majority vote, STAPLE,
// multi-label STAPLE, spatial STAPLE) on one image or volume, off the main
// thread. Maps are copied (FusionJob::held says why); results come back as typed arrays.
#include "fusion_wrap.h"

#include <memory>

#include "args.h"
#include "cmseg/fusion.hpp"
#include "promise_worker.h"

namespace cmseg_js {
namespace {

template <class T>
Napi::TypedArrayOf<T> to_array(Napi::Env env, const std::vector<T>& v) {
  auto a = Napi::TypedArrayOf<T>::New(env, v.size());
  std::copy(v.begin(), v.end(), a.Data());
  return a;
}

Napi::Float64Array to_f64(Napi::Env env, const std::vector<double>& v) {
  auto a = Napi::Float64Array::New(env, v.size());
  std::copy(v.begin(), v.end(), a.Data());
  return a;
}

struct FusionJob {
  std::string method;
  cmseg::FusionInput input;
  // Copies of the raters' maps that input.raters points into. A map's buffer may be
  // transferred (postMessage, structuredClone) while the worker thread reads it, and its
  // memory freed with its new owner: a segfault. A map is one byte a voxel, against the
  // several floats a voxel that every method but the majority vote allocates itself.
  std::vector<std::vector<uint8_t>> held;
  int undecided = -1;
  cmseg::StapleOptions staple;
  cmseg::MultiLabelStapleOptions multi;
  cmseg::SpatialStapleOptions spatial;
  // results
  std::vector<float> probs;
  std::vector<uint8_t> labels;
  cmseg::StapleResult staple_result;
  cmseg::MultiLabelStapleResult multi_result;
  cmseg::SpatialStapleResult spatial_result;

  void run() {
    if (method == "mean")
      probs = cmseg::fuse_mean(input);
    else if (method == "mode")
      labels = cmseg::fuse_mode(input, undecided);
    else if (method == "staple")
      staple_result = cmseg::staple(input, staple);
    else if (method == "multi-staple")
      multi_result = cmseg::multi_label_staple(input, multi);
    else
      spatial_result = cmseg::spatial_staple(input, spatial);
  }

  Napi::Value result(Napi::Env env) const {
    Napi::Object o = Napi::Object::New(env);
    o.Set("method", method);
    if (method == "mean") {
      o.Set("probs", to_array(env, probs));
    } else if (method == "mode") {
      o.Set("labels", to_array(env, labels));
    } else if (method == "staple") {
      const auto& r = staple_result;
      o.Set("labels", to_array(env, r.labels));
      o.Set("posterior", to_array(env, r.posterior));
      o.Set("sensitivity", to_f64(env, r.sensitivity));
      o.Set("specificity", to_f64(env, r.specificity));
      o.Set("prior", r.prior);
      o.Set("iterations", r.iterations);
      o.Set("converged", r.converged);
    } else if (method == "multi-staple") {
      const auto& r = multi_result;
      o.Set("labels", to_array(env, r.labels));
      o.Set("posterior", to_array(env, r.posterior));
      o.Set("cms", to_f64(env, r.cm));
      o.Set("prior", to_f64(env, r.prior));
      o.Set("iterations", r.iterations);
      o.Set("converged", r.converged);
    } else {
      const auto& r = spatial_result;
      o.Set("labels", to_array(env, r.labels));
      o.Set("posterior", to_array(env, r.posterior));
      Napi::Array grid = Napi::Array::New(env, r.grid.size());
      for (size_t i = 0; i < r.grid.size(); ++i) grid.Set((uint32_t)i, (double)r.grid[i]);
      o.Set("grid", grid);
      o.Set("localCms", to_array(env, r.local_cm));
      o.Set("cms", to_f64(env, r.global_cm));
      o.Set("prior", to_f64(env, r.prior));
      o.Set("iterations", r.iterations);
      o.Set("converged", r.converged);
    }
    return o;
  }
};

// Binary STAPLE reads one label as foreground and every other as background. On
// multi-label maps (classes > 2) the default label 1 would silently drop the other
// classes, so there the caller must name the foreground; other methods never read it.
void check_foreground(Napi::Env env, const Napi::Object& o, const std::string& method, int classes) {
  const bool given = !o.Get("foreground").IsUndefined();
  if (given && method != "staple")
    throw_invalid(env, "fuse options.foreground is for method 'staple' (binary STAPLE); '" + method +
                           "' fuses every class");
  if (!given && method == "staple" && classes > 2)
    throw_invalid(env, "fuse (staple): binary STAPLE with classes = " + std::to_string(classes) +
                           ": pass options.foreground (that label is foreground, every other label background) "
                           "or use method 'multi-staple'");
}

}  // namespace

Napi::Value Fuse(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray()) throw_invalid(env, "fuse: the first argument must be an array of Uint8Array label maps (null for an absent rater)");
  Napi::Array maps = info[0].As<Napi::Array>();
  Napi::Object o = expect_object(env, info[1], "fuse options");
  check_keys(env, o, "fuse options",
             {"method", "classes", "shape", "undecided", "threshold", "maxIterations", "prior", "foreground", "window",
              "stride", "priorWeight"});
  auto job = std::make_shared<FusionJob>();
  job->method = get_string(env, o, "method", "", "fuse options");
  const std::string& m = job->method;
  if (m != "mean" && m != "mode" && m != "staple" && m != "multi-staple" && m != "spatial-staple")
    throw_invalid(env, "fuse: unknown method '" + m + "' (expected mean, mode, staple, multi-staple or spatial-staple)");
  job->input.L = get_int(env, o, "classes", 2, "fuse options");
  job->held.reserve(maps.Length());  // no reallocation: input.raters point into the copies
  int64_t V = -1;
  for (uint32_t r = 0; r < maps.Length(); ++r) {
    Napi::Value v = maps.Get(r);
    if (v.IsNull() || v.IsUndefined()) {
      job->input.raters.push_back(nullptr);
      continue;
    }
    const std::string what = "fuse: maps[" + std::to_string(r) + "]";
    Napi::Uint8Array a = expect_u8(env, v, what.c_str(), V);
    V = (int64_t)a.ElementLength();
    job->held.emplace_back();
    guard(env, [&] { job->held.back().assign(a.Data(), a.Data() + a.ElementLength()); });
    job->input.raters.push_back(job->held.back().data());
  }
  if (V < 0) throw_invalid(env, "fuse: no rater map given (every entry is null)");
  // (An empty copy's data() may be null, which the core reads as an absent rater.)
  if (V == 0) throw_invalid(env, "fuse: the maps are empty (0 voxels): nothing to fuse");
  job->input.V = V;
  if (!o.Get("shape").IsUndefined()) job->input.extent = expect_int_array(env, o.Get("shape"), "fuse options.shape");
  // The core's own message speaks of its `extent` field; a JS caller passes `shape`.
  if (m == "spatial-staple" && job->input.extent.empty())
    throw_invalid(env, "fuse (spatial-staple): pass options.shape, the image's [H, W] or the volume's [D, H, W] (" +
                           std::to_string(V) + " voxels in all): the local CMs are estimated on windows of it");
  const double threshold = get_number(env, o, "threshold", 1e-5, "fuse options");
  const int undecided = get_int(env, o, "undecided", -1, "fuse options");
  job->undecided = undecided;
  job->staple.threshold = job->multi.threshold = job->spatial.threshold = threshold;
  check_foreground(env, o, m, job->input.L);
  job->staple.foreground = get_int(env, o, "foreground", 1, "fuse options");
  job->multi.undecided = job->spatial.undecided = undecided;
  if (!o.Get("maxIterations").IsUndefined()) {
    const int it = get_int(env, o, "maxIterations", 0, "fuse options");
    job->staple.max_iterations = job->multi.max_iterations = job->spatial.max_iterations = it;
  }
  Napi::Value prior = o.Get("prior");
  if (prior.IsNumber()) {
    job->staple.prior = prior.As<Napi::Number>().DoubleValue();
  } else if (prior.IsArray()) {
    Napi::Array a = prior.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); ++i) {
      if (!a.Get(i).IsNumber()) throw_invalid(env, "fuse options.prior must be a number (staple) or an array of numbers");
      job->multi.prior.push_back(a.Get(i).As<Napi::Number>().DoubleValue());
    }
    job->spatial.prior = job->multi.prior;
  } else if (!prior.IsUndefined()) {
    throw_invalid(env, "fuse options.prior must be a number (staple) or an array of numbers");
  }
  job->spatial.window = get_int(env, o, "window", job->spatial.window, "fuse options");
  job->spatial.stride = get_int(env, o, "stride", job->spatial.stride, "fuse options");
  job->spatial.prior_weight = get_number(env, o, "priorWeight", job->spatial.prior_weight, "fuse options");
  // Input errors (labels out of range, sizes) surface synchronously, before any work.
  guard(env, [&] { cmseg::validate_fusion_input(job->input, ("fuse (" + m + ")").c_str()); });

  auto* w = new PromiseWorker(env, nullptr, [job] { job->run(); }, [job](Napi::Env e) { return job->result(e); });
  w->Queue();
  return w->promise();
}

}  // namespace cmseg_js
