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
    throw_invalid(env, describe_exception(std::current_exception()));
  }
}

}  // namespace cmseg_js
