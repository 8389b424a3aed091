// fuse(): label fusion from JS (see fusion_wrap.cc).
#pragma once
#include <napi.h>

namespace cmseg_js {
Napi::Value Fuse(const Napi::CallbackInfo& info);
}
