// The varcore._simt Python module: importing it registers the emulated CUDA kernels as torch.ops.varcore_simt.*.
#include <Python.h>

static struct PyModuleDef varcore_simt_module = {
    PyModuleDef_HEAD_INIT, "_simt", "varcore CUDA kernels compiled against the host emulation (tests only)", -1,
    nullptr};

PyMODINIT_FUNC PyInit__simt(void) { return PyModule_Create(&varcore_simt_module); }
