// stitchWindow(sum, volume, values, offset, weights, patch, channels, from, to, origin): adds
// one window's outputs (values[offset ...], a batch's array read in place: no view made per
// window) times its importance weights into the whole-volume sums
// (cmseg::stitch_window; src/model/sliding-window.ts calls it). Synchronous: a batch's
// stitching is milliseconds, and the caller's next step needs the sums. Every range is
// checked here, before native code writes into `sum`.
#include "stitch_wrap.h"

#include <string>
#include <vector>

#include "args.h"
#include "cmseg/stitch.hpp"

namespace cmseg_js {
namespace {

// Three sizes, each in 1..2^31-1.
std::vector<int64_t> expect_dims(Napi::Env env, const Napi::Value& v, const char* what) {
  std::vector<int64_t> d = expect_int_array(env, v, what, 3);
  if (d.size() != 3 || d[0] < 1 || d[1] < 1 || d[2] < 1) throw_invalid(env, std::string(what) + " must be 3 sizes >= 1 ([d, h, w])");
  return d;
}

// Three integers of any sign (window origins may lie before the volume when it is padded).
std::vector<int64_t> expect_triple(Napi::Env env, const Napi::Value& v, const char* what) {
  if (!v.IsArray() || v.As<Napi::Array>().Length() != 3) throw_invalid(env, std::string(what) + " must be an array of 3 integers");
  std::vector<int64_t> out;
  for (uint32_t i = 0; i < 3; i++) {
    Napi::Value e = v.As<Napi::Array>().Get(i);
    const double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : 0.5;
    if (!(d == (double)(int64_t)d) || d < -2147483648.0 || d > 2147483647.0)
      throw_invalid(env, std::string(what) + "[" + std::to_string(i) + "] must be an integer");
    out.push_back((int64_t)d);
  }
  return out;
}

// A channel count, 1..2^31-1.
int64_t expect_channels(Napi::Env env, const Napi::Value& v) {
  const double ch = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : 0;
  if (!(ch >= 1 && ch <= 2147483647.0 && ch == (double)(int64_t)ch)) throw_invalid(env, "channels must be an integer >= 1");
  return (int64_t)ch;
}

}  // namespace

Napi::Value StitchWindow(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 10) throw_invalid(env, "stitchWindow expects (sum, volume, values, offset, weights, patch, channels, from, to, origin)");
  const std::vector<int64_t> volume = expect_dims(env, info[1], "volume");
  const std::vector<int64_t> patch = expect_dims(env, info[5], "patch");
  const int64_t channels = expect_channels(env, info[6]);
  const double ch = (double)channels;
  // Products in double first: three sizes of up to 2^31 would overflow int64.
  const double V = (double)volume[0] * volume[1] * volume[2], Pv = (double)patch[0] * patch[1] * patch[2];
  if (V * ch > 9007199254740991.0 || Pv * ch > 9007199254740991.0) throw_invalid(env, "stitchWindow: sizes too large");
  const Napi::Float32Array values = expect_f32(env, info[2], "values");
  const double offset = info[3].IsNumber() ? info[3].As<Napi::Number>().DoubleValue() : -1;
  if (!(offset >= 0 && offset == (double)(int64_t)offset && offset + Pv * ch <= (double)values.ElementLength()))
    throw_invalid(env, "values has " + std::to_string(values.ElementLength()) + " elements: a window's " +
                           std::to_string((int64_t)(Pv * ch)) + " from offset " + number_text(offset) + " do not fit");
  const Napi::Float64Array weights = expect_f64(env, info[4], "weights", (int64_t)Pv);
  const std::vector<int64_t> from = expect_triple(env, info[7], "from"), to = expect_triple(env, info[8], "to"),
                             origin = expect_triple(env, info[9], "origin");
  cmseg::WindowPlacement at;
  for (int a = 0; a < 3; a++) {
    // Window-local [from, to) inside the patch, and its volume coordinates inside the volume.
    if (!(0 <= from[a] && from[a] <= to[a] && to[a] <= patch[a] && origin[a] + from[a] >= 0 && origin[a] + to[a] <= volume[a]))
      throw_invalid(env, "stitchWindow: axis " + std::to_string(a) + ": voxels [" + std::to_string(from[a]) + ", " +
                             std::to_string(to[a]) + ") of a " + std::to_string(patch[a]) + "-voxel window at " +
                             std::to_string(origin[a]) + " leave the patch or the " + std::to_string(volume[a]) + "-voxel volume");
    at.from[a] = from[a], at.to[a] = to[a], at.origin[a] = origin[a];
  }
  const int64_t sum_length = (int64_t)(V * ch);
  if (info[0].IsTypedArray() && info[0].As<Napi::TypedArray>().TypedArrayType() == napi_float64_array) {
    Napi::Float64Array sum = expect_f64(env, info[0], "sum", sum_length);
    guard(env, [&] { cmseg::stitch_window(sum.Data(), volume.data(), values.Data() + (int64_t)offset, weights.Data(), patch.data(), channels, at); });
  } else {
    Napi::Float32Array sum = expect_f32(env, info[0], "sum (a Float32Array or Float64Array)", sum_length);
    guard(env, [&] { cmseg::stitch_window(sum.Data(), volume.data(), values.Data() + (int64_t)offset, weights.Data(), patch.data(), channels, at); });
  }
  return env.Undefined();
}

// divideByWeights(sum, weightSum, channels, mean): the weighted means, mean[k*V + v] =
// sum[k*V + v] / weightSum[v] (cmseg::divide_by_weights), V = weightSum's length; `mean` is a
// Float32Array, `sum` itself when that is one (divided in place), or a Float64Array.
Napi::Value DivideByWeights(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 4) throw_invalid(env, "divideByWeights expects (sum, weightSum, channels, mean)");
  const Napi::Float64Array weights = expect_f64(env, info[1], "weightSum");
  const int64_t V = (int64_t)weights.ElementLength(), channels = expect_channels(env, info[2]);
  if ((double)V * (double)channels > 9007199254740991.0) throw_invalid(env, "divideByWeights: sizes too large");
  const int64_t length = V * channels;
  Napi::Float32Array mean = expect_f32(env, info[3], "mean", length);
  // The means are written in parallel chunks while the sums and weights are read: a mean in
  // memory either of them holds (other than a Float32 sum itself, divided in place) read
  // means as sums or weights, wrong numbers without a word.
  if (shares_memory(weights, mean)) throw_invalid(env, "divideByWeights: mean overlaps weightSum");
  if (info[0].IsTypedArray() && info[0].As<Napi::TypedArray>().TypedArrayType() == napi_float64_array) {
    Napi::Float64Array sum = expect_f64(env, info[0], "sum", length);
    if (shares_memory(sum, mean)) throw_invalid(env, "divideByWeights: mean overlaps sum (a Float64 sum is divided into memory of its own)");
    guard(env, [&] { cmseg::divide_by_weights(sum.Data(), weights.Data(), channels, V, mean.Data()); });
  } else {
    Napi::Float32Array sum = expect_f32(env, info[0], "sum (a Float32Array or Float64Array)", length);
    // In place, or into memory of its own: a partial overlap would read means as sums.
    if (sum.Data() != mean.Data() && shares_memory(sum, mean))
      throw_invalid(env, "divideByWeights: mean overlaps sum without being it");
    guard(env, [&] { cmseg::divide_by_weights(sum.Data(), weights.Data(), channels, V, mean.Data()); });
  }
  return env.Undefined();
}

}  // namespace cmseg_js
