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
    const char* code = exception_code(e);
    throw_error(env, describe_exception(e), code ? code : "CMSEG_INVALID_ARGUMENT");
  }
}

}  // namespace cmseg_js
