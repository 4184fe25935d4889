"""Shared by the classical benchmarks: run one variant in a fresh, watched subprocess; medians; load.

Each run is a new Python process (imports happen before its clock starts),
sampled every 0.1 s for resident memory (its children included) and killed
past a time or memory limit, or when the shared machine runs low on memory.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def launch(args: list[str], script: str, timeout: float, mem_gb: float, min_free_gb: float = 1.0) -> dict:
    """Run ``python script *args``; the script prints one JSON line of results last."""
    import psutil

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(script))), env.get("PYTHONPATH", "")])
    row: dict = {}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, os.path.abspath(script), *args], stdout=out, stderr=err, text=True, env=env)
        ps = psutil.Process(proc.pid)
        peak, status = 0, None
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            except psutil.Error:
                rss = 0
            peak = max(peak, rss)
            if rss > mem_gb * 2**30:
                status = f"killed at {rss / 2**30:.1f} GB (> {mem_gb:g} GB limit)"
            elif rss > 2**30 and psutil.virtual_memory().available < min_free_gb * 2**30:
                status = f"aborted at {rss / 2**30:.1f} GB: machine memory low (other processes)"
            elif time.perf_counter() - t0 > timeout:
                status = f"timeout after {timeout:.0f} s"
            if status:
                for c in ps.children(recursive=True):
                    c.kill()
                proc.kill()
                proc.wait()
                break
            time.sleep(0.1)
        row["wall_s"] = time.perf_counter() - t0
        row["peak_rss_gb_sampled"] = peak / 2**30
        out.seek(0)
        err.seek(0)
        lines = out.read().strip().splitlines()
        if status is None and proc.returncode == 0 and lines:
            row.update(json.loads(lines[-1]))
            row["status"] = "ok"
        else:
            tail = err.read().strip().splitlines()[-1:] if status is None else []
            row["status"] = status or f"failed (rc={proc.returncode}): {' '.join(tail)[:160]}"
    row["peak_rss_gb"] = max(row.get("ru_maxrss_gb", 0.0), row["peak_rss_gb_sampled"])
    return row


def summarise(rows: list[dict], baseline: str) -> list[dict]:
    """Median per (shape, variant) over the repeats that succeeded; ``time_s`` ratio to ``baseline``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape"], r["chunk"], r["variant"]), []).append(r)
    out = []
    for (shape, chunk, variant), rs in groups.items():
        ok = [r for r in rs if r["status"] == "ok"]
        s = {"shape": shape, "chunk": chunk, "variant": variant, "runs": f"{len(ok)}/{len(rs)}"}
        for key in ("time_s", "peak_rss_gb", "read_s"):
            if ok and key in ok[0]:
                s[key] = statistics.median(r[key] for r in ok)
        if ok:
            s["n_objects"] = ok[0]["n_objects"]
        bad = sorted({r["status"] for r in rs if r["status"] != "ok"})
        s["status"] = "ok" if not bad else "; ".join(bad)
        out.append(s)
    for s in out:
        ref = next((t for t in out if t["shape"] == s["shape"] and t["variant"] == baseline and "time_s" in t), None)
        if ref and "time_s" in s:
            s["ratio"] = s["time_s"] / ref["time_s"]
            s["ratio_read"] = s["time_s"] / (ref["time_s"] + ref.get("read_s", 0.0))
            s["rss_ratio"] = s["peak_rss_gb"] / ref["peak_rss_gb"]
    return out


def uptime() -> str:
    """The ``uptime`` line (load averages) of this machine."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:  # pragma: no cover
        return "load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg())
