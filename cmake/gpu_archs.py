"""Print the CUDA architectures of the GPUs that torch sees (e.g. "90", or "80;90"), or nothing without one.

CMakeLists.txt asks this when RANKPRUNE_CUDA is AUTO or ON and no architectures were named: the visible GPU is
the one the kernels are built for, and no visible GPU means that AUTO builds the CPU kernels only.
"""
import torch

archs = set()
if torch.version.cuda is not None and torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        archs.add(f"{major}{minor}")
print(";".join(sorted(archs, key=int)))
