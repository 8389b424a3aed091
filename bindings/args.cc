#include "args.h"

#include <cfloat>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <new>

#include "cmseg/error.hpp"

namespace cmseg_js {

void throw_error(Napi::Env env, const std::string& message, const char* code) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  throw err;
}

void throw_invalid(Napi::Env env, const std::string& message) { throw_error(env, message, "CMSEG_INVALID_ARGUMENT"); }

const char* exception_code(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::bad_alloc&) {
    return "CMSEG_OUT_OF_MEMORY";
  } catch (const cmseg::OutOfMemory&) {
    return "CMSEG_OUT_OF_MEMORY";
  } catch (const cmseg::InvalidArgument&) {
    // A caller mistake found on the worker thread (NaN in the images, a label >= classes)
    // has the code of the same mistake found when the call is made.
    return "CMSEG_INVALID_ARGUMENT";
  } catch (...) {
    return nullptr;
  }
}

std::string describe_exception(std::exception_ptr e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::bad_alloc&) {
    // Model calls and fusion both land here: name the knobs of each.
    return "out of memory: the native engine could not allocate its buffers (a model: try a smaller batch or patch;"
           " fusion: a smaller volume, fewer classes or a larger spatial-STAPLE stride)";
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown native error";
  }
}

void check_keys(Napi::Env env, const Napi::Object& obj, const char* what, std::initializer_list<const char*> known) {
  Napi::Array names = obj.GetPropertyNames();
  for (uint32_t i = 0; i < names.Length(); ++i) {
    const std::string key = names.Get(i).ToString().Utf8Value();
    bool ok = false;
    for (const char* k : known) ok = ok || key == k;
    if (ok) continue;
    std::string list;
    for (const char* k : known) list += (list.empty() ? "" : ", ") + std::string(k);
    throw_invalid(env, "unknown option '" + key + "' in " + what + " (known: " + list + ")");
  }
}

Napi::Object expect_object(Napi::Env env, const Napi::Value& v, const char* what) {
  if (!v.IsObject() || v.IsArray() || v.IsTypedArray()) throw_invalid(env, std::string(what) + " must be an object");
  return v.As<Napi::Object>();
}

double get_number(Napi::Env env, const Napi::Object& o, const char* key, double fallback, const char* what) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsNumber() || !std::isfinite(v.As<Napi::Number>().DoubleValue()))
    throw_invalid(env, std::string(what) + "." + key + " must be a finite number");
  return v.As<Napi::Number>().DoubleValue();
}

bool shares_memory(const Napi::TypedArray& a, const Napi::TypedArray& b) {
  // The view's first byte from napi_get_typedarray_info: TypedArray::ArrayBuffer() throws for
  // a SharedArrayBuffer.
  const auto start = [](const Napi::TypedArray& t) {
    void* data = nullptr;
    NAPI_THROW_IF_FAILED(t.Env(), napi_get_typedarray_info(t.Env(), t, nullptr, nullptr, &data, nullptr, nullptr), 0);
    return (uintptr_t)data;
  };
  const uintptr_t a0 = start(a), a1 = a0 + a.ByteLength(), b0 = start(b), b1 = b0 + b.ByteLength();
  return a0 < b1 && b0 < a1;
}

std::string number_text(double d) {
  // As JS prints them: printf's "nan" and "inf" are not what the caller typed.
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  for (int precision = 1; precision <= 17; ++precision) {  // the shortest text that reads back as d, as JS prints it
    std::snprintf(buf, sizeof buf, "%.*g", precision, d);
    if (std::strtod(buf, nullptr) == d) break;
  }
  return buf;
}

float get_float(Napi::Env env, const Napi::Object& o, const char* key, float fallback, const char* what) {
  const double d = get_number(env, o, key, fallback, what);
  if (std::fabs(d) > (double)FLT_MAX)
    throw_invalid(env, std::string(what) + "." + key + " is " + number_text(d) +
                           ", outside the float range (|x| <= 3.4e38)");
  return (float)d;
}

int get_int(Napi::Env env, const Napi::Object& o, const char* key, int fallback, const char* what) {
  const double d = get_number(env, o, key, fallback, what);
  if (d != std::floor(d)) throw_invalid(env, std::string(what) + "." + key + " must be an integer, got " + number_text(d));
  if (std::fabs(d) > 2147483647.0)
    throw_invalid(env, std::string(what) + "." + key + " is " + number_text(d) + ", outside the integer range (|x| <= 2147483647)");
  return (int)d;
}

std::string get_string(Napi::Env env, const Napi::Object& o, const char* key, const std::string& fallback,
                       const char* what) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined()) return fallback;
  if (!v.IsString()) throw_invalid(env, std::string(what) + "." + key + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

template <class Arr>
static Arr expect_typed(Napi::Env env, const Napi::Value& v, const char* what, int64_t length, napi_typedarray_type type,
                        const char* type_name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != type)
    throw_invalid(env, std::string(what) + " must be a " + type_name);
  Arr a = v.As<Arr>();
  // A transferred buffer (postMessage, structuredClone) leaves a view of length 0; saying
  // "has 0 elements" (or, for a later fuse map, blaming the live ones) hides why.
  if (a.ArrayBuffer().IsDetached())
    throw_invalid(env, std::string(what) + " is a view of a detached ArrayBuffer (transferred with postMessage or "
                                           "structuredClone); pass an array whose buffer this thread still owns");
  if (length >= 0 && (int64_t)a.ElementLength() != length)
    throw_invalid(env, std::string(what) + " has " + std::to_string(a.ElementLength()) + " elements, expected " +
                           std::to_string(length));
  return a;
}

Napi::Float32Array expect_f32(Napi::Env env, const Napi::Value& v, const char* what, int64_t length) {
  return expect_typed<Napi::Float32Array>(env, v, what, length, napi_float32_array, "Float32Array");
}

Napi::Float64Array expect_f64(Napi::Env env, const Napi::Value& v, const char* what, int64_t length) {
  return expect_typed<Napi::Float64Array>(env, v, what, length, napi_float64_array, "Float64Array");
}

Napi::Uint8Array expect_u8(Napi::Env env, const Napi::Value& v, const char* what, int64_t length) {
  return expect_typed<Napi::Uint8Array>(env, v, what, length, napi_uint8_array, "Uint8Array");
}

std::string proxy_hint(Napi::Env env, const Napi::Value& v) {
  if (!v.IsObject()) return "";
  try {
    Napi::Function is_array = env.Global().Get("Array").As<Napi::Object>().Get("isArray").As<Napi::Function>();
    if (is_array.Call({v}).ToBoolean()) return " (a Proxy of an array is not read through: pass the array itself)";
  } catch (const Napi::Error&) {  // a revoked Proxy: the plain message
  }
  return "";
}

std::vector<int64_t> expect_int_array(Napi::Env env, const Napi::Value& v, const char* what, uint32_t max_entries) {
  if (!v.IsArray()) throw_invalid(env, std::string(what) + " must be an array of integers" + proxy_hint(env, v));
  Napi::Array a = v.As<Napi::Array>();
  if (a.Length() > max_entries)
    throw_invalid(env, std::string(what) + " has " + std::to_string(a.Length()) + " entries, more than " +
                           std::to_string(max_entries));
  std::vector<int64_t> out;
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    const double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : NAN;
    const std::string at = std::string(what) + "[" + std::to_string(i) + "]";
    if (!std::isfinite(d) || d != std::floor(d) || d < 0)
      throw_invalid(env, at + " must be a non-negative integer" + (e.IsNumber() ? ", got " + number_text(d) : ""));
    if (d > (double)INT_MAX)
      throw_invalid(env, at + " is " + number_text(d) + ", more than the largest supported size 2147483647 (2^31 - 1)");
    out.push_back((int64_t)d);
  }
  return out;
}

}  // namespace cmseg_js
