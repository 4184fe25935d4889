"""Typed pipeline specification (pydantic v2), one model per YAML section.

Every section forbids unknown keys and is strict about types (``"256"`` is
not an integer). :func:`tileseg.config.load_pipeline` turns validation
errors into one :class:`~tileseg.errors.ConfigError` listing every problem
as ``yaml.path: reason``.

Schema (version 1)
------------------
.. code-block:: yaml

    version: 1                      # required, must be 1
    description: "optional free text"
    input:
      path: "data/scenes/*.zarr"    # file, directory, glob, URL, or a list of them
      reader: auto                  # reader name from the registry, or auto
      array: image                  # array inside a group/container (optional)
      level: 0                      # multiscale level, 0 = full resolution
      options: {}                   # extra reader-specific keyword arguments
    preprocess: [zscore]            # steps: a name or a one-key mapping {name: {params}}
    tiling:                         # required with model:; with method: only chunks apply
      patch_size: [256, 256]        # 2 or 3 positive ints (required with model:)
      overlap: 0.25                 # fraction of the patch, 0 <= overlap < 1 (default 0.25)
      # overlap_px: [32, 32]        # ... or pixels per axis, 0 <= px < patch; never both
      blend: gaussian               # gaussian | hann | constant | crop
      chunks: [1024, 1024]          # output chunk per spatial axis (optional)
      pad_mode: reflect             # reflect | constant | edge | symmetric (axes shorter than the patch)
    model:                          # exactly one of model: / method:
      torchscript: models/unet2d.pt # or state_dict: weights.pt + architecture: {unet: {in_channels: 1, ...}}
      batch_size: 16                # > 0
      precision: fp32               # fp32 | fp16 | bf16
      device: auto                  # auto (CUDA when present) | cpu | cuda | cuda:N | mps
      classes: [background, object] # optional names, one per output channel (2 for a 1-channel model)
    # method: {otsu: {}}            # a registered classical method ("methods" registry)
    postprocess: [argmax]           # steps: a name or {name: {params}}
    output:
      path: "out/{stem}_seg.zarr"   # template: {stem} file name without image suffixes (.zarr, .ome.zarr,
                                    # .nii.gz, ...), {name} full file name, {index} 0-based position in
                                    # the input list (format specs allowed: {index:04d}); unique per item
      writer: zarr                  # writer name from the registry
      overwrite: false              # replace outputs not recorded by an earlier run into this folder
      options: {}                   # extra writer-specific keyword arguments
    execution:
      scheduler: threads            # threads | processes | synchronous | local | tcp://host:port
      workers: 2                    # dask workers (threads or processes)
      threads_per_worker: 1         # for scheduler: local
      resources: {GPU: 1}           # per-worker resources (scheduler: local); model tasks are annotated
    evaluate:                       # optional: Dice per class against a reference label image
      reference: {path: null, array: labels}   # path (template fields allowed) defaults to the input;
                                    # the output must hold labels (argmax/threshold)

Postprocess semantics with a model: a first step ``argmax`` (no parameters)
or ``threshold`` (``value: 0.5``, the default) makes the engine reduce each
output chunk to labels itself (``segment(output="labels")``, the cheapest
path); ``threshold`` with another scalar ``value`` (0 < value < 1) thresholds
the foreground probability of a one- or two-class model (uint8 labels). Otherwise the engine writes
``probabilities`` ``(K, *spatial)`` and every step, a first ``argmax`` /
``threshold`` with other parameters included, is a registered ``postprocess``
callable ``f(data, *, spacing, **params)`` applied lazily in order. With a
method, every step is a registered callable. Step names and parameters are
checked against :mod:`tileseg.registry` when the pipeline is validated.

Preprocessing applies before the model or the method. With a method,
``tiling.chunks`` (if given) rechunks the input; the other tiling keys are
for models.

Relative paths (input, model weights, output, reference) are resolved against
the pipeline file's directory by the loader.

Next to the outputs (their common folder) a run writes ``tileseg-run.json``
(the resume manifest) and ``tileseg-report.json`` (see :mod:`tileseg.run`).
"""

from __future__ import annotations

import difflib
import inspect
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: Placeholders allowed in output / reference path templates.
TEMPLATE_FIELDS = ("stem", "name", "index")
#: Postprocess steps the runner implements itself (first step after a model).
MODEL_REDUCTIONS = ("argmax", "threshold")
#: Keys of ``model:`` that name the weights.
MODEL_SOURCES = ("torchscript", "state_dict")
#: Named schedulers; anything else must be a ``tcp://`` or ``tls://`` address.
SCHEDULERS = ("threads", "processes", "synchronous", "local")


class _Section(BaseModel):
    """Base of every section: unknown keys and type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


# --------------------------------------------------------------------------- helpers


def _suggest(name: str, names: list[str] | tuple[str, ...]) -> str:
    near = difflib.get_close_matches(name, list(names), n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


def _step_pair(raw: Any, what: str) -> tuple[str, dict[str, Any]]:
    """Normalise a step written as ``name`` or ``{name: {params}}``."""
    if isinstance(raw, str):
        return raw, {}
    if isinstance(raw, dict):
        if len(raw) != 1:
            raise ValueError(
                f"a {what} step must be a name or a mapping with one key {{name: {{params}}}} "
                f"(got keys {sorted(map(str, raw))!r})"
            )
        (name, params), = raw.items()
        if not isinstance(name, str):
            raise ValueError(f"{what} step name must be a string (got {name!r})")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"parameters of {what} step {name!r} must be a mapping (got {params!r})")
        bad = [k for k in params if not isinstance(k, str)]
        if bad:
            raise ValueError(f"parameter names of {what} step {name!r} must be strings (got {bad[0]!r})")
        return name, dict(params)
    raise ValueError(f"a {what} step must be a name or a one-key mapping (got {raw!r})")


def _load_plugins() -> None:
    """Import the packages whose modules register classical methods/steps."""
    import importlib

    for pkg in ("tileseg.methods", "tileseg.postprocess", "tileseg.predictors"):
        try:
            importlib.import_module(pkg)
        except ImportError:  # pragma: no cover - package missing or its extra not installed
            pass


def _registry_names(kind: str) -> list[str]:
    from .. import registry

    _load_plugins()
    return registry.available(kind)


_SINGULAR = {"methods": "method", "postprocess": "postprocess step"}


def _check_params(kind: str, name: str, params: dict[str, Any]) -> None:
    """Reject parameters the registered plugin callable does not accept."""
    from .. import registry

    what = _SINGULAR.get(kind, kind)
    try:
        fn = registry.get(kind, name)
    except ImportError as exc:
        raise ValueError(f"{what} {name!r} cannot be loaded: {exc}") from exc
    check_call(fn, what, name, params)


def check_call(fn: Any, what: str, name: str, params: dict[str, Any]) -> None:
    """Check ``params`` against ``fn(data, **params)``'s signature.

    Unknown keywords (with the nearest accepted name) and missing required
    ones are errors; ``spacing`` is supplied by the runner. Callables taking
    ``**kwargs`` accept anything.

    Raises
    ------
    ValueError
        Naming the parameter and the step.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    ps = list(sig.parameters.values())[1:]  # the first parameter is the data
    if any(p.kind is p.VAR_KEYWORD for p in ps):
        return
    accepted = [p.name for p in ps if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "spacing"]
    for key in params:
        if key not in accepted:
            raise ValueError(
                f"unknown parameter {key!r} for {what} {name!r}{_suggest(key, accepted)} "
                f"(accepted: {', '.join(accepted) or 'none'})"
            )
    missing = [p.name for p in ps if p.name in accepted and p.default is p.empty and p.name not in params]
    if missing:
        raise ValueError(f"{what} {name!r} needs parameter(s) {', '.join(missing)}")


def check_template(template: str, what: str = "path") -> str:
    """Check that a path template only uses :data:`TEMPLATE_FIELDS`.

    Raises
    ------
    ValueError
        On an unknown or positional placeholder, a format spec error or
        unbalanced braces.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid {what} template {template!r}: {exc}") from exc
    for _, field, _, _ in parsed:
        if field is None:
            continue
        base = re.split(r"[.\[]", field, maxsplit=1)[0]
        if base not in TEMPLATE_FIELDS or base != field:
            raise ValueError(
                f"unknown placeholder {{{field}}} in {what} template {template!r}"
                f"{_suggest(base, TEMPLATE_FIELDS)} (allowed: {{stem}}, {{name}}, {{index}})"
            )
    return template


def steps_of(raw: list[dict[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, params), ...]`` from a normalised step list."""
    return [next(iter(s.items())) for s in raw]


# --------------------------------------------------------------------------- sections


class InputConfig(_Section):
    """``input:`` which images to read and how."""

    path: list[str]
    reader: str = "auto"
    array: str | None = None
    level: int = Field(default=0, ge=0)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if not v:
                raise ValueError("must name at least one path")
            for p in v:
                if not isinstance(p, str) or not p:
                    raise ValueError(f"paths must be non-empty strings (got {p!r})")
            return v
        raise ValueError(f"must be a path, glob, URL or a list of them (got {v!r})")

    @field_validator("reader")
    @classmethod
    def _known_reader(cls, v: str) -> str:
        if v == "auto":
            return v
        names = _registry_names("readers")
        if v not in names:
            raise ValueError(f"unknown reader {v!r}{_suggest(v, names)} (installed: auto, {', '.join(names)})")
        return v


class TilingConfig(_Section):
    """``tiling:`` patch grid, blending and output chunks."""

    patch_size: list[int] | None = None
    overlap: float | None = None
    overlap_px: list[int] | None = None
    blend: Literal["gaussian", "hann", "constant", "crop"] = "gaussian"
    chunks: list[int] | None = None
    pad_mode: Literal["reflect", "constant", "edge", "symmetric"] = "reflect"

    @field_validator("patch_size")
    @classmethod
    def _patch(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if len(v) not in (2, 3):
            raise ValueError(f"must have 2 (2D) or 3 (3D) entries (got {v!r})")
        if any(p <= 0 for p in v):
            raise ValueError(f"every entry must be > 0 (got {v!r})")
        return v

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 <= v < 1.0):
            raise ValueError(f"must be >= 0 and < 1 (got {v!r})")
        return v

    @field_validator("chunks")
    @classmethod
    def _chunks(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(c <= 0 for c in v):
            raise ValueError(f"every entry must be > 0 (got {v!r})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TilingConfig:
        if self.patch_size is None:  # a method pipeline: only chunks matter
            if self.chunks is not None and len(self.chunks) not in (2, 3):
                raise ValueError(f"chunks needs 2 or 3 entries (got {self.chunks!r})")
            if self.overlap_px is not None:
                raise ValueError("overlap_px needs patch_size")
            return self
        n = len(self.patch_size)
        if self.overlap is not None and self.overlap_px is not None:
            raise ValueError(
                f"overlap and overlap_px are mutually exclusive; give one of them "
                f"(got overlap={self.overlap!r}, overlap_px={self.overlap_px!r})"
            )
        if self.overlap_px is not None:
            if len(self.overlap_px) != n:
                raise ValueError(f"overlap_px needs {n} entries like patch_size (got {self.overlap_px!r})")
            for o, p in zip(self.overlap_px, self.patch_size):
                if not 0 <= o < p:
                    raise ValueError(
                        f"overlap_px entries must be >= 0 and < the patch size "
                        f"(got overlap_px={self.overlap_px!r}, patch_size={self.patch_size!r})"
                    )
        elif self.overlap is None:
            self.overlap = 0.25
        if self.chunks is not None and len(self.chunks) != n:
            raise ValueError(f"chunks needs {n} entries like patch_size (got {self.chunks!r})")
        return self


class ModelConfig(_Section):
    """``model:`` a trained network and how to run it."""

    torchscript: str | None = None
    state_dict: str | None = None
    architecture: dict[str, dict[str, Any]] | None = None
    batch_size: int = Field(default=8, gt=0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str = "auto"
    classes: list[str] | None = None

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one class")
            if len(set(v)) != len(v):
                raise ValueError(f"class names must be unique (got {v!r})")
        return v

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
        if v is not None:
            if len(v) != 1:
                raise ValueError(f"must be a one-key mapping {{name: {{params}}}} (got keys {sorted(v)!r})")
            name = next(iter(v))
            names = _registry_names("models")
            if name not in names:
                raise ValueError(f"unknown architecture {name!r}{_suggest(name, names)} "
                                 f"(installed: {', '.join(names) or 'none'})")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        given = [k for k in MODEL_SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(MODEL_SOURCES)} (got {', '.join(given) or 'none'})"
            )
        if self.state_dict is not None and self.architecture is None:
            raise ValueError("state_dict needs architecture: {unet: {...}} to build the network")
        if self.torchscript is not None and self.architecture is not None:
            raise ValueError("architecture only applies to state_dict (a TorchScript file carries its own)")
        return self

    @property
    def weights(self) -> str:
        """Path of the weights file."""
        return self.torchscript if self.torchscript is not None else str(self.state_dict)

    def predictor_spec(self) -> dict[str, Any]:
        """The spec passed to :func:`tileseg.predictors.load_predictor`."""
        if self.torchscript is not None:
            return {"torchscript": self.torchscript}
        assert self.architecture is not None
        (name, params), = self.architecture.items()
        return {name: dict(params), "weights": self.state_dict}


def _method_before(v: Any) -> Any:
    name, params = _step_pair(v, "method")
    names = _registry_names("methods")
    if name not in names:
        raise ValueError(
            f"unknown method {name!r}{_suggest(name, names)} (installed: {', '.join(names) or 'none'})"
        )
    _check_params("methods", name, params)
    return {name: params}


class OutputConfig(_Section):
    """``output:`` where and how to write each item's result."""

    path: str
    writer: str = "zarr"
    overwrite: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("path")
    @classmethod
    def _template(cls, v: str) -> str:
        if not v:
            raise ValueError("must not be empty")
        return check_template(v, "output")

    @field_validator("writer")
    @classmethod
    def _known_writer(cls, v: str) -> str:
        names = _registry_names("writers")
        if v not in names:
            raise ValueError(f"unknown writer {v!r}{_suggest(v, names)} (installed: {', '.join(names)})")
        return v


class ExecutionConfig(_Section):
    """``execution:`` which Dask scheduler runs the graph."""

    scheduler: str = "threads"
    workers: int | None = Field(default=None, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)
    malloc_arenas: int | None = Field(default=1, gt=0)

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler(v)

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for k, n in v.items():
            if n <= 0:
                raise ValueError(f"resource {k!r} must be > 0 (got {n!r})")
        return v


def check_scheduler(v: str) -> str:
    """Validate a scheduler name or address (also used for CLI overrides)."""
    if v in SCHEDULERS or re.fullmatch(r"(tcp|tls)://[^\s/]+(:\d+)?/?", v):
        return v
    raise ValueError(
        f"must be one of {', '.join(SCHEDULERS)} or a scheduler address tcp://host:port "
        f"(got {v!r}){_suggest(v, SCHEDULERS)}"
    )


class ReferenceConfig(_Section):
    """``evaluate.reference:`` the ground-truth label image."""

    path: str | None = None
    array: str | None = None
    reader: str = "auto"
    level: int = Field(default=0, ge=0)

    @field_validator("path")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        return None if v is None else check_template(v, "reference")


class EvaluateConfig(_Section):
    """``evaluate:`` score each output against a reference (Dice per class)."""

    reference: ReferenceConfig


class PipelineConfig(_Section):
    """A whole pipeline file. See the module docstring for the schema."""

    version: int
    description: str | None = None
    input: InputConfig
    preprocess: list[dict[str, dict[str, Any]]] = Field(default_factory=list)
    tiling: TilingConfig | None = None
    model: ModelConfig | None = None
    method: dict[str, dict[str, Any]] | None = None
    postprocess: list[dict[str, dict[str, Any]]] = Field(default_factory=list)
    output: OutputConfig
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    evaluate: EvaluateConfig | None = None

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"must be 1 (got {v!r}); this tileseg reads version 1 pipelines")
        return v

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(f"must be a list of steps (got {v!r})")
        known = _preprocess_steps()
        out = []
        for i, raw in enumerate(v):
            try:
                name, params = _step_pair(raw, "preprocess")
                if known is not None and name not in known:
                    raise ValueError(f"unknown preprocess step {name!r}{_suggest(name, sorted(known))} "
                                     f"(known: {', '.join(sorted(known))})")
                if known is not None:
                    check_call(known[name], "preprocess step", name, params)
            except ValueError as exc:
                raise ValueError(f"step {i}: {exc}") from None
            out.append({name: params})
        return out

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        return None if v is None else _method_before(v)

    @field_validator("postprocess", mode="before")
    @classmethod
    def _postprocess(cls, v: Any) -> Any:
        if v is None:
            return []
        if not isinstance(v, list):
            raise ValueError(f"must be a list of steps (got {v!r})")
        names = _registry_names("postprocess")
        out = []
        for i, raw in enumerate(v):
            try:
                name, params = _step_pair(raw, "postprocess")
                if name in MODEL_REDUCTIONS and name not in names:
                    pass  # checked with the whole pipeline (position, model or method)
                elif name not in names:
                    allowed = sorted(set(names) | set(MODEL_REDUCTIONS))
                    raise ValueError(f"unknown postprocess step {name!r}{_suggest(name, allowed)} "
                                     f"(installed: {', '.join(allowed)})")
                else:
                    _check_params("postprocess", name, params)
            except ValueError as exc:
                raise ValueError(f"step {i}: {exc}") from None
            out.append({name: params})
        return out

    @model_validator(mode="after")
    def _whole(self) -> PipelineConfig:
        problems = []
        if (self.model is None) == (self.method is None):
            problems.append("give exactly one of model: or method:")
        if self.model is not None and (self.tiling is None or self.tiling.patch_size is None):
            problems.append("tiling.patch_size: required when a model is given")
        registered = set(_registry_names("postprocess"))
        for i, (name, params) in enumerate(steps_of(self.postprocess)):
            if name not in MODEL_REDUCTIONS:
                continue
            if name not in registered:
                if self.model is None:
                    problems.append(f"postprocess[{i}]: {name!r} applies to model outputs only")
                elif i != 0:
                    problems.append(f"postprocess[{i}]: {name!r} must be the first postprocess step")
                else:
                    try:
                        _check_reduction(name, params)
                    except ValueError as exc:
                        problems.append(f"postprocess[{i}]: {exc}")
            elif self.model is not None and i == 0 and name == "threshold" and set(params) <= {"value"}:
                try:
                    _check_reduction(name, params)
                except ValueError as exc:
                    problems.append(f"postprocess[{i}]: {exc}")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ------------------------------------------------------------------ helpers
    def postprocess_steps(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, params), ...]`` of the postprocess steps."""
        return steps_of(self.postprocess)

    def method_step(self) -> tuple[str, dict[str, Any]] | None:
        """``(name, params)`` of the method, or ``None`` with a model."""
        return None if self.method is None else steps_of([self.method])[0]

    def model_output(self) -> tuple[str, float | None, list[tuple[str, dict[str, Any]]]]:
        """How the runner drives the engine for a model pipeline.

        Returns
        -------
        output : str
            ``"labels"`` or ``"probabilities"`` for :func:`tileseg.graph.segment`.
        threshold : float or None
            A threshold other than 0.5 to apply to a one-class probability map.
        rest : list of (name, params)
            The remaining registered postprocess steps.
        """
        steps = self.postprocess_steps()
        if steps:
            name, params = steps[0]
            if name == "argmax" and not params:
                return "labels", None, steps[1:]
            value = params.get("value", 0.5)
            if name == "threshold" and set(params) <= {"value"} and isinstance(value, (int, float)):
                if value == 0.5:
                    return "labels", None, steps[1:]
                return "probabilities", float(value), steps[1:]
        return "probabilities", None, steps


def _check_reduction(name: str, params: dict[str, Any]) -> None:
    if name == "argmax" and params:
        raise ValueError(f"argmax takes no parameters (got {sorted(params)!r})")
    if name == "threshold":
        extra = set(params) - {"value"}
        if extra:
            raise ValueError(f"unknown parameter {sorted(extra)[0]!r} for threshold (accepted: value)")
        value = params.get("value", 0.5)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            raise ValueError(f"threshold value must be a number > 0 and < 1 (got {value!r})")


def _preprocess_steps() -> dict[str, Any] | None:
    """The preprocessing steps by name, or ``None`` when the module is missing."""
    try:
        from ..preprocess import STEPS
    except ImportError:  # pragma: no cover - partial installs
        return None
    return dict(STEPS)
