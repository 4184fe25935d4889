"""Real processes for archive-run tests: a method plugin installed by entry point, `tileseg run` and a
Dask cluster started from the command line (`dask scheduler`, `dask worker`) on 127.0.0.1.

The plugin method ``slow_threshold`` is a threshold at ``value`` applied block
by block; each block may sleep ``delay`` seconds (so a run lasts long enough
to be killed in the middle) and appends one line per *item* to ``log`` (from
the block at the origin: the image's first pixel identifies the item), so a
test counts how many times each item was processed, across processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

PYTHON = sys.executable
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent

PLUGIN = '''
import os
import time

import numpy as np


def _block(block, value, delay, log, block_info=None):
    if delay:
        time.sleep(delay)
    loc = block_info[0]["array-location"] if block_info else None
    if log and loc is not None and all(start == 0 for start, _ in loc):
        with open(log, "a") as fh:  # one short append: atomic between processes
            fh.write(f"{float(block.flat[0])!r} {os.getpid()}\\n")
    return (block > value).astype(np.uint8)


def slow_threshold(data, *, spacing=None, value=0.5, delay=0.0, log=""):
    """Threshold at value; every block sleeps delay seconds; the origin block logs the first pixel."""
    return data.map_blocks(_block, value, delay, log, dtype=np.uint8)
'''


def install_plugin(root: Path) -> Path:
    """Write the plugin module and its entry point (a dist-info folder) under ``root``; returns the folder."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tileseg_testplug.py").write_text(textwrap.dedent(PLUGIN))
    info = root / "tileseg_testplug-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tileseg-testplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[tileseg.methods]\nslow_threshold = tileseg_testplug:slow_threshold\n")
    return root


def env_with(plugin_dir: Path) -> dict[str, str]:
    """The environment for child processes: this checkout and the plugin importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(plugin_dir), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", None)
    return env


def write_items(folder: Path, n: int, shape=(48, 64), chunks=(16, 16), seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` zarr stores ``item_XX.zarr`` holding an ``image`` array whose first pixel is ``10 + index``."""
    import zarr

    rng = np.random.default_rng(seed)
    images = {}
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = rng.random(shape, dtype=np.float32)
        image[0, 0] = 10 + i
        name = f"item_{i:02d}"
        g = zarr.open_group(str(folder / f"{name}.zarr"), mode="w")
        g.create_array("image", shape=shape, chunks=chunks, dtype="float32")[:] = image
        images[name] = image
    return images


def write_method_pipeline(path: Path, inputs: str, *, value=0.5, delay=0.0, log: Path | None = None,
                          output: str = "out/{stem}.zarr", execution: str = "{scheduler: threads, workers: 2}",
                          chunks=(16, 16)) -> Path:
    params = {"value": value, "delay": delay, "log": str(log) if log else ""}
    path.write_text(textwrap.dedent(f"""\
        version: 1
        input: {{path: "{inputs}", array: image}}
        method: {{slow_threshold: {json.dumps(params)}}}
        tiling: {{chunks: {list(chunks)}}}
        output: {{path: "{output}", options: {{chunks: {list(chunks)}}}}}
        execution: {execution}
        """))
    return path


def processed_counts(log: Path) -> dict[float, int]:
    """How many times each item (by first pixel) was processed, from the plugin's log."""
    counts: dict[float, int] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            key = float(line.split()[0])
            counts[key] = counts.get(key, 0) + 1
    return counts


def tileseg_cli(*args: str, env: dict[str, str], cwd: Path | None = None, **kw) -> subprocess.Popen:
    """Start ``python -m tileseg.cli ARGS`` (its own process group, output captured)."""
    return subprocess.Popen([PYTHON, "-m", "tileseg.cli", *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class CliCluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1 (random ports), killed on exit.

    Workers run without a nanny, so SIGKILL on one removes it for good.
    """

    def __init__(self, root: Path, n_workers: int, env: dict[str, str], nthreads: int = 1) -> None:
        self.root, self.env, self.n_workers, self.nthreads = root, env, n_workers, nthreads
        self.scheduler_file = root / "scheduler.json"
        self.procs: list[subprocess.Popen] = []
        self.workers: dict[str, subprocess.Popen] = {}

    def _start(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.root / log, "w")
        proc = subprocess.Popen([str(BIN / "dask"), *args], env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.root)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> CliCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._start("scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                        "--scheduler-file", str(self.scheduler_file), log="scheduler.log")
            wait_for(lambda: self.scheduler_file.exists() and self.scheduler_file.stat().st_size > 0, 60,
                     "the scheduler file")
            self.address = json.loads(self.scheduler_file.read_text())["address"]
            for i in range(self.n_workers):
                name = f"w{i}"
                self.workers[name] = self._start(
                    "worker", "--scheduler-file", str(self.scheduler_file), "--name", name, "--nthreads",
                    str(self.nthreads), "--no-nanny", "--no-dashboard", "--host", "127.0.0.1",
                    "--memory-limit", "0", log=f"{name}.log")
            from distributed import Client

            with Client(self.address, timeout="30s") as client:
                client.wait_for_workers(self.n_workers, timeout=90)
        except BaseException:
            self.__exit__()
            raise
        return self

    def kill_worker(self, name: str) -> None:
        self.workers[name].send_signal(signal.SIGKILL)
        self.workers[name].wait(timeout=30)

    def __exit__(self, *exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
