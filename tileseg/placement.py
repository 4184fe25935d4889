"""Placing model inference on the workers that offer a resource (e.g. a GPU), on every Dask path.

Why not only ``dask.annotate``: layer annotations do not survive graph
optimisation. dask.array's optimiser turns the graph into a plain dict for
low-level fusion, so ``resources`` annotations on the model layer are gone
by the time the graph reaches the scheduler (dask 2024.8 and 2026.8 alike),
and an inference task may run on a worker without the GPU.

What survives every optimisation is the graph's *structure*: each inference
(owner) task of :mod:`tileseg.graph` depends on one model key,
``("tileseg-model-<token>", name, amount, ...)``, which carries the
resources the model needs. Fusion may merge or rename an inference task, but
the merged task still depends on the model key. :class:`ModelPlacement`, a
scheduler plugin, sets the resource restriction of every new task that
depends on such a key before the scheduler assigns any task to a worker.
Reading, preprocessing, stitching and writing tasks do not depend on the
model key and stay free to run anywhere.

:func:`install` registers the plugin on a client (idempotent, cheap);
:func:`check_workers` fails early with a clear error when no worker offers
the resources. The plugin runs in the scheduler process, so the scheduler
needs tileseg installed, like the workers (dask expects one software
environment for client, scheduler and workers).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from .errors import PlacementError

log = logging.getLogger(__name__)

#: Name prefix of the graph key that holds the predictor (see :func:`model_key`).
MODEL_KEY_PREFIX = "tileseg-model-"
#: Name the plugin is registered under (one per scheduler).
PLUGIN_NAME = "tileseg-model-placement"


def model_key(token: str, resources: Mapping[str, float] | None) -> tuple:
    """The graph key of a predictor: its name, then the resources as ``name, amount`` pairs.

    >>> model_key("abc", {"GPU": 1})
    ('tileseg-model-abc', 'GPU', 1.0)
    >>> model_key("abc", None)
    ('tileseg-model-abc', 0)
    """
    if not resources:
        return (f"{MODEL_KEY_PREFIX}{token}", 0)
    pairs: list[Any] = []
    for name, amount in sorted(resources.items()):
        pairs += [str(name), float(amount)]
    return (f"{MODEL_KEY_PREFIX}{token}", *pairs)


def key_resources(key: Any) -> dict[str, float] | None:
    """The resources a model key (:func:`model_key`) asks for; None for any other key.

    >>> key_resources(("tileseg-model-abc", "GPU", 1.0))
    {'GPU': 1.0}
    >>> key_resources(("tileseg-final-abc", 0, 0)) is None
    True
    """
    if not (isinstance(key, tuple) and len(key) >= 3 and len(key) % 2 == 1 and isinstance(key[0], str)
            and key[0].startswith(MODEL_KEY_PREFIX)):
        return None
    names, amounts = key[1::2], key[2::2]
    if not all(isinstance(n, str) for n in names) or not all(isinstance(a, (int, float)) for a in amounts):
        return None
    return {n: float(a) for n, a in zip(names, amounts)}


def task_resources(dependency_keys: Any) -> dict[str, float] | None:
    """What a task needs, from the keys it depends on: the union of its model keys' resources."""
    needed: dict[str, float] = {}
    for dep in dependency_keys:
        res = key_resources(dep)
        if res:
            for name, amount in res.items():
                needed[name] = max(needed.get(name, 0.0), amount)
    return needed or None


def offering_workers(workers: Mapping[str, Mapping[str, Any]], resources: Mapping[str, float]) -> list[str]:
    """Addresses of the workers whose declared resources cover ``resources``.

    ``workers`` is ``client.scheduler_info()["workers"]`` (each entry with a ``resources`` mapping).

    >>> offering_workers({"tcp://a": {"resources": {"GPU": 1}}, "tcp://b": {"resources": {}}}, {"GPU": 1})
    ['tcp://a']
    """
    out = []
    for addr, info in workers.items():
        have = info.get("resources") or {}
        if all(float(have.get(name, 0)) >= float(amount) for name, amount in resources.items()):
            out.append(addr)
    return sorted(out)


def describe_workers(workers: Mapping[str, Mapping[str, Any]]) -> str:
    """``addr {resources}`` of each worker, for error messages."""
    if not workers:
        return "no workers"
    return ", ".join(f"{addr} {dict(info.get('resources') or {})!r}" for addr, info in sorted(workers.items()))


def check_workers(client: Any, resources: Mapping[str, float] | None, what: str = "model inference") -> list[str]:
    """Fail unless a worker of ``client``'s cluster offers ``resources``; returns those workers.

    Raises
    ------
    PlacementError
        Naming the resources and every worker with what it offers, e.g.
        ``model inference needs {'GPU': 1.0} but no worker offers it (workers:
        tcp://127.0.0.1:4000 {})``.
    """
    if not resources:
        return []
    workers = client.scheduler_info(n_workers=-1)["workers"] if _takes_n_workers(client) else \
        client.scheduler_info()["workers"]
    found = offering_workers(workers, resources)
    if not found:
        raise PlacementError(
            f"{what} needs {dict(resources)!r} but no worker of the cluster at {client.scheduler.address} offers it "
            f"(workers: {describe_workers(workers)}); start workers with e.g. `dask worker ... --resources GPU=1` "
            "or drop the resources")
    return found


def _takes_n_workers(client: Any) -> bool:
    import inspect

    try:
        return "n_workers" in inspect.signature(client.scheduler_info).parameters
    except (TypeError, ValueError):  # pragma: no cover - an unusual client
        return False


def install(client: Any, grace_s: float = 10.0) -> None:
    """Register :class:`~tileseg.scheduler_plugin.ModelPlacement` on ``client``'s scheduler (once per scheduler).

    ``grace_s``: how long a ready inference task may wait when no worker offers its resources any
    more before it fails (only for the first registration on a scheduler).
    """
    if getattr(client, "_tileseg_placement", None) == client.scheduler.address:
        return
    from .scheduler_plugin import ModelPlacement

    try:
        client.register_plugin(ModelPlacement(grace_s=grace_s), name=PLUGIN_NAME)
    except Exception as exc:  # typically: tileseg is not installed where the scheduler runs
        raise PlacementError(
            f"cannot install tileseg's placement plugin on the scheduler {client.scheduler.address} "
            f"({type(exc).__name__}: {exc}); install tileseg in the scheduler's environment too") from exc
    try:
        client._tileseg_placement = client.scheduler.address
    except AttributeError:  # pragma: no cover - a client that refuses attributes
        pass


def active_client() -> Any:
    """The distributed client Dask computes on now (the user's default client), or None."""
    import sys

    if "distributed" not in sys.modules:  # nobody made a client without importing distributed
        return None
    import dask
    from distributed import default_client

    if dask.config.get("scheduler", None) not in (None, "dask.distributed", "distributed"):
        return None  # a local scheduler chosen for this block (e.g. tileseg's threads)
    try:
        return default_client()
    except ValueError:
        return None


def prepare(resources: Mapping[str, float] | None, client: Any = None) -> Any:
    """Before building a graph whose inference needs ``resources``: install the plugin and check the workers.

    ``client`` defaults to :func:`active_client`; without a distributed
    client there is nothing to place (returns None).

    Raises
    ------
    PlacementError
        When no worker offers the resources.
    """
    if not resources:
        return None
    client = client if client is not None else active_client()
    if client is None:
        log.warning("resources %r apply on a distributed client only, and none is active now: create the client "
                    "before tileseg.segment / tileseg.write", dict(resources))
        return None
    check_workers(client, resources)
    install(client)
    return client


def resources_in(collection: Any) -> dict[str, float] | None:
    """What the inference tasks in a dask collection's graph need (from its model keys), or None.

    Looks only at the layers :mod:`tileseg.graph` builds (``tileseg-final-*``), so it stays cheap.
    """
    graph = collection.__dask_graph__()
    layers = getattr(graph, "layers", None)
    if layers is None:
        return None
    keys = []
    for name, layer in layers.items():
        if isinstance(name, str) and name.startswith("tileseg-final-"):
            model_name = MODEL_KEY_PREFIX + name[len("tileseg-final-"):]
            keys += [k for k in layer.keys() if isinstance(k, tuple) and k and k[0] == model_name]
    return task_resources(keys)


# --------------------------------------------------------------------------- one worker per GPU


def device_count() -> int:
    """CUDA devices visible to this process (0 without torch or CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F401 - heavy, only when a local cluster is asked for GPUs
        except ImportError:
            return 0
        torch = sys.modules["torch"]
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:  # pragma: no cover - a broken CUDA install
        return 0


def visible_devices(n_devices: int, env: Mapping[str, str] | None = None) -> list[str]:
    """The device ids one worker each gets, honouring ``CUDA_VISIBLE_DEVICES`` of this process.

    >>> visible_devices(2, {})
    ['0', '1']
    >>> visible_devices(2, {"CUDA_VISIBLE_DEVICES": "3,5"})
    ['3', '5']
    """
    import os

    env = os.environ if env is None else env
    listed = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n_devices] if listed else [str(i) for i in range(n_devices)]


def gpu_worker_specs(devices: list[str], threads_per_worker: int, resources: Mapping[str, float],
                     env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """``distributed.SpecCluster`` worker specs: one Nanny per device, pinned with ``CUDA_VISIBLE_DEVICES``.

    Each worker declares ``GPU: 1`` (plus ``resources``), so ``cuda`` inside it
    means its own device.

    >>> spec = gpu_worker_specs(["0", "1"], 1, {"GPU": 1})
    >>> spec["gpu-1"]["options"]["env"]["CUDA_VISIBLE_DEVICES"], spec["gpu-1"]["options"]["resources"]
    ('1', {'GPU': 1.0})
    """
    from distributed import Nanny

    res = {**{k: float(v) for k, v in resources.items()}, "GPU": 1.0}
    return {f"gpu-{dev}": {"cls": Nanny, "options": {
        "nthreads": threads_per_worker, "resources": dict(res),
        "env": {**dict(env or {}), "CUDA_VISIBLE_DEVICES": dev}, "dashboard_address": None}}
        for dev in devices}


def local_gpu_cluster(threads_per_worker: int, resources: Mapping[str, float], n_devices: int,
                      env: Mapping[str, str] | None = None) -> Any:
    """One worker process per visible GPU: dask-cuda's ``LocalCUDACluster`` when installed, else a SpecCluster.

    Parameters
    ----------
    threads_per_worker : int
        Threads of each worker.
    resources : mapping
        Extra resources each worker declares (``GPU: 1`` is always declared).
    n_devices : int
        How many devices (from :func:`device_count`).
    env : mapping, optional
        Extra environment of each worker process.
    """
    import logging as _logging

    res = {**{k: float(v) for k, v in resources.items()}, "GPU": 1.0}
    devices = visible_devices(n_devices)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        log.info("scheduler local: dask-cuda LocalCUDACluster on devices %s", devices)
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(devices), threads_per_worker=threads_per_worker,
                                resources=res, dashboard_address=None, silence_logs=_logging.WARNING)
    from distributed import Scheduler, SpecCluster

    log.info("scheduler local: one worker per GPU on devices %s", devices)
    return SpecCluster(workers=gpu_worker_specs(devices, threads_per_worker, res, env),
                       scheduler={"cls": Scheduler, "options": {"dashboard_address": None}},
                       silence_logs=_logging.WARNING)
