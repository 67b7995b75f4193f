// Makes the compiled library importable as `sn_ext._C` (the ops register themselves when it loads) and records
// what it was built with, for `python -m sn_ext.info`. setup.py passes the SN_EXT_BUILD_* macros.
#include <Python.h>

#include <exception>

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

// register_autograd(forward, backward): the C++ autograd formulas for a backend's pair of ops (autograd.h).
static PyObject* register_autograd(PyObject*, PyObject* args) {
  const char *forward = nullptr, *backward = nullptr;
  if (!PyArg_ParseTuple(args, "ss", &forward, &backward)) return nullptr;
  try {
    sn_ext::register_autograd(forward, backward);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
#ifdef SN_EXT_WITH_CUDA
    {"cuda_launch", cuda_launch, METH_O, "How the CUDA kernels launch on a device."},
#endif
    {"register_autograd", register_autograd, METH_VARARGS,
     "register_autograd(forward, backward): sn_ext's C++ autograd formulas as the Autograd kernels of a backend's "
     "pair of ops (names in the sn_ext namespace)."},
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
