#pragma once
// Template part of args.h.
namespace cmseg_js {

template <class F>
auto guard(Napi::Env env, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (...) {
    const std::exception_ptr e = std::current_exception();
    if (const char* code = exception_code(e)) {
      Napi::Error err = Napi::Error::New(env, describe_exception(e));
      err.Set("code", Napi::String::New(env, code));
      throw err;
    }
    throw_invalid(env, describe_exception(e));
  }
}

}  // namespace cmseg_js
