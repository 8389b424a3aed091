// Argument checks shared by the wrap files: every malformed argument becomes a
// JS Error whose message names the argument and what was expected.
#pragma once
#include <napi.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

namespace cmseg_js {

// Throws a JS Error carrying `code` (CMSEG_OUT_OF_MEMORY, CMSEG_DISPOSED, ...).
[[noreturn]] void throw_error(Napi::Env env, const std::string& message, const char* code);
// Throws a JS Error (with err.code = 'CMSEG_INVALID_ARGUMENT').
[[noreturn]] void throw_invalid(Napi::Env env, const std::string& message);

// Runs fn, turning C++ exceptions (cmseg::InvalidArgument, bad_alloc, ...) into JS Errors.
template <class F>
auto guard(Napi::Env env, F&& fn) -> decltype(fn());

// Rejects keys of obj not in known: "unknown option 'x' in <what> (known: a, b, c)".
void check_keys(Napi::Env env, const Napi::Object& obj, const char* what, std::initializer_list<const char*> known);

Napi::Object expect_object(Napi::Env env, const Napi::Value& v, const char* what);
double get_number(Napi::Env env, const Napi::Object& o, const char* key, double fallback, const char* what);
// A number that fits a float (finite, |x| <= FLT_MAX), checked before the cast.
float get_float(Napi::Env env, const Napi::Object& o, const char* key, float fallback, const char* what);
int get_int(Napi::Env env, const Napi::Object& o, const char* key, int fallback, const char* what);
std::string get_string(Napi::Env env, const Napi::Object& o, const char* key, const std::string& fallback,
                       const char* what);

// Typed-array views (no copy). `length` is checked when >= 0.
Napi::Float32Array expect_f32(Napi::Env env, const Napi::Value& v, const char* what, int64_t length = -1);
Napi::Float64Array expect_f64(Napi::Env env, const Napi::Value& v, const char* what, int64_t length = -1);
Napi::Uint8Array expect_u8(Napi::Env env, const Napi::Value& v, const char* what, int64_t length = -1);

// Whether two typed arrays' bytes overlap, by address: views of one buffer, and two
// SharedArrayBuffer objects over one memory (one posted through a port comes back as another
// object), alike.
bool shares_memory(const Napi::TypedArray& a, const Napi::TypedArray& b);

// A JS array of integers in 0..INT_MAX (2^31 - 1), e.g. a shape; its length is checked
// against max_entries before any entry is read (a 2^32 - 1 long array is not walked).
std::vector<int64_t> expect_int_array(Napi::Env env, const Napi::Value& v, const char* what,
                                      uint32_t max_entries = UINT32_MAX);

// For a value that is not an array to N-API: " (a Proxy of an array is not read through: pass
// the array itself)" when JS's Array.isArray says it is one (a Proxy of an array), else "".
std::string proxy_hint(Napi::Env env, const Napi::Value& v);

// d as its shortest round-trip text (1.5, 1e+40, 4294967304).
std::string number_text(double d);

// Maps a C++ exception to the message the JS Error carries.
std::string describe_exception(std::exception_ptr e);
// "CMSEG_OUT_OF_MEMORY" for a failed allocation (std::bad_alloc, cmseg::OutOfMemory),
// else null (the caller's usual code).
const char* exception_code(std::exception_ptr e);

}  // namespace cmseg_js

#include "args_impl.h"
