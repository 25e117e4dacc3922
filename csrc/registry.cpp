// The op registry: every rankprune op's schema, in one place. Kernels register themselves per backend
// (csrc/cpu/*.cpp for CPU, csrc/cuda/*.cu for CUDA); fake kernels and autograd live in python/rankprune/ops.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(rankprune, m) {
  // Singular values of every matrix of a batch [..., m, n] -> [..., min(m, n)], descending.
  m.def("svdvals(Tensor A) -> Tensor");
  // Sum of the singular values of every matrix of a batch [..., m, n] -> [...].
  m.def("nuclear_norm(Tensor A) -> Tensor");
  // Nuclear norm of every H x W map of activations [N, C, H, W]; reduction "none" -> [N, C], "sum"/"mean" -> [C].
  m.def("feature_energy(Tensor x, str reduction=\"mean\") -> Tensor");
  // Numerical rank of every H x W map (torch.linalg.matrix_rank's tolerance convention).
  m.def("feature_rank(Tensor x, float? rtol=None, str reduction=\"mean\") -> Tensor");
  // Thin SVD of every matrix of a batch: U [..., m, k], S [..., k], V [..., n, k], k = min(m, n).
  m.def("svd(Tensor A) -> (Tensor U, Tensor S, Tensor V)");
  // Orthonormal basis Q [..., m, k] of the columns of every tall matrix A [..., m, k] (m >= k).
  m.def("orthonormalize(Tensor A) -> Tensor");
  // Smallest r per matrix whose leading squared singular values keep at least `energy` of their sum.
  m.def("energy_rank(Tensor S, float energy) -> Tensor");
  // Channel-wise low-rank convolution: conv2d(x, w1 [r, C, kh, kw]) then 1x1 conv2d(., w2 [N, r, 1, 1]) + bias.
  m.def(
      "lowrank_conv2d(Tensor x, Tensor w1, Tensor w2, Tensor? bias, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
}

namespace {

PyObject* cuda_kernels_built(PyObject*, PyObject*) {
#ifdef RANKPRUNE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"cuda_kernels_built", cuda_kernels_built, METH_NOARGS, "Whether this build holds the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "rankprune's compiled ops (registered on import).", -1,
                          methods};

}  // namespace

// Importing rankprune._C runs the static registrations above; the module itself only answers questions
// about the build. No pybind11, so the module does not depend on its ABI.
extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
