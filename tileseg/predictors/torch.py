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

On the CPU the serialised forwards also run on one thread of their own (one
per process), whichever Dask thread asks for them. A forward's activations
come from the C heap of the thread that runs it (glibc gives each thread its
own malloc arena) and are freed when it ends; run by every Dask thread in
turn, each thread's arena kept the high-water mark of a whole forward (about
260 MiB for the demo 2D U-Net at batch 8), and peak RSS of code embedding
:func:`tileseg.segment` grew as more of them got there (+14% from 2048^2 to
8192^2 in ``benchmarks/bench_memory.py``). One model thread reuses the same
memory for every batch, with the allocator left as it is.

Speed options
-------------
``precision`` runs the forward under ``torch.autocast`` (fp16/bf16; bf16
autocast works on the CPU too). ``channels_last`` converts the model and
its input to the channels-last memory format. ``compile`` wraps the model
with ``torch.compile`` once per worker process; when compiling is not
possible there (no compiler, an unsupported model) the predictor warns once
and runs the eager model. On CUDA ``cudnn.benchmark`` is switched on (fixed
patch sizes are its best case), batches travel through pinned host buffers
on a side stream, overlapped with the forwards of other threads
(:mod:`tileseg.predictors.cuda_io`). ``tta`` folds flipped copies into the
batch on the device (:mod:`tileseg.predictors.tta`). On device
out-of-memory the batch is halved and the size that fits is kept by the
worker process (:mod:`tileseg.predictors.oom`). The engine calls
:meth:`TorchPredictor.predict_tensor`, whose output stays on the device:
weighting, accumulation and the reduction of each block's interior run
there, and only labels and the strips where blocks meet come back to the
host (:mod:`tileseg.stitching.handover`).
"""

from __future__ import annotations

import contextvars
import copy
import json
import logging
import os
import re
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from .. import counters
from ..errors import ConfigError, ModelError, require
from . import oom
from . import tta as tta_mod
from .base import Predictor
from .conventions import Conventions, select_output

log = logging.getLogger(__name__)

__all__ = ["TorchPredictor", "PRECISIONS", "resolve_device", "clear_cache"]

PRECISIONS = ("fp32", "fp16", "bf16")

_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()
_FORWARD_LOCKS: dict[str, threading.Lock] = {}
_FORWARD_LOCKS_LOCK = threading.Lock()
#: (predictor key, device) -> the module ``torch.compile`` made, or the eager module after a failed compile
_COMPILED: dict[tuple[str, str], Any] = {}

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
        _COMPILED.clear()


def _forward_lock(device: str) -> threading.Lock:
    with _FORWARD_LOCKS_LOCK:
        lock = _FORWARD_LOCKS.get(device)
        if lock is None:
            lock = _FORWARD_LOCKS[device] = threading.Lock()
        return lock


_MODEL_THREADS: dict[str, ThreadPoolExecutor] = {}


def _model_thread(device: str) -> ThreadPoolExecutor:
    """The one thread of this process that runs serialised forwards on ``device`` (see "Concurrency")."""
    with _FORWARD_LOCKS_LOCK:
        pool = _MODEL_THREADS.get(device)
        if pool is None:
            pool = _MODEL_THREADS[device] = ThreadPoolExecutor(1, thread_name_prefix=f"tileseg-model-{device}")
        return pool


def _forget_model_threads() -> None:
    """In a forked child: the parent's model threads do not exist there (a new one starts on first use)."""
    _MODEL_THREADS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_model_threads)


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


def _channels_last_format(module) -> Any:
    """``channels_last`` for 2D models, ``channels_last_3d`` for 3D ones (by their first convolution)."""
    torch = _torch()
    convs = _conv_layers(module)
    w = getattr(convs[0][1], "weight", None) if convs else None
    return torch.channels_last_3d if w is not None and w.ndim == 5 else torch.channels_last


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
    tta : sequence of str
        Flip test-time augmentation over these axes (``"x"``, ``"y"``,
        ``"z"``; every combination, folded into the batch on the device,
        averaged as logits). Empty: none.
    channels_last : bool
        Run model and input in the channels-last memory format.
    compile : bool
        ``torch.compile`` the model (once per worker process; eager with a
        warning when compiling fails).
    cudnn_benchmark : bool
        Set ``torch.backends.cudnn.benchmark`` when the model runs on CUDA.

    Raises
    ------
    ConfigError
        For an unknown precision or flip axis.

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
                 serialize: bool = True, conventions: Conventions | None = None, tta: Any = (),
                 channels_last: bool = False, compile: bool = False, cudnn_benchmark: bool = True,
                 _source: tuple | None = None) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision: must be one of {PRECISIONS}, got {precision!r}")
        self.device = device
        self.precision = precision
        self.serialize = serialize
        self.tta = tta_mod.check_axes(tta, "model.tta")
        self.channels_last = bool(channels_last)
        self.compile = bool(compile)
        self.cudnn_benchmark = bool(cudnn_benchmark)
        self._key = uuid.uuid4().hex  # names this predictor in per-process tables (kept when pickled)
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

    def with_options(self, *, tta: Any = None, channels_last: bool | None = None, compile: bool | None = None,
                     cudnn_benchmark: bool | None = None) -> TorchPredictor:
        """A copy with other speed options (``None`` keeps the current value); the model is not reloaded.

        Examples
        --------
        >>> import torch
        >>> p = TorchPredictor(torch.nn.Conv2d(1, 2, 3, padding=1), device="cpu").with_options(tta=["x", "y"])
        >>> p.tta
        ('y', 'x')
        """
        new = copy.copy(self)
        if tta is not None:
            new.tta = tta_mod.check_axes(tta, "model.tta")
        if channels_last is not None:
            new.channels_last = bool(channels_last)
        if compile is not None:
            new.compile = bool(compile)
        if cudnn_benchmark is not None:
            new.cudnn_benchmark = bool(cudnn_benchmark)
        if (new.channels_last, new.cudnn_benchmark) != (self.channels_last, self.cudnn_benchmark):
            new._ready = None  # prepared again (memory format, cuDNN flag) on first use
        new._key = uuid.uuid4().hex
        return new

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
        torch = _torch()
        if self.channels_last:
            try:
                module = module.to(memory_format=_channels_last_format(module))
            except Exception as exc:  # e.g. an exported program's module
                warnings.warn(f"model.channels_last: cannot convert this model ({exc.__class__.__name__}: "
                              f"{str(exc)[:200]}); running it as it is", RuntimeWarning, stacklevel=3)
        if torch.device(device).type == "cuda" and self.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # fixed patch sizes: let cuDNN pick its fastest kernels
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
        """:meth:`__call__`, but the float32 logits stay a tensor on the model's device.

        The engine weights, accumulates and reduces them there
        (:mod:`tileseg.stitching.accumulate`), so on a GPU only what an output
        block needs crosses to the host, not every batch's ``K x patch``
        scores. The out-of-memory back-off (:mod:`.oom`) and TTA work as in
        :meth:`__call__`; the same code runs on the CPU (``device='cpu'``).

        Returns
        -------
        torch.Tensor
            ``(N, K, *patch)`` float32 logits on the model's device.
        """
        return self._run(batch, keep=True)

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch, keep=False)

    def _run(self, batch: np.ndarray, keep: bool) -> Any:
        """Check, lay out, forward in slices that fit (:mod:`.oom`) and convert; a tensor on the device with ``keep``."""
        batch = np.asarray(batch, dtype=np.float32)
        self._check_batch(batch)
        conv = self.conventions
        shape = batch.shape
        batch = conv.model_input(batch)
        if not batch.flags.writeable:
            batch = np.array(batch, dtype=np.float32, order="C")
        flips = self._flips(batch.ndim)
        device = self._get_module()[1]
        name = self._source[1] if self._source[0] != "module" else type(self._module).__name__
        out = oom.run_adaptive(lambda b: self._forward(b, flips, keep), batch, key=self._key, device=device,
                               name=str(name))
        return conv.engine_output(out, shape)

    def _flips(self, ndim: int) -> list[tuple[int, ...]]:
        """TTA flips as dimensions of the batch in the model's layout (channels first or last)."""
        flips = tta_mod.flip_sets(self.tta, ndim)
        if self.conventions.channels_last:  # (N, *patch, C): every spatial axis sits one place earlier
            flips = [tuple(d - 1 for d in f) for f in flips]
        return flips

    def _runnable(self, module: Any, device: str) -> Any:
        """``module``, or its ``torch.compile`` wrapper (made once per process and device)."""
        if not self.compile:
            return module
        key = (self._key, device)
        with _CACHE_LOCK:
            runnable = _COMPILED.get(key)
            if runnable is None:
                torch = _torch()
                try:
                    runnable = torch.compile(module)
                except Exception as exc:  # torch.compile missing or refusing this Python/platform
                    warnings.warn(f"model.compile: torch.compile is not available here "
                                  f"({exc.__class__.__name__}: {str(exc).strip()[:200]}); running the eager model",
                                  RuntimeWarning, stacklevel=3)
                    runnable = module
                _COMPILED[key] = runnable
        return runnable

    def _call_module(self, module: Any, x: Any, device: str) -> Any:
        """One forward: the compiled model when asked for, falling back to the eager one if compiling fails."""
        runnable = self._runnable(module, device)
        if runnable is module:
            return module(x)
        try:
            return runnable(x)
        except Exception as exc:
            if oom.is_out_of_memory(exc):
                raise
            y = module(x)  # the eager model works: compiling is what failed
            with _CACHE_LOCK:
                _COMPILED[(self._key, device)] = module
            warnings.warn(f"model.compile: torch.compile failed ({exc.__class__.__name__}: "
                          f"{str(exc).strip()[:300]}); running the eager model in this process", RuntimeWarning,
                          stacklevel=2)
            log.warning("torch.compile failed, running eager: %s", exc)
            return y

    def _forward(self, batch: np.ndarray, flips: list[tuple[int, ...]], keep: bool = False) -> Any:
        """One forward of ``batch`` (flipped copies folded in); errors other than out-of-memory -> ModelError.

        Returns a host array, or with ``keep`` the float32 output tensor left on the model's device.
        Serialised CPU forwards run on the process's model thread (see "Concurrency" above).
        """
        device = self._get_module()[1]
        if self.serialize and _torch().device(device).type == "cpu":
            pool = _model_thread(device)
            if not threading.current_thread().name.startswith("tileseg-model-"):
                ctx = contextvars.copy_context()  # the caller's context variables, as if it ran here
                return pool.submit(ctx.run, self._forward_here, batch, flips, keep, False).result()
            return self._forward_here(batch, flips, keep, False)
        return self._forward_here(batch, flips, keep, self.serialize)

    def _forward_here(self, batch: np.ndarray, flips: list[tuple[int, ...]], keep: bool, serialize: bool) -> Any:
        """:meth:`_forward` in this thread; ``serialize``: under the device's forward lock."""
        torch = _torch()
        module, device = self._get_module()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision)
        device_type = torch.device(device).type
        lock = _forward_lock(device) if serialize else nullcontext()
        fmt = ({4: torch.channels_last, 5: torch.channels_last_3d}.get(batch.ndim)
               if self.channels_last and not self.conventions.channels_last else None)
        try:
            with torch.inference_mode():
                if device_type == "cuda":
                    from . import cuda_io

                    x, stream = cuda_io.upload(batch, device)  # outside the lock: overlaps other forwards
                with lock:
                    if device_type == "cuda":
                        x = cuda_io.use(x, stream, device)
                    else:
                        x = torch.from_numpy(batch).to(device)
                    x = tta_mod.fold(x, flips)
                    if fmt is not None:
                        x = x.contiguous(memory_format=fmt)
                    amp = torch.autocast(device_type, dtype=dtype) if dtype is not None else nullcontext()
                    with amp:
                        y = self._call_module(module, x, device)
                    y = select_output(y, self.conventions.output, torch.is_tensor)
                    if len(flips) > 1 and y.ndim != x.ndim:
                        raise ModelError(f"model output shape {tuple(y.shape)!r} does not match input batch "
                                         f"{tuple(x.shape)!r}: TTA needs an output with the input's axes")
                    if y.ndim < 1 or y.shape[0] != x.shape[0]:
                        raise ModelError(f"model output shape {tuple(y.shape)!r} does not match input batch "
                                         f"{tuple(x.shape)!r}: expected (N, K, *patch) with the same N and patch")
                    y = tta_mod.unfold(y.float(), flips).contiguous()
                    if keep:  # stays on the device: stitched there (tileseg.stitching.accumulate)
                        out = y
                    elif device_type == "cuda":
                        host, done = cuda_io.download(y, stream)
                    else:
                        out = y.cpu().numpy()
                if device_type == "cuda" and not keep:
                    out = cuda_io.wait(host, done)  # after the lock: the next forward starts meanwhile
        except ModelError:
            raise
        except (RuntimeError, torch.jit.Error) as exc:  # torch.jit.Error is not a RuntimeError
            if oom.is_out_of_memory(exc):
                raise  # oom.run_adaptive halves the batch
            m = _CHANNEL_MSG.search(str(exc))
            if m:
                raise ModelError(f"model expects {m.group(1)} input channels, image has {m.group(2)}") from exc
            raise ModelError(
                f"model forward failed on a batch of shape {batch.shape!r}: {str(exc).strip()[-500:]}") from exc
        return out

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"type": "torch", "source": self._source[0], "precision": self.precision,
                             "device": self.device or "auto", "tta": list(self.tta),
                             "channels_last": self.channels_last, "compile": self.compile,
                             "in_channels": self.in_channels, "out_channels": self.out_channels,
                             "conventions": self.conventions.as_dict()}
        if self._source[0] in ("torchscript", "exported"):
            d["path"] = self._source[1]
        elif self._source[0] == "arch":
            d.update(architecture=self._source[1], config=self._source[2], weights=self._source[3])
        else:
            d["module"] = type(self._module).__name__
        return d
