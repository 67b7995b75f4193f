// Makes the compiled library importable as `sn_ext._C` (the ops register themselves when it loads) and records
// what it was built with, for `python -m sn_ext.info`. setup.py passes the SN_EXT_BUILD_* macros.
#include <ATen/core/dispatch/Dispatcher.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <exception>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "autograd.h"

#ifdef SN_EXT_BUILD_CUDA
#include <string>

#include "cuda/launch.h"
#define SN_EXT_WITH_CUDA 1
#endif

#ifndef SN_EXT_BUILD_TORCH
#define SN_EXT_BUILD_TORCH "unknown"
#endif
#ifndef SN_EXT_BUILD_CPU_ISA
#define SN_EXT_BUILD_CPU_ISA "baseline"
#endif
#ifndef SN_EXT_BUILD_CUDA
#define SN_EXT_BUILD_CUDA ""
#endif

#ifdef SN_EXT_WITH_CUDA
// cuda_launch(device_index) -> str: how the CUDA kernels launch on that device (cuda/launch.h).
static PyObject* cuda_launch(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  try {
    return PyUnicode_FromString(sn_ext::launch_mode_description(static_cast<c10::DeviceIndex>(device)).c_str());
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

#endif

// register_autograd(forward, backward, scaled_backward): the C++ autograd formulas for a backend's set of ops
// (autograd.h).
static PyObject* register_autograd(PyObject*, PyObject* args) {
  const char *forward = nullptr, *backward = nullptr, *scaled_backward = nullptr;
  if (!PyArg_ParseTuple(args, "sss", &forward, &backward, &scaled_backward)) return nullptr;
  try {
    sn_ext::register_autograd(forward, backward, scaled_backward);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

// spectral_normalize_(weight, u, v, dim, n, eps, v_first[, coeff, gamma, sigma_grad]) -> (W_sn, sigma, u_used,
// v_used): sn_ext::spectral_normalize_ called through the dispatcher unboxed, as torch's generated bindings call aten
// ops, instead of torch.ops' boxed call (which parses the arguments against the schema into a stack of IValues, and
// wraps its kernels in boxing adapters: 1.3-2.2 us more per call for aten ops of 1-3 arguments, more for 7-10
// arguments and 4 outputs). Every dispatch key still sees the call (autograd, autocast, tracing, functorch, fake and
// meta tensors, dispatch modes). It takes exact types only (three tensors, two ints, a float, a bool; then None or a
// float, None or a tensor, a bool) and returns NotImplemented for anything else, for torch.ops to convert or refuse
// with its own messages. It does not look for __torch_function__ or torch.compile: sn_ext/ops.py's
// eager_spectral_normalize_ does, before calling it.
static PyObject* spectral_normalize_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if ((nargs != 7 && nargs != 10) || !THPVariable_Check(args[0]) || !THPVariable_Check(args[1]) ||
      !THPVariable_Check(args[2]) || !PyLong_CheckExact(args[3]) || !PyLong_CheckExact(args[4]) ||
      !PyFloat_CheckExact(args[5]) || !PyBool_Check(args[6]))
    Py_RETURN_NOTIMPLEMENTED;
  std::optional<double> coeff;
  std::optional<at::Tensor> gamma;
  bool sigma_grad = true;
  if (nargs == 10) {
    if ((args[7] != Py_None && !PyFloat_CheckExact(args[7])) || (args[8] != Py_None && !THPVariable_Check(args[8])) ||
        !PyBool_Check(args[9]))
      Py_RETURN_NOTIMPLEMENTED;
    if (args[7] != Py_None) coeff = PyFloat_AS_DOUBLE(args[7]);
    if (args[8] != Py_None) gamma = THPVariable_Unpack(args[8]);
    sigma_grad = args[9] == Py_True;
  }
  const int64_t dim = PyLong_AsLongLong(args[3]), n = PyLong_AsLongLong(args[4]);
  if (PyErr_Occurred()) {  // out of int64's range: torch.ops says so
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  using Signature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, at::Tensor&, at::Tensor&, int64_t, int64_t, double, bool, std::optional<double>,
      const std::optional<at::Tensor>&, bool);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("sn_ext::spectral_normalize_", "").typed<Signature>();
  const at::Tensor& weight = THPVariable_Unpack(args[0]);
  at::Tensor u = THPVariable_Unpack(args[1]), v = THPVariable_Unpack(args[2]);  // the same tensors, updated in place
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> result;
  {
    pybind11::gil_scoped_release no_gil;  // as torch.ops' call: other threads run while the kernels do
    result = op.call(weight, u, v, dim, n, PyFloat_AS_DOUBLE(args[5]), args[6] == Py_True, coeff, gamma, sigma_grad);
  }
  auto& [weight_sn, sigma, u_used, v_used] = result;
  PyObject* out = PyTuple_New(4);
  if (out == nullptr) return nullptr;
  int i = 0;
  for (at::Tensor* t : {&weight_sn, &sigma, &u_used, &v_used}) {
    PyObject* wrapped = THPVariable_Wrap(std::move(*t));
    if (wrapped == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i++, wrapped);  // steals the reference
  }
  return out;
  END_HANDLE_TH_ERRORS
}

static PyMethodDef methods[] = {
#ifdef SN_EXT_WITH_CUDA
    {"cuda_launch", cuda_launch, METH_O, "How the CUDA kernels launch on a device."},
#endif
    {"spectral_normalize_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(spectral_normalize_direct)),
     METH_FASTCALL, "sn_ext::spectral_normalize_ called unboxed; NotImplemented for arguments of other types."},
    {"register_autograd", register_autograd, METH_VARARGS,
     "register_autograd(forward, backward, scaled_backward): sn_ext's C++ autograd formulas as the Autograd kernels "
     "of a backend's set of ops (names in the sn_ext namespace)."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "sn_ext compiled kernels", -1, methods};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // The torch version the library was compiled against, the vector ISA of its CPU code ("avx2" or "baseline"),
  // and the CUDA version ("" for a CPU-only build).
  if (PyModule_AddStringConstant(module, "built_with_torch", SN_EXT_BUILD_TORCH) < 0 ||
      PyModule_AddStringConstant(module, "built_with_cpu_isa", SN_EXT_BUILD_CPU_ISA) < 0 ||
      PyModule_AddStringConstant(module, "built_with_cuda", SN_EXT_BUILD_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
