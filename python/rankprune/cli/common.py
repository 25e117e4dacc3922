"""Options every working subcommand shares (``--device``, ``--dtype``, ``--seed``, ``--out``) and their checks."""
import argparse
import os
import random
from typing import Optional

import torch

from . import UsageError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def add_common_options(parser: argparse.ArgumentParser, out_default: Optional[str], out_help: str,
                       dtype_help: str = "floating-point type (default float32)") -> None:
    """Add ``--device``, ``--dtype``, ``--seed`` and ``--out`` to ``parser``."""
    parser.add_argument("--device", default="auto",
                        help="'cpu', 'cuda', 'cuda:N', or 'auto' (CUDA when available; default)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help=dtype_help)
    parser.add_argument("--seed", type=int, default=0, help="random seed for torch, numpy and Python (default 0)")
    parser.add_argument("--out", default=out_default, help=out_help)


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available else CPU; anything else must be a valid, available torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{name}' (use cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: only cpu and cuda are supported, got '{name}'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``--dtype`` name."""
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    """Seed Python, numpy (when installed) and torch (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def check_ratio(name: str, value: float, low: float = 0.0, high: float = 1.0, inclusive_high: bool = False) -> float:
    """Raise ``UsageError`` unless ``low < value < high`` (or ``<= high`` when ``inclusive_high``)."""
    ok = low < value <= high if inclusive_high else low < value < high
    if not ok:
        bracket = "]" if inclusive_high else ")"
        raise UsageError(f"{name} must be in ({low}, {high}{bracket}, got {value}")
    return value


def check_output_dir(path: str) -> str:
    """Create ``path`` as a folder (parents too); refuse a path that is an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out {path}: exists and is not a folder")
    os.makedirs(path, exist_ok=True)
    return path
