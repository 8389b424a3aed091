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

// The most elements one typed array holds in Node 18-20 (v8::TypedArray::kMaxLength); V8
// aborts the process instead of throwing past it (model_wrap.cc checks its outputs alike).
constexpr double kMaxTypedArrayLength = 4294967296.0;

// Hands a result vector to JS without a copy: an external ArrayBuffer owns the vector's
// memory. A copy needed as much again at the end of the call, from V8's allocator, which
// aborts the process ("v8::ArrayBuffer::New Allocation failed") where the core's own buffer
// had fit: a 255-class mean of a 256^3 volume is 17 GB. Runtimes that forbid external
// buffers (Electron's sandbox) get a copy.
template <class T>
Napi::TypedArrayOf<T> to_array(Napi::Env env, std::vector<T>& v, const char* name) {
  if ((double)v.size() > kMaxTypedArrayLength)  // a backstop: the sizes known up front are checked in Fuse
    throw_error(env, std::string("fuse: the output ") + name + " has " + std::to_string(v.size()) +
                         " elements, more than one typed array can hold (2^32)", "CMSEG_OUT_OF_MEMORY");
  const size_t n = v.size();
  if (n == 0) return Napi::TypedArrayOf<T>::New(env, 0);
  auto* owned = new std::vector<T>(std::move(v));
  try {
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(
        env, owned->data(), n * sizeof(T), [](Napi::Env, void*, std::vector<T>* h) { delete h; }, owned);
    return Napi::TypedArrayOf<T>::New(env, n, ab, 0);
  } catch (const Napi::Error&) {
  }
  std::unique_ptr<std::vector<T>> copy_from(owned);
  auto a = Napi::TypedArrayOf<T>::New(env, n);
  std::copy(copy_from->begin(), copy_from->end(), a.Data());
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

  // Moves the result vectors into the arrays it returns (called once).
  Napi::Value result(Napi::Env env) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("method", method);
    if (method == "mean") {
      o.Set("probs", to_array(env, probs, "probs"));
    } else if (method == "mode") {
      o.Set("labels", to_array(env, labels, "labels"));
    } else if (method == "staple") {
      auto& r = staple_result;
      o.Set("labels", to_array(env, r.labels, "labels"));
      o.Set("posterior", to_array(env, r.posterior, "posterior"));
      o.Set("sensitivity", to_f64(env, r.sensitivity));
      o.Set("specificity", to_f64(env, r.specificity));
      o.Set("prior", r.prior);
      o.Set("iterations", r.iterations);
      o.Set("converged", r.converged);
    } else if (method == "multi-staple") {
      auto& r = multi_result;
      o.Set("labels", to_array(env, r.labels, "labels"));
      o.Set("posterior", to_array(env, r.posterior, "posterior"));
      o.Set("cms", to_f64(env, r.cm));
      o.Set("prior", to_f64(env, r.prior));
      o.Set("iterations", r.iterations);
      o.Set("converged", r.converged);
    } else {
      auto& r = spatial_result;
      o.Set("labels", to_array(env, r.labels, "labels"));
      o.Set("posterior", to_array(env, r.posterior, "posterior"));
      Napi::Array grid = Napi::Array::New(env, r.grid.size());
      for (size_t i = 0; i < r.grid.size(); ++i) grid.Set((uint32_t)i, (double)r.grid[i]);
      o.Set("grid", grid);
      o.Set("localCms", to_array(env, r.local_cm, "localCms"));
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
  if (!info[0].IsArray())
    throw_invalid(env, "fuse: the first argument must be an array of Uint8Array label maps (null for an absent rater)" +
                           proxy_hint(env, info[0]));
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
  // A sparse array's length can be up to 2^32 - 1 ([] with maps[2 ** 31] set): reserving a
  // copy per entry then threw std::bad_alloc outside any handler (std::terminate, an abort
  // of the process), and walking its holes takes minutes. No study has a million raters.
  constexpr uint32_t kMaxRaters = 1u << 20;
  if (maps.Length() > kMaxRaters)
    throw_invalid(env, "fuse: maps has " + std::to_string(maps.Length()) + " entries, more than the " +
                           std::to_string(kMaxRaters) + " raters supported");
  // No reallocation: input.raters point into the copies.
  guard(env, [&] { job->held.reserve(maps.Length()); });
  int64_t V = -1;
  for (uint32_t r = 0; r < maps.Length(); ++r) {
    Napi::Value v = maps.Get(r);
    if (v.IsNull() || v.IsUndefined()) {
      guard(env, [&] { job->input.raters.push_back(nullptr); });
      continue;
    }
    const std::string what = "fuse: maps[" + std::to_string(r) + "]";
    Napi::Uint8Array a = expect_u8(env, v, what.c_str(), V);
    V = (int64_t)a.ElementLength();
    job->held.emplace_back();
    guard(env, [&] {
      job->held.back().assign(a.Data(), a.Data() + a.ElementLength());
      job->input.raters.push_back(job->held.back().data());
    });
  }
  if (V < 0) throw_invalid(env, "fuse: no rater map given (every entry is null)");
  // (An empty copy's data() may be null, which the core reads as an absent rater.)
  if (V == 0) throw_invalid(env, "fuse: the maps are empty (0 voxels): nothing to fuse");
  job->input.V = V;
  if (!o.Get("shape").IsUndefined()) job->input.extent = expect_int_array(env, o.Get("shape"), "fuse options.shape", 3);
  // The core multiplies the extent in int64, which three entries near 2^31 overflow: a shape
  // of [1073807362, 2147352580, 8] wrapped to 64 voxels and was taken for maps of 64. Checked
  // here in double: exact up to 2^53, and past it above any V a typed array can hold.
  {
    double voxels = 1;
    for (int64_t e : job->input.extent) voxels *= (double)e;
    if (!job->input.extent.empty() && voxels > 0 && voxels != (double)V)
      throw_invalid(env, "fuse (" + m + "): options.shape holds " + number_text(voxels) + " voxels but the maps have " +
                             std::to_string(V));
  }
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
  // Binary STAPLE reads a number (the foreground prior), the multi-label methods an array
  // (the class prior): the other kind, or a prior for mean / mode, was ignored silently.
  if (!prior.IsUndefined()) {
    const bool multi = m == "multi-staple" || m == "spatial-staple";
    if (m == "mean" || m == "mode")
      throw_invalid(env, "fuse options.prior is for the STAPLE methods; '" + m + "' has no prior");
    if (m == "staple" && prior.IsArray())
      throw_invalid(env, "fuse options.prior: binary STAPLE takes one number, the foreground prior (an array of "
                         "class priors is for 'multi-staple' and 'spatial-staple')");
    if (multi && prior.IsNumber())
      throw_invalid(env, "fuse options.prior: '" + m + "' takes an array of class priors, one per class (a number "
                         "is binary STAPLE's foreground prior)");
  }
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
  // Outputs of classes x voxels floats (mean's probs, the multi-label posteriors) must fit one
  // typed array: refused before the work rather than after it (to_array).
  const double class_maps = (double)job->input.L * (double)V;
  if (m != "mode" && m != "staple" && class_maps > kMaxTypedArrayLength)
    throw_error(env,
                "fuse (" + m + "): the output " + (m == "mean" ? "probs" : "posterior") + " would have " +
                    std::to_string((int64_t)class_maps) + " elements (" + std::to_string(job->input.L) + " classes x " +
                    std::to_string(V) + " voxels), more than one Float32Array can hold (2^32); fuse fewer voxels at a time",
                "CMSEG_OUT_OF_MEMORY");

  auto* w = new PromiseWorker(env, nullptr, [job] { job->run(); }, [job](Napi::Env e) { return job->result(e); });
  w->Queue();
  return w->promise();
}

}  // namespace cmseg_js
