"""PyTorch predictors: TorchScript files, exported programs (``torch.export``), architectures + state_dicts,
in-memory modules.

Loading and caching
-------------------
A model read from a file is loaded at most once per worker *process* and
device (each load is counted in :mod:`tileseg.counters` as ``model_loads``
and reported in the run report): a module-level cache is keyed by (kind, resolved path, file mtime and
size, architecture config, device, precision). A :class:`TorchPredictor`
built from a path pickles without its weights (``__getstate__`` drops the
loaded module); after unpickling in a worker it reloads lazily from that
process's cache, so every task on the worker shares one module. A predictor
wrapping an in-memory ``nn.Module`` has no file to reload from, so pickling it
carries the module; the engine puts the predictor in the graph once, as a
single key, so it still travels once per worker, not once per task.

Concurrency
-----------
Dask's threaded scheduler may call the predictor from several threads at
once. On the CPU each torch forward already uses all cores (intra-op
threads), so concurrent forwards only oversubscribe the cores (measured on 2
cores: slower than running them one after another); on a GPU they compete for
the same device memory. Forward passes are therefore serialised by one
process-wide lock per device (``serialize=True``, the default). Reading,
batching and stitching in the other threads still overlap with the forward.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .. import counters
from ..errors import ConfigError, ModelError, require
from .base import Predictor
from .conventions import Conventions, select_output

log = logging.getLogger(__name__)

__all__ = ["TorchPredictor", "PRECISIONS", "resolve_device", "clear_cache"]

PRECISIONS = ("fp32", "fp16", "bf16")

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()
_FORWARD_LOCKS: dict[str, threading.Lock] = {}
_FORWARD_LOCKS_LOCK = threading.Lock()

_CHANNEL_MSG = re.compile(r"expected input\[[^\]]*\] to have (\d+) channels, but got (\d+) channels")


def _torch():
    return require("torch", "models")


def resolve_device(device: str | None) -> str:
    """``"cuda"`` when a GPU is visible and ``device`` is None, else ``device`` or ``"cpu"``."""
    if device is not None:
        return str(device)
    torch = _torch()
    return "cuda" if torch.cuda.is_available() else "cpu"


def clear_cache() -> None:
    """Forget every model loaded from a file in this process (mainly for tests)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def _forward_lock(device: str) -> threading.Lock:
    with _FORWARD_LOCKS_LOCK:
        lock = _FORWARD_LOCKS.get(device)
        if lock is None:
            lock = _FORWARD_LOCKS[device] = threading.Lock()
        return lock


def _file_key(path: str) -> tuple:
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ModelError(f"model file not found: {str(p)!r}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {str(p)!r}: {exc}") from exc
    if not p.is_file():
        raise ModelError(f"model path {str(p)!r} is not a file")
    return (str(p.resolve()), st.st_mtime_ns, st.st_size)


def _load_torchscript(path: str, device: str):
    torch = _torch()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; still the portable format
            module = torch.jit.load(path, map_location=device)
    except Exception as exc:
        raise ModelError(
            f"cannot load TorchScript model {path!r}: {exc.__class__.__name__}: {str(exc).strip()[:300]}. "
            "If it is a state_dict, use {'state_dict': {'path': ..., 'architecture': {'unet': {...}}}}") from exc
    return module


def _load_exported(path: str, device: str):
    """The module of a ``torch.export`` program (``.pt2``), moved to ``device``."""
    torch = _torch()
    try:
        program = torch.export.load(path)
    except Exception as exc:
        raise ModelError(
            f"cannot load exported program {path!r} (torch.export.load): {exc.__class__.__name__}: "
            f"{str(exc).strip()[:300]}") from exc
    module = program.module()
    module.tileseg_conventions = _exported_conventions(program)
    return module.to(device)


def _exported_conventions(program) -> dict:
    """``in_channels``/``out_channels`` and a fixed patch size read from an exported program's signature."""
    found: dict = {}
    try:
        inputs = [n for n in program.graph.nodes if n.op == "placeholder"
                  and n.name in set(program.graph_signature.user_inputs)]
        outputs = [n for n in program.graph.nodes if n.op == "output"]
        shape = tuple(inputs[0].meta["val"].shape)
        out = outputs[0].args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        oshape = tuple(out.meta["val"].shape)
    except Exception:  # an unusual signature: the dry forward checks the model instead
        return found
    static = [isinstance(d, int) for d in shape]
    found["shape"] = tuple(d if ok else None for d, ok in zip(shape, static))
    found["out_shape"] = tuple(d if isinstance(d, int) else None for d in oshape)
    return found


def _load_state_dict(path: str) -> dict:
    torch = _torch()
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"cannot load weights file {path!r} (torch.load with weights_only=True): "
            f"{exc.__class__.__name__}: {str(exc).strip()[:300]}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # a training checkpoint wrapping the state_dict
    if not isinstance(state, dict):
        raise ModelError(f"weights file {path!r} holds a {type(state).__name__}, not a state_dict")
    return state


def _build_architecture(name: str, config: dict, weights: str | None, device: str):
    from .. import registry

    if name.startswith("python:"):  # a ``python:`` model kind: the user's own callable
        from .zoo import import_target

        builder = import_target(name[len("python:"):])
    else:
        builder = registry.get("architectures", name)
    try:
        module = builder(**config)
    except (ConfigError, ModelError):
        raise
    except TypeError as exc:
        raise ConfigError(f"model {name!r}: bad parameters {config!r}: {exc}") from exc
    if weights is not None:
        state = _load_state_dict(weights)
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"weights file {weights!r} does not fit model {name!r} {config!r}: {str(exc)[:500]}") from exc
    return module.to(device)


def _conv_layers(module) -> list:
    """Convolution-like submodules in registration order (eager or TorchScript)."""
    torch = _torch()
    convs = []
    for sub in module.modules():
        name = getattr(sub, "original_name", type(sub).__name__)
        if isinstance(sub, torch.nn.modules.conv._ConvNd) or re.fullmatch(r"Conv(Transpose)?[123]d", name):
            convs.append((name, sub))
    return convs


def _int_attr(obj, name: str) -> int | None:
    try:
        value = getattr(obj, name)
    except Exception:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _infer_channels(module) -> tuple[int | None, int | None]:
    """``in_channels``/``out_channels`` from the module's attributes or its first/last conv."""
    cin, cout = _int_attr(module, "in_channels"), _int_attr(module, "out_channels")
    if cin is not None and cout is not None:
        return cin, cout
    convs = _conv_layers(module)
    if not convs:
        return cin, cout
    if cin is None:
        name, first = convs[0]
        cin = _int_attr(first, "in_channels")
        if cin is None and hasattr(first, "weight"):
            w = first.weight
            groups = _int_attr(first, "groups") or 1
            cin = int(w.shape[0] if "Transpose" in name else w.shape[1] * groups)
    if cout is None:
        name, last = convs[-1]
        cout = _int_attr(last, "out_channels")
        if cout is None and hasattr(last, "weight"):
            w = last.weight
            groups = _int_attr(last, "groups") or 1
            cout = int(w.shape[1] * groups if "Transpose" in name else w.shape[0])
    return cin, cout


def _plain(conv: Any) -> bool:
    """Whether the model's output already is ``(N, K, *patch)`` logits (nothing for the conventions to convert)."""
    return not conv.channels_last and conv.output_stride == 1 and conv.activation in (None, "softmax")


class TorchPredictor(Predictor):
    """Run a PyTorch model on batches ``(N, C, *patch)`` -> ``(N, K, *patch)`` float32.

    Build it with :meth:`from_torchscript`, :meth:`from_architecture`, or
    directly from an in-memory ``torch.nn.Module``. Usually
    :func:`tileseg.predictors.load_predictor` does this.

    Parameters
    ----------
    module : torch.nn.Module
        The model (moved to ``device`` and set to eval mode on first use).
    device : str, optional
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when available
        in the process that runs the forward, else CPU.
    precision : {"fp32", "fp16", "bf16"}
        ``fp16``/``bf16`` run the forward under ``torch.autocast``; the output
        is always float32.
    in_channels, out_channels : int, optional
        Override the channel counts read from the model.
    serialize : bool
        Hold a process-wide per-device lock around each forward (see the
        module docstring).

    Raises
    ------
    ConfigError
        For an unknown precision.

    Examples
    --------
    >>> import numpy as np, torch
    >>> p = TorchPredictor(torch.nn.Conv2d(1, 2, 3, padding=1), device="cpu")
    >>> p.in_channels, p.out_channels
    (1, 2)
    >>> p(np.zeros((4, 1, 16, 16), np.float32)).shape
    (4, 2, 16, 16)
    """

    def __init__(self, module: Any = None, *, device: str | None = None, precision: str = "fp32",
                 in_channels: int | None = None, out_channels: int | None = None,
                 serialize: bool = True, conventions: Conventions | None = None,
                 _source: tuple | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision: must be one of {PRECISIONS}, got {precision!r}")
        self.device = device
        self.precision = precision
        self.serialize = serialize
        self._source = _source if _source is not None else ("module",)
        self._module = module
        self._ready: tuple | None = None  # (module, resolved device) once prepared in this process
        if module is None and self._source[0] == "module":
            raise ModelError("TorchPredictor needs a module or a file to load it from")
        loaded = self._get_module(probe=True)[0]
        conv = conventions if conventions is not None else Conventions()
        declared = dict(getattr(loaded, "tileseg_conventions", None) or {})
        sig_in, sig_out = declared.pop("shape", None), declared.pop("out_shape", None)
        self.conventions = conv = conv.with_defaults(**declared)
        cin, cout = _infer_channels(loaded)
        if sig_in is not None and len(sig_in) >= 3:  # an exported program's signature
            cin = sig_in[-1] if conv.channels_last else sig_in[1]
            spatial = sig_in[1:-1] if conv.channels_last else sig_in[2:]
            if all(d is not None for d in spatial) and "patch_size" not in conv.explicit:
                self.conventions = conv = conv.with_defaults(patch_size=tuple(spatial))
            if sig_out is not None and len(sig_out) == len(sig_in):
                cout = sig_out[-1] if conv.channels_last else sig_out[1]
        self.in_channels = in_channels if in_channels is not None else cin
        self.out_channels = out_channels if out_channels is not None else cout
        names = getattr(loaded, "tileseg_class_names", None)
        self.class_names = tuple(names) if names else None
        rf = getattr(loaded, "receptive_field", None)
        self.receptive_field = tuple(int(r) for r in rf) if isinstance(rf, (tuple, list)) and rf else None
        self.size_divisor = _int_attr(loaded, "size_divisor")

    # -- constructors -----------------------------------------------------------------------
    @classmethod
    def from_torchscript(cls, path: str | os.PathLike, **kwargs: Any) -> TorchPredictor:
        """Predictor for a TorchScript file (``torch.jit.save``); loaded now to check it.

        Raises
        ------
        ModelError
            If the file is missing or not a TorchScript archive (message names it).
        """
        return cls(None, _source=("torchscript", os.fspath(path)), **kwargs)

    @classmethod
    def from_exported(cls, path: str | os.PathLike, **kwargs: Any) -> TorchPredictor:
        """Predictor for a ``torch.export`` program (``torch.export.save``, ``.pt2``); loaded now to check it.

        Raises
        ------
        ModelError
            If the file is missing or not an exported program (message names it).
        """
        return cls(None, _source=("exported", os.fspath(path)), **kwargs)

    @classmethod
    def from_architecture(cls, name: str, config: dict | None = None, weights: str | os.PathLike | None = None,
                          **kwargs: Any) -> TorchPredictor:
        """Predictor for a registered architecture (e.g. ``"unet"``) plus optional state_dict file.

        The weights are read with ``torch.load(path, map_location="cpu",
        weights_only=True)`` and loaded strictly.

        Raises
        ------
        ModelError
            If the weights file is missing, corrupt or does not fit the model.
        ConfigError
            If ``config`` does not fit the architecture.
        """
        config = dict(config or {})
        weights = os.fspath(weights) if weights is not None else None
        return cls(None, _source=("arch", name, config, weights), **kwargs)

    # -- loading ----------------------------------------------------------------------------
    def _cache_key(self, device: str) -> tuple:
        kind = self._source[0]
        if kind in ("torchscript", "exported"):
            return (kind, *_file_key(self._source[1]), device, self.precision)
        _, name, config, weights = self._source
        wkey = _file_key(weights) if weights is not None else None
        return ("arch", name, json.dumps(config, sort_keys=True, default=str), wkey, device, self.precision)

    def _get_module(self, probe: bool = False) -> tuple[Any, str]:
        """The ready (eval mode, on device) module and its device; loaded once per process.

        With ``probe`` (at construction, usually in the client), a CUDA device
        that this process cannot see is replaced by the CPU, so the file is
        still checked here while the workers later load it on their GPU.
        """
        ready = self._ready
        if ready is not None:
            return ready
        device = resolve_device(self.device)
        if probe and device.startswith("cuda") and not _torch().cuda.is_available():
            module = self._load("cpu") if self._source[0] != "module" else self._module
            return module, "cpu"
        if self._source[0] == "module":
            module = self._module.to(device).eval()
            counters.add("model_loads", type(module).__name__)  # one copy per unpickled predictor
        else:
            module = self._module = self._load(device)
        self._ready = (module, device)
        return self._ready

    def _load(self, device: str):
        key = self._cache_key(device)
        with _CACHE_LOCK:
            module = _CACHE.get(key)
            if module is None:
                if self._source[0] == "torchscript":
                    module = _load_torchscript(self._source[1], device)
                elif self._source[0] == "exported":
                    module = _load_exported(self._source[1], device)
                else:
                    module = _build_architecture(*self._source[1:], device=device)
                if self._source[0] != "exported":  # an exported program's module has no eval mode to set
                    module.eval()
                _CACHE[key] = module
                counters.add("model_loads", str(key[1]))
                log.debug("loaded model %s on %s", key[1], device)
        return module

    @property
    def module(self):
        """The loaded torch module (loads it in this process if needed)."""
        return self._get_module()[0]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_ready"] = None
        if self._source[0] != "module":
            state["_module"] = None  # reloaded from the worker's cache, never pickled
        return state

    # -- running ----------------------------------------------------------------------------
    def _check_batch(self, batch: np.ndarray) -> None:
        self.conventions.check_batch(batch)
        if self.in_channels is not None and batch.shape[1] != self.in_channels:
            raise ModelError(f"model expects {self.in_channels} input channels, image has {batch.shape[1]}")
        div = self.size_divisor
        if div and any(s % div for s in batch.shape[2:]):
            raise ModelError(f"model needs patch sizes divisible by {div}, got {tuple(batch.shape[2:])!r}")

    def predict_tensor(self, batch: np.ndarray) -> Any:
        """Forward a batch; the float32 output stays a tensor on the model's device.

        The engine's stitching uses this to weight and accumulate predictions
        where they are (see :mod:`tileseg.stitching.accumulate`) instead of
        copying every batch to a NumPy array first.

        Parameters
        ----------
        batch : numpy.ndarray
            ``(N, C, *patch)``, converted to float32.

        Returns
        -------
        torch.Tensor or numpy.ndarray
            ``(N, K, *patch)`` float32 logits: a tensor on the device the forward
            ran on, or a NumPy array when the model's conventions (channels-last
            layout, probabilities out, an output stride) are converted on the host.

        Raises
        ------
        ModelError
            Wrong channel count, patch size, output shape, or a failing forward.
        """
        torch = _torch()
        batch = np.asarray(batch, dtype=np.float32)
        self._check_batch(batch)
        conv = self.conventions
        shape = batch.shape
        batch = conv.model_input(batch)
        if not batch.flags.writeable:
            batch = np.array(batch, dtype=np.float32, order="C")
        module, device = self._get_module()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        device_type = torch.device(device).type
        lock = _forward_lock(device) if self.serialize else nullcontext()
        try:
            with lock, torch.inference_mode():
                x = torch.from_numpy(batch).to(device)
                amp = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
                with amp:
                    y = module(x)
                out = select_output(y, conv.output, torch.is_tensor).float()
        except ModelError:
            raise
        except (RuntimeError, torch.jit.Error) as exc:  # torch.jit.Error is not a RuntimeError
            m = _CHANNEL_MSG.search(str(exc))
            if m:
                raise ModelError(f"model expects {m.group(1)} input channels, image has {m.group(2)}") from exc
            raise ModelError(
                f"model forward failed on a batch of shape {batch.shape!r}: {str(exc).strip()[-500:]}") from exc
        if not (_plain(conv) and out.ndim == len(shape) and out.shape[0] == shape[0]
                and tuple(out.shape[2:]) == tuple(shape[2:])):
            return conv.engine_output(out.cpu().numpy(), shape)  # converts, or words the shape error
        return out

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        out = self.predict_tensor(batch)
        return out if isinstance(out, np.ndarray) else out.cpu().numpy()

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "torch", "source": self._source[0], "precision": self.precision,
                             "device": self.device or "auto",
                             "in_channels": self.in_channels, "out_channels": self.out_channels,
                             "conventions": self.conventions.as_dict()}
        if self._source[0] in ("torchscript", "exported"):
            d["path"] = self._source[1]
        elif self._source[0] == "arch":
            d.update(architecture=self._source[1], config=self._source[2], weights=self._source[3])
        else:
            d["module"] = type(self._module).__name__
        return d
