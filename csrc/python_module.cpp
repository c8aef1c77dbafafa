// An empty Python module, so `import exgramed_kernels._C` loads the shared library
// and runs its TORCH_LIBRARY registrations. No pybind11: the ops are reached through
// torch.ops.exgramed.*.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
