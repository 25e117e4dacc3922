"""`rankprune info`: versions, devices, and whether the CUDA kernels are built."""
import platform


def register(sub) -> None:
    p = sub.add_parser("info", help="print versions, devices and whether CUDA kernels are built")
    p.set_defaults(run=run)


def run(args) -> int:
    import torch

    import rankprune
    from rankprune import ops

    rows = [
        ("rankprune", rankprune.__version__),
        ("torch", torch.__version__),
        ("torch CUDA", str(torch.version.cuda)),
        ("python", platform.python_version()),
        ("CPU threads", str(torch.get_num_threads())),
        ("CUDA kernels built", "yes" if ops.cuda_kernels_built() else "no"),
        ("CUDA available", "yes" if torch.cuda.is_available() else "no"),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            rows.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
