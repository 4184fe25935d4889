"""ONNX models run by ONNX Runtime (extra ``onnx``).

The session is created lazily, once per worker process (a module-level cache
keyed by the file's path, mtime and size and the providers); the predictor
pickles without it. Providers are tried in the order given (TensorRT, CUDA,
CPU, ...); listed ones this onnxruntime build lacks are skipped with a
warning naming them, and none available is an error.

Before a session is created, the model's external-data locations (weights
stored next to the ``.onnx`` file) are checked: a location that is absolute
or leads outside the model's folder (``..``, a symlink) is refused, so a
model file cannot make the worker read arbitrary files.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, ModelError, require
from .base import Predictor
from .conventions import Conventions, select_output

log = logging.getLogger(__name__)

__all__ = ["OnnxPredictor", "check_providers", "check_external_data", "provider_name"]

_SESSIONS: dict[tuple, Any] = {}
_LOCK = threading.Lock()
_RUN_LOCKS: dict[tuple, threading.Lock] = {}
_SHORT = {"tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider",
          "cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider", "rocm": "ROCMExecutionProvider",
          "migraphx": "MIGraphXExecutionProvider", "openvino": "OpenVINOExecutionProvider",
          "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider", "coreml": "CoreMLExecutionProvider"}


def provider_name(name: str) -> str:
    """Full ONNX Runtime provider name of a short one (``CUDA`` -> ``CUDAExecutionProvider``)."""
    return _SHORT.get(name.lower(), name)


def check_providers(providers: Any) -> tuple[str, ...]:
    """The providers as full names (default ``("CPUExecutionProvider",)``); no onnxruntime needed.

    Raises
    ------
    ConfigError
        Not a non-empty list of strings.
    """
    if providers is None:
        return ("CPUExecutionProvider",)
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, (list, tuple)) or not providers or not all(isinstance(p, str) for p in providers):
        raise ConfigError(f"model.onnx.providers: must be a list of execution provider names such as "
                          f"[TensorRT, CUDA, CPU], got {providers!r}")
    return tuple(provider_name(p) for p in providers)


def _ort():
    return require("onnxruntime", "onnx")


def check_external_data(path: str) -> list[str]:
    """Refuse external-data locations outside the model's folder; return the external files it uses.

    Raises
    ------
    ModelError
        For an absolute location, one that resolves outside the folder of
        ``path`` (``..`` or symlinks), or a missing external file.
    """
    onnx = require("onnx", "onnx")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise ModelError(f"cannot read ONNX model {path!r}: {exc.__class__.__name__}: {str(exc)[:300]}") from exc
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    folder = Path(path).resolve().parent
    found: list[str] = []
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise ModelError(f"ONNX model {path!r}: tensor {tensor.name!r} uses external data without a location")
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise ModelError(f"ONNX model {path!r}: tensor {tensor.name!r} reads external data from {location!r}, "
                             f"outside the model's folder {str(folder)!r}; refused")
        if not target.is_file():
            raise ModelError(f"ONNX model {path!r}: external data file {location!r} not found in {str(folder)!r}")
        if str(target) not in found:
            found.append(str(target))
    return found


def _file_key(path: str) -> tuple:
    from .torch import _file_key as key

    return key(path)


def _session(path: str, providers: tuple[str, ...]) -> Any:
    """The process's session for ``path`` with the first available ``providers`` (created once)."""
    key = (*_file_key(path), providers)
    with _LOCK:
        sess = _SESSIONS.get(key)
        if sess is not None:
            return sess
        ort = _ort()
        available = ort.get_available_providers()
        usable = [p for p in providers if p in available]
        missing = [p for p in providers if p not in available]
        if not usable:
            raise ModelError(f"ONNX model {path!r}: none of the execution providers {list(providers)} is available "
                             f"in this onnxruntime (available: {available}); install the matching onnxruntime "
                             "package (onnxruntime-gpu for CUDA/TensorRT) or list one of the available providers")
        if missing:
            warnings.warn(f"ONNX model {path!r}: execution provider(s) {missing} not available in this onnxruntime "
                          f"(available: {available}); running on {usable}", RuntimeWarning, stacklevel=3)
        check_external_data(path)
        try:
            sess = ort.InferenceSession(path, providers=usable)
        except Exception as exc:
            raise ModelError(f"cannot load ONNX model {path!r}: {exc.__class__.__name__}: {str(exc)[:400]}") from exc
        dropped = [p for p in usable if p not in sess.get_providers()]
        if dropped:
            warnings.warn(f"ONNX model {path!r}: onnxruntime could not start {dropped} (see its log); running on "
                          f"{sess.get_providers()}", RuntimeWarning, stacklevel=3)
        _SESSIONS[key] = sess
        log.debug("ONNX session for %s on %s", path, sess.get_providers())
        return sess


def clear_cache() -> None:
    """Forget every ONNX Runtime session of this process (mainly for tests)."""
    with _LOCK:
        _SESSIONS.clear()


def _dim(d: Any) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


class OnnxPredictor(Predictor):
    """Run an ONNX model with ONNX Runtime on batches ``(N, C, *patch)`` -> ``(N, K, *patch)`` float32.

    The model's first input takes the batch; its first output (or the one the
    conventions' ``output`` names, by name or index) is the result. A batch
    axis fixed in the model (e.g. 1) is honoured by splitting the batch.

    Parameters
    ----------
    path : str
        The ``.onnx`` file.
    providers : sequence of str
        Execution providers in order of preference (see :func:`check_providers`).
    device : str, optional
        Unused (the providers choose the device); kept for the common interface.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model's signature.
    conventions : Conventions, optional
        Layout, fixed patch size, activation, output stride, output
        (see :mod:`tileseg.predictors.conventions`).
    serialize : bool
        One run at a time per session in this process (ONNX Runtime already
        uses every core for one run).

    Raises
    ------
    ModelError
        Missing or unreadable file, refused external data, no usable provider.
    """

    def __init__(self, path: str | os.PathLike, providers: Any = None, *, device: str | None = None,
                 in_channels: int | None = None, out_channels: int | None = None,
                 conventions: Conventions | None = None, serialize: bool = True) -> None:
        self.path = os.fspath(path)
        self.providers = check_providers(providers)
        self.device = device
        self.serialize = serialize
        sess = _session(self.path, self.providers)
        conv = conventions if conventions is not None else Conventions()
        inp = sess.get_inputs()[0]
        self.input_name = inp.name
        self.input_type = inp.type
        shape = list(inp.shape)
        if len(shape) < 3:
            raise ModelError(f"ONNX model {self.path!r}: input {inp.name!r} has shape {shape}; expected a batch of "
                             "images (N, C, *patch) or (N, *patch, C)")
        self.fixed_batch = _dim(shape[0])
        spatial = shape[1:-1] if conv.channels_last else shape[2:]
        if all(_dim(d) for d in spatial):
            conv = conv.with_defaults(patch_size=tuple(int(d) for d in spatial))
        self.conventions = conv
        outputs = [o.name for o in sess.get_outputs()]
        key = conv.output
        if isinstance(key, str) and key not in outputs:
            raise ModelError(f"ONNX model {self.path!r}: no output {key!r} (outputs: {outputs})")
        if isinstance(key, int) and not -len(outputs) <= key < len(outputs):
            raise ModelError(f"ONNX model {self.path!r}: output index {key} out of range (outputs: {outputs})")
        self.output_name = key if isinstance(key, str) else outputs[key or 0]
        oshape = list(next(o for o in sess.get_outputs() if o.name == self.output_name).shape)
        cin = _dim(shape[-1] if conv.channels_last else shape[1])
        cout = _dim(oshape[-1] if conv.channels_last else oshape[1]) if len(oshape) == len(shape) else None
        self.in_channels = in_channels if in_channels is not None else cin
        self.out_channels = out_channels if out_channels is not None else cout

    def __getstate__(self) -> dict:
        return self.__dict__.copy()  # holds no session: each process opens its own from the cache

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        conv = self.conventions
        conv.check_batch(batch)
        if self.in_channels is not None and batch.shape[1] != self.in_channels:
            raise ModelError(f"model expects {self.in_channels} input channels, image has {batch.shape[1]}")
        x = conv.model_input(batch)
        if self.input_type == "tensor(float16)":
            x = x.astype(np.float16)
        sess = _session(self.path, self.providers)
        step = self.fixed_batch or len(x)
        lock = _RUN_LOCKS.setdefault((self.path, self.providers), threading.Lock()) if self.serialize \
            else nullcontext()
        parts = []
        try:
            with lock:
                for i in range(0, len(x), step):
                    parts.append(sess.run([self.output_name], {self.input_name: x[i:i + step]})[0])
        except Exception as exc:
            raise ModelError(f"ONNX model {self.path!r} failed on a batch of shape {x.shape!r}: "
                             f"{exc.__class__.__name__}: {str(exc).strip()[-500:]}") from exc
        out = select_output(parts[0] if len(parts) == 1 else np.concatenate(parts), None,
                            lambda a: isinstance(a, np.ndarray))
        return conv.engine_output(out, batch.shape)

    def describe(self) -> dict[str, Any]:
        sess = _session(self.path, self.providers)
        return {"type": "onnx", "path": self.path, "providers": list(self.providers),
                "providers_used": list(sess.get_providers()), "in_channels": self.in_channels,
                "out_channels": self.out_channels, "conventions": self.conventions.as_dict()}
