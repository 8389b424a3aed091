// stitchWindow(), divideByWeights(): sliding-window stitching from JS (see stitch_wrap.cc).
#pragma once
#include <napi.h>

namespace cmseg_js {
Napi::Value StitchWindow(const Napi::CallbackInfo& info);
Napi::Value DivideByWeights(const Napi::CallbackInfo& info);
}
