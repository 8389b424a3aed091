// Errors raised by the native core. Every public entry point validates its
// inputs and throws one of these; the bindings turn them into JS Errors, so a
// caller mistake never aborts the process.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace cmseg {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A caller mistake: wrong shape, label out of range, NaN in an image, ...
class InvalidArgument : public Error {
 public:
  using Error::Error;
};

// A buffer could not be allocated (host or device).
class OutOfMemory : public Error {
 public:
  using Error::Error;
};

template <class... Parts>
std::string str(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

template <class... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  throw InvalidArgument(str(parts...));
}

}  // namespace cmseg
