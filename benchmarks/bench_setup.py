"""Set-up share of every bundled pipeline: statistics and graph building against the whole item.

Not a test. ``python benchmarks/bench_setup.py`` runs ``tileseg run`` on each pipeline in
``pipelines/`` whose input data exists (``examples/make_*_data.py`` write them), each in a
fresh subprocess, ``--repeat`` times interleaved, and reads the stage timings from the run
report (:mod:`tileseg.report`). Outputs go to a temporary directory (``--set`` of every
output path), so nothing under ``out/`` changes.

Columns: ``open`` (reading metadata), ``graph`` (building the Dask graph, Python only),
``statistics`` (whole-image passes made before the graph is complete: histograms, means),
``compute`` (everything that computes the result: ``compute_write`` plus ``components``,
the first pass of a global-components step, which computes the upstream steps once and keeps
per-chunk labels), ``finalize`` and ``evaluate``. *set-up share* = (graph + statistics) /
the item's total, median over the repeats.

``--baseline DIR`` runs the same pipeline files with the tileseg of another source tree
(e.g. a checkout of the previous version) interleaved with this one, one row each; a tree whose
runner has no ``components`` entry reports that pass under ``statistics``.

Usage::

    python benchmarks/bench_setup.py                              # every bundled pipeline with data
    python benchmarks/bench_setup.py pipelines/otsu_cleanup.yaml --repeat 5 --baseline ../tileseg-main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETUP = ("graph", "statistics")
COMPUTE = ("components", "compute_write")


def _outputs(pipe: Path) -> list[str]:
    import yaml

    spec = yaml.safe_load(pipe.read_text())
    if spec.get("output") is not None:
        return ["output.path"]
    return [f"outputs[{i}].path" for i in range(len(spec.get("outputs") or []))]


def _input_exists(pipe: Path) -> bool:
    import yaml

    spec = yaml.safe_load(pipe.read_text())
    path = (spec.get("input") or {}).get("path")
    paths = path if isinstance(path, list) else [path]
    return all((pipe.parent / p).exists() for p in paths if isinstance(p, str) and "*" not in p)


def run_one(pipe: Path, workdir: Path, rep: int, root: Path = ROOT) -> dict:
    """One ``tileseg run`` of ``pipe`` in a fresh process; the item's timings from its report."""
    import yaml

    spec = yaml.safe_load(pipe.read_text())
    out = workdir / f"{pipe.stem}_{rep}_{abs(hash(str(root)))}"
    sets = []
    if spec.get("output") is not None:
        name = Path(spec["output"]["path"]).name
        sets += ["--set", f"output.path={out / name}"]
    for i, o in enumerate(spec.get("outputs") or []):
        sets += ["--set", f"outputs.{i}.path={out / Path(o['path']).name}"]
    cmd = [sys.executable, "-m", "tileseg.cli", "run", str(pipe), "--no-resume", "--quiet", *sets]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, cwd=root)
    reports = sorted(out.rglob("tileseg-report.json"))
    if proc.returncode != 0 or not reports:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-3:]}
    report = json.loads(reports[0].read_text())
    timings = report["items"][0]["timings"]
    total = sum(timings.values())
    return {"timings": timings, "total": total,
            "setup": sum(timings.get(k, 0.0) for k in SETUP) / total if total else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pipelines", nargs="*", help="pipeline files (default: pipelines/*.yaml with data present)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per pipeline (median)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--baseline", help="another source tree whose tileseg runs the same pipelines, interleaved")
    args = ap.parse_args()
    trees = [("now", ROOT)] + ([("baseline", Path(args.baseline).resolve())] if args.baseline else [])
    pipes = [Path(p).resolve() for p in args.pipelines] or sorted((ROOT / "pipelines").glob("*.yaml"))
    skipped = [p for p in pipes if not _input_exists(p)]
    pipes = [p for p in pipes if p not in skipped]
    for p in skipped:
        print(f"# skipped {p.name}: its input data is missing (see the comment at the top of the file)")
    print(f"# {os.cpu_count()} CPU cores; load average before: {os.getloadavg()[0]:.2f}; "
          f"median of {args.repeat} interleaved runs per pipeline")
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="tileseg-setup-", dir=os.environ.get("TMPDIR")) as tmp:
        for rep in range(args.repeat):
            for p in pipes:
                for tree, root in trees:
                    name = p.name if len(trees) == 1 else f"{p.name} ({tree})"
                    r = run_one(p, Path(tmp), rep, root)
                    runs.setdefault(name, []).append(r)
                    print(f"# {name} run {rep + 1}: {json.dumps(r)}", flush=True)
    cols = ("open", "graph", "statistics", "components", "compute_write", "finalize", "evaluate")
    print("\n| pipeline | " + " | ".join(f"{c} s" for c in cols) + " | total s | set-up share |")
    print("|---|" + "---:|" * (len(cols) + 2))
    table = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "timings" in r]
        if not ok:
            print(f"| {name} | failed: {rs[0].get('error')} |")
            continue
        med = {c: float(np.median([r["timings"].get(c, 0.0) for r in ok])) for c in cols}
        total = float(np.median([r["total"] for r in ok]))
        share = float(np.median([r["setup"] for r in ok]))
        table[name] = {"median_s": med, "total_s": total, "setup_share": share,
                       "all_shares": [round(r["setup"], 3) for r in ok]}
        print(f"| {name} | " + " | ".join(f"{med[c]:.2f}" for c in cols) + f" | {total:.2f} | {share:.0%} |")
    print(f"\nall set-up shares: {json.dumps({n: t['all_shares'] for n, t in table.items()})}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
