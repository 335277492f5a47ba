// The bindings' error path (fused_adam._C and fused_adam._C_cuda).
//
// NOTE [errors at the binding]: a C++ error raised in a bound function (TORCH_CHECK and friends) becomes its Python
// exception inside that function, by torch's own translator (torch::translate_exception_to_python: c10::ValueError
// -> ValueError, c10::TypeError -> TypeError, c10::Error -> RuntimeError, as for torch's own ops), and leaves
// through pybind11 as error_already_set, which pybind11's dispatcher restores without consulting the exception
// translators registered in its internals: the Python exception types then do not depend on this extension sharing
// pybind11's internals with torch. (This wrapper was first written for a crash at the first TORCH_CHECK on the GPU
// machine; that crash came from a static libstdc++ linked into the extension, fixed in setup.py and tested in
// tests/test_native_link.py; bench/NOTES.md, "GPU machine".)
#pragma once

#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>

#include <exception>
#include <utility>
#ifdef __GLIBCXX__
#include <cxxabi.h>
#endif

namespace fused_adam {

// Called from a catch block: the exception in flight as a Python error.
[[noreturn]] inline void raise_as_python_error() {
  pybind11::gil_scoped_acquire gil;  // a bound function may run without it (call_guard<gil_scoped_release>)
  try {
    throw;
  } catch (pybind11::error_already_set&) {
    throw;  // already a Python error
#ifdef __GLIBCXX__
  } catch (abi::__forced_unwind&) {
    throw;  // thread cancellation must unwind on, as pybind11's dispatcher lets it
#endif
  } catch (...) {
    torch::translate_exception_to_python(std::current_exception());
    throw pybind11::error_already_set();
  }
}

// `f` with the same signature (pybind11 reads argument types from it), its C++ errors raised as Python errors.
template <typename R, typename... A>
auto python_errors(R (*f)(A...)) {
  return [f](A... a) -> R {
    try {
      return f(std::forward<A>(a)...);
    } catch (...) {
      raise_as_python_error();
    }
  };
}

template <typename R, typename C, typename... A>
auto python_errors(R (C::*f)(A...) const) {
  return [f](const C& self, A... a) -> R {
    try {
      return (self.*f)(std::forward<A>(a)...);
    } catch (...) {
      raise_as_python_error();
    }
  };
}

}  // namespace fused_adam
