"""Render the newest benchmark results into the README's results tables.

The README holds one pair of markers per benchmark name::

    <!-- results:svdvals -->
    ...replaced...
    <!-- /results:svdvals -->

and this script replaces what lies between them with a table built from the newest JSON file per device type
named ``<name>-<device_type>-<YYYYmmddTHHMMSSZ>.json`` in ``benchmarks/results/`` (the files that
``rankprune.benchmark.write_results`` writes). Each table is headed by the device, torch/CUDA versions,
commit and date it was measured on, taken from the file's ``"environment"``.

An experiment's result file that carries its own Markdown (a ``"markdown"`` string: the experiment's
table with its setting) is shown as that text. Any other result file renders its ``"rows"`` (a list of
dicts; nested dicts become ``key.sub`` columns, a nested timing ``{"median_ms", "p10_ms", ...}`` becomes
its median), limited to ``"columns"`` when the file names them, else every column but the spread ones
(``p10_ms``, ``p90_ms``, ``repeats``: they stay in the JSON); without ``"rows"`` it renders its first list of
dicts, else its scalar fields and small nested dicts as a two-column table.

    python benchmarks/summarize.py                  # update README.md in place
    python benchmarks/summarize.py --check          # exit 1 if README.md is not up to date
"""
import argparse
import glob
import json
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "python"))  # a developer build (PYTHONPATH=python) works as well

from rankprune.benchmark import markdown_table  # noqa: E402

MARKER = re.compile(r"(<!-- results:(?P<name>[\w.\-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
RESULT_FILE = re.compile(r"^(?P<name>.+)-(?P<device>[a-z]+)-(?P<stamp>\d{8}T\d{6}Z)\.json$")
# Spread columns stay in the JSON; the README shows medians (and everything else).
SPREAD = re.compile(r"(^|\.)(p10_ms|p90_ms|repeats)($|\.)")
MAX_FIELDS = 8
NO_RESULTS = "_No results yet: run `python benchmarks/run_all.py` on a GPU machine, then this script._\n"


def newest_results(results_dir: str) -> Dict[str, Dict[str, Tuple[str, str]]]:
    """{benchmark name: {device type: (stamp, path)}} keeping the newest stamp per name and device type."""
    found: Dict[str, Dict[str, Tuple[str, str]]] = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        m = RESULT_FILE.match(os.path.basename(path))
        if not m:
            continue
        per_device = found.setdefault(m["name"], {})
        if m["device"] not in per_device or per_device[m["device"]][0] < m["stamp"]:
            per_device[m["device"]] = (m["stamp"], path)
    return found


def _flatten(row: Dict[str, object], prefix: str = "") -> Dict[str, object]:
    flat: Dict[str, object] = {}
    for key, value in row.items():
        if isinstance(value, dict) and "median_ms" in value:  # a Timing: its median stands for it
            flat[prefix + key] = value["median_ms"]
        elif isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (list, tuple)):
            flat[prefix + key] = "x".join(str(v) for v in value)
        else:
            flat[prefix + key] = value
    return flat


def _rows_of(payload: Dict[str, object]) -> Optional[List[Dict[str, object]]]:
    rows = payload.get("rows")
    if isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows):
        return rows
    for key, value in payload.items():
        if key != "environment" and isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return value
    return None


def _own_markdown(payload: Dict[str, object]) -> Optional[str]:
    """The Markdown an experiment wrote into its result file, if any."""
    text = payload.get("markdown")
    return text if isinstance(text, str) else None


def render_table(payload: Dict[str, object]) -> str:
    """The Markdown of one result file (see the module docstring for which fields it shows)."""
    own = _own_markdown(payload)
    if own is not None:
        return own.rstrip("\n") + "\n"
    rows = _rows_of(payload)
    if rows is None:
        # Scalars and small nested dicts (up to MAX_FIELDS entries) as key.sub; bigger ones stay in the JSON.
        small = {k: v for k, v in payload.items() if k != "environment" and not isinstance(v, list)
                 and not (isinstance(v, dict) and len(v) > MAX_FIELDS)}
        return markdown_table(["field", "value"], [[k, v] for k, v in _flatten(small).items()])
    flat = [_flatten(r) for r in rows]
    headers = list(payload.get("columns") or [])
    if not headers:
        for r in flat:
            headers += [k for k in r if k not in headers and not SPREAD.search(k)]
    return markdown_table(headers, [[r.get(h) for h in headers] for r in flat])


def render_section(per_device: Dict[str, Tuple[str, str]]) -> str:
    """One table per device type (CUDA first), each headed by where and when it was measured."""
    parts = []
    for device in sorted(per_device, key=lambda d: (d != "cuda", d)):
        _, path = per_device[device]
        with open(path) as f:
            payload = json.load(f)
        env = payload.get("environment", {})
        date = str(env.get("date", "unknown date"))[:10]
        versions = f"torch {env.get('torch', '?')}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        details = "medians, spread in" if _own_markdown(payload) is None else "every run in"
        parts.append(f"Measured on **{env.get('device', device)}** ({device}), {versions}, "
                     f"commit `{env.get('commit', '?')}`, {date}; {details} "
                     f"`{os.path.relpath(path, ROOT)}`.\n\n"
                     f"{render_table(payload)}\n")
    return "\n".join(parts)


def summarize(readme_text: str, results_dir: str) -> Tuple[str, List[str]]:
    """``readme_text`` with every results section refreshed, and the names of the sections that had results."""
    results = newest_results(results_dir)
    filled: List[str] = []

    def replace(m: "re.Match") -> str:
        name = m["name"]
        if name not in results:
            return m.group(1) + NO_RESULTS + m.group(4)
        filled.append(name)
        return m.group(1) + render_section(results[name]) + m.group(4)

    return MARKER.sub(replace, readme_text), filled


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render the newest benchmark results into README.md's tables.")
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"), help="Markdown file with the markers")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"), help="folder of result JSONs")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.readme):
        print(f"summarize: error: --readme {args.readme}: no such file", file=sys.stderr)
        return 2
    with open(args.readme) as f:
        text = f.read()
    new_text, filled = summarize(text, args.results)
    sections = MARKER.findall(text)
    if args.check:
        stale = new_text != text
        print(f"{args.readme}: {'out of date' if stale else 'up to date'}")
        return 1 if stale else 0
    if new_text != text:
        with open(args.readme, "w") as f:
            f.write(new_text)
    print(f"{args.readme}: {len(filled)} of {len(sections)} results sections filled"
          + (f" ({', '.join(filled)})" if filled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
