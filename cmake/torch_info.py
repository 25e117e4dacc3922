"""Print what CMakeLists.txt needs to know about the installed torch, one KEY=VALUE a line."""
import glob
import os
import site
import sysconfig

import torch

root = os.path.dirname(torch.__file__)
include = os.path.join(root, "include")
print(f"TORCH_VERSION={torch.__version__}")
print(f"TORCH_CUDA_VERSION={torch.version.cuda}")
print(f"TORCH_LIB_DIR={os.path.join(root, 'lib')}")
print(f"TORCH_INCLUDE_DIRS={include}|{os.path.join(include, 'torch', 'csrc', 'api', 'include')}")
print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
# cuBLAS/cuSOLVER headers that ATen's CUDA headers include ship in the nvidia-* wheels torch pulls in.
roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
wheel_includes = sorted({d for r in roots for d in glob.glob(os.path.join(r, "nvidia", "*", "include"))})
print(f"NVIDIA_WHEEL_INCLUDE_DIRS={'|'.join(wheel_includes)}")
# ATen's at::parallel_for is an inline `#pragma omp parallel` when torch is built with OpenMP: without
# -fopenmp in our own compile it would silently run on one thread.
print(f"TORCH_OPENMP={int(torch._C.has_openmp)}")
