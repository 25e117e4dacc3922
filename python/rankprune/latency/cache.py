"""The disk cache of layer timings: one JSON file per measured layer shape and measuring environment.

A file ``<cache dir>/<hash of the key>.json`` holds ``{"key": key, "timings": {variant: {"ms", "rounds_ms",
...}}}``: the layer's time in that shape and each round's median. The key names everything a timing depends on
(device name, runtime, torch / ONNX Runtime / rankprune versions, thread count, dtype, the layer's type and
configuration, its input shape: batch included), so a timing is reused only where it was measured. The
directory is ``$RANKPRUNE_CACHE_DIR/latency`` (default ``~/.cache/rankprune/latency``).
"""
import glob
import hashlib
import json
import os
from typing import Dict

CACHE_ENV = "RANKPRUNE_CACHE_DIR"


def cache_dir() -> str:
    """Where timings are cached: ``$RANKPRUNE_CACHE_DIR/latency``, default ``~/.cache/rankprune/latency``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "rankprune")
    return os.path.join(root, "latency")


def _path(key: Dict[str, object]) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), f"{digest}.json")


def load(key: Dict[str, object]) -> Dict[str, dict]:
    """The cached ``{variant: timing}`` of ``key`` (empty when none, or when the file is unreadable or was
    written for another key)."""
    try:
        with open(_path(key)) as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("key") != json.loads(json.dumps(key)):
        return {}
    timings = stored.get("timings")
    return dict(timings) if isinstance(timings, dict) else {}


def store(key: Dict[str, object], timings: Dict[str, dict]) -> None:
    """Add ``timings`` to the file of ``key`` (written to a temporary file and renamed, so that a concurrent
    reader never sees half a file)."""
    merged = {**load(key), **timings}
    path = _path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "w") as f:
        json.dump({"key": key, "timings": merged}, f, indent=1, sort_keys=True)
    os.replace(partial, path)


def clear_cache() -> int:
    """Delete every cached timing (the JSON files of :func:`cache_dir`); returns how many files were removed."""
    removed = 0
    for path in glob.glob(os.path.join(cache_dir(), "*.json")):
        try:
            os.remove(path)
            removed += 1
        except FileNotFoundError:  # removed by a concurrent clear
            pass
    return removed
