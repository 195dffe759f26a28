// The varcore._C Python module. Importing it loads the library and runs the TORCH_LIBRARY registrations;
// its attributes describe the build (read by varcore.info()). No pybind11: the raw C API keeps the compile fast.
#include <Python.h>

#ifndef VARCORE_WITH_CUDA
#define VARCORE_WITH_CUDA 0
#endif

#define VC_STR2(x) #x
#define VC_STR(x) VC_STR2(x)

static struct PyModuleDef varcore_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                              "varcore compiled kernels (ops live in torch.ops.varcore)", -1,
                                              nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&varcore_c_module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "WITH_CUDA", VARCORE_WITH_CUDA ? 1 : 0) < 0 ||
#ifdef VARCORE_CUDA_ARCHS
      PyModule_AddStringConstant(m, "CUDA_ARCHS", VC_STR(VARCORE_CUDA_ARCHS)) < 0 ||
#endif
      PyModule_AddStringConstant(m, "CXX_COMPILER", "gcc " __VERSION__) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
