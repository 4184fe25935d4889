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
      level: 0                      # multiscale level or overview: 0 = full resolution, -1 = coarsest
      axes: null                    # axis names of the stored array, e.g. cyx (overrides the file)
      nodata: null                  # pixel value meaning "no data" (overrides the file)
      aoi: null                     # area of interest: a mask raster or a vector file (.gpkg, .geojson);
                                    # outside it pixels are nodata (template fields allowed)
      nan_policy: error             # error | fill: NaN pixels raise, or become fill_value
      fill_value: 0.0               # for nan_policy: fill (and pad_mode: constant)
      options: {}                   # extra reader-specific keyword arguments
    preprocess: [zscore]            # steps: a name or a one-key mapping {name: {params}}
    tiling:                         # required with model:; with method: only chunks apply
      patch_size: [256, 256]        # 2 or 3 positive ints (required with model:)
      overlap: 0.25                 # fraction of the patch, 0 <= overlap < 1 (default 0.25)
      # overlap_px: [32, 32]        # ... or pixels per axis, 0 <= px < patch; never both
      blend: gaussian               # gaussian | hann | constant | crop
      chunks: [1024, 1024]          # output chunk per spatial axis (optional)
      pad_mode: reflect             # reflect | constant | edge | symmetric (axes shorter than the patch)
      skip_nodata: true             # patches whose pixels are all nodata/masked never reach the model
    model:                          # exactly one of model: / method:
      torchscript: {path: models/unet2d.pt}   # one model kind with its parameters, or e.g.
      # state_dict: {path: w.pt, architecture: {unet: {in_channels: 1, out_channels: 2}}}
      output: labels                # labels | probabilities | logits: what the engine makes
      batch_size: 16                # > 0
      precision: fp32               # fp32 | fp16 | bf16
      device: auto                  # auto (CUDA when present) | cpu | cuda | cuda:N | mps
      tta: []                       # flip test-time augmentation over these axes, e.g. [y, x] (z, y, x)
      channels_last: false          # channels-last memory format (torch models)
      compile: false                # torch.compile once per worker (eager with a warning if impossible)
      classes: [background, object] # optional names, one per class (2 for a 1-channel model)
      bad_output: error             # error | nodata: NaN/Inf in the model output fails the item naming the
                                    # patch box, or those pixels are written as nodata and counted
    # method: {otsu: {}}            # a registered classical method ("methods" registry)
    postprocess: []                 # steps: a name or {name: {params}}, applied to the result
    output:                         # one output, or outputs: [ ... ] for several
      path: "out/{stem}_seg.zarr"   # template: {stem} file name without image suffixes (.zarr, .ome.zarr,
                                    # .nii.gz, ...), {name} full file name, {index} 0-based position in
                                    # the input list (format specs allowed: {index:04d}); unique per item
      writer: zarr                  # writer name from the registry; default from the path's ending:
                                    # .tif cog, .nii/.nii.gz nifti, .dcm dicom_seg, .gpkg/.geojson vector, else zarr
      content: result               # result (after postprocess) | raw (model/method output before it)
      overwrite: false              # replace outputs not recorded by an earlier run into this folder
      options: {}                   # extra writer-specific keyword arguments
    execution:
      scheduler: threads            # threads | processes | synchronous | local | tcp://host:port
                                    # (not set: the caller's active distributed.Client if any, else threads)
      workers: 2                    # dask workers (threads or processes)
      threads_per_worker: 1         # for scheduler: local
      resources: {GPU: 1}           # resources model inference needs: only workers offering them run it
                                    # (scheduler local: every worker declares them; one worker per GPU)
      malloc_arenas: 1              # glibc malloc arenas per process (null: leave the allocator alone)
      malloc_mmap_threshold: null   # bytes: pin glibc's mmap threshold (trim at 4x): freed large blocks go back to
                                    # the OS (less RSS, e.g. 1048576), but every larger allocation is a fresh
                                    # mapping: 1.7x slower on the 2D U-Net benchmark; null: glibc's dynamic one
      memory_limit: 4GiB            # per worker (scheduler: local; default auto)
      max_items_in_flight: 1        # items processed at the same time (graph, statistics, writes overlap)
      retries: 0                    # task retries on a distributed scheduler (a task that raised)
      manifest: null                # the run manifest (SQLite); default tileseg-run.sqlite next to the outputs
      input_checksum: false         # input fingerprints hash every byte instead of sizes and mtimes
      check_free_space: true        # refuse an item whose uncompressed output exceeds the free space
      lease_s: 120                  # a claim without heartbeat for this long is taken over by another run
    evaluate:                       # optional: Dice per class against a reference label image
      reference: {path: null, array: labels}   # path (template fields allowed) defaults to the input;
                                    # scored against the first output with content: result

``model.output`` says what the engine makes: ``labels`` (the default; a class
map, argmax or ``> 0.5`` for one channel, reduced chunk by chunk, the
cheapest path), ``probabilities`` (softmax/sigmoid) or ``logits``. Every
``postprocess`` step is a registered callable ``f(data, *, spacing, **params)``
applied in order to that result; object steps treat class maps per class.
``argmax``/``threshold`` steps turn probabilities into classes, so they need
``model.output: probabilities``. Step names and parameters are checked
against :mod:`tileseg.registry` when the pipeline is validated.

Preprocessing applies before the model or the method. With a method,
``tiling.chunks`` (if given) rechunks the input; the other tiling keys are
for models.

Relative paths (input, model weights, output, reference) are resolved against
the pipeline file's directory by the loader.

Next to the outputs (their common folder) a run writes ``tileseg-run.sqlite``
(the run manifest, :mod:`tileseg.manifest`) and ``tileseg-report.json`` (see :mod:`tileseg.runner`).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

#: Placeholders allowed in output / reference path templates.
TEMPLATE_FIELDS = ("stem", "name", "index")
#: Postprocess steps that turn scores into classes (they need ``model.output: probabilities``).
CLASSIFY_STEPS = ("argmax", "threshold")
#: Named schedulers; anything else must be a ``tcp://`` or ``tls://`` address.
SCHEDULERS = ("threads", "processes", "synchronous", "local", "client")


class _Section(BaseModel):
    """Base of every section: unknown keys and type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)


# --------------------------------------------------------------------------- helpers


def _suggest(name: str, names: Any) -> str:
    from ..registry import suggest

    return suggest(name, names)


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

    for pkg in ("tileseg.methods", "tileseg.postprocess"):
        try:
            importlib.import_module(pkg)
        except ImportError:  # pragma: no cover - package missing or its extra not installed
            pass


def _registry_names(kind: str) -> list[str]:
    from .. import registry

    _load_plugins()
    return registry.available(kind)


_SINGULAR = {"methods": "method", "postprocess": "postprocess step", "preprocess": "preprocess step"}


def _check_params(kind: str, name: str, params: dict[str, Any]) -> None:
    """Reject parameters the registered plugin callable does not accept."""
    from .. import registry

    what = _SINGULAR.get(kind, kind)
    try:
        fn = registry.get(kind, name)
    except ImportError as exc:
        raise ValueError(f"{what} {name!r} cannot be loaded: {exc}") from exc
    check_call(fn, what, name, params, from_image=kind != "preprocess")  # preprocessing sees arrays


def check_call(fn: Any, what: str, name: str, params: dict[str, Any], *, takes_data: bool = True,
               from_image: bool | None = None) -> None:
    """Check ``params`` against ``fn(data, **params)`` (see :func:`tileseg.step_call.check_params`)."""
    from ..step_call import check_params

    check_params(fn, what, name, params, skip=1 if takes_data else 0,
                 from_image=takes_data if from_image is None else from_image)


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
    level: int = 0  # negative counts from the coarsest level, as the readers do
    axes: str | None = None
    nodata: int | float | None = None
    aoi: str | None = None
    nan_policy: Literal["error", "fill"] = "error"
    fill_value: int | float = 0.0
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("axes")
    @classmethod
    def _axes(cls, v: str | None) -> str | None:
        if v is not None:
            from ..image import parse_axes

            parse_axes(v)
        return v

    @field_validator("aoi")
    @classmethod
    def _aoi(cls, v: str | None) -> str | None:
        return None if v is None else check_template(v, "aoi")

    @field_validator("options")
    @classmethod
    def _options(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = {"array", "level", "axes", "reader", "nodata"} & set(v)
        if own:
            raise ValueError(f"{sorted(own)[0]!r} is an input key of its own: write input.{sorted(own)[0]}")
        return v

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
    skip_nodata: bool = True
    target_spacing: list[float] | None = None

    @field_validator("target_spacing")
    @classmethod
    def _target_spacing(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and (len(v) not in (2, 3) or not all(math.isfinite(s) and s > 0 for s in v)):
            raise ValueError(f"needs 2 or 3 positive numbers, one per spatial axis (got {v!r})")
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
            if self.target_spacing is not None:
                raise ValueError("target_spacing needs a model and patch_size (methods run on the source grid)")
            return self
        from ..errors import TilingError
        from ..tiling.grid import tile_steps

        n = len(self.patch_size)
        try:
            tile_steps(self.patch_size, overlap=self.overlap, overlap_px=self.overlap_px)
        except TilingError as exc:  # "key: reason" -> reported at tiling.key
            raise ValueError(f"tiling.{exc}") from None
        if self.overlap is None and self.overlap_px is None:
            self.overlap = 0.25
        if self.chunks is not None and len(self.chunks) != n:
            raise ValueError(f"chunks needs {n} entries like patch_size (got {self.chunks!r})")
        if self.target_spacing is not None and len(self.target_spacing) != n:
            raise ValueError(f"target_spacing needs {n} entries like patch_size (got {self.target_spacing!r})")
        return self


class ModelConfig(_Section):
    """``model:`` one model kind with its parameters, and how to run it.

    Written ``{kind: {parameters}, batch_size: ..., ...}``; validated into
    ``kind`` and ``params`` (see :mod:`tileseg.predictors.kinds`).
    """

    kind: str
    params: dict[str, Any]
    output: Literal["labels", "probabilities", "logits"] = "labels"
    batch_size: int = Field(default=8, gt=0)
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    device: str = "auto"
    tta: list[str] = Field(default_factory=list)
    channels_last: bool = False
    compile: bool = False
    classes: list[str] | None = None
    bad_output: Literal["error", "nodata"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        from ..predictors.kinds import parse_spec

        common = set(cls.model_fields) - {"kind", "params"}
        kinds = [k for k in v if k not in common]
        installed = _registry_names("models")
        if len([k for k in kinds if k in installed]) == 1 and len(kinds) > 1:
            key = next(k for k in kinds if k not in installed)
            raise ValueError(f"model.{key}: unknown key{_suggest(key, sorted(common))} "
                             f"(allowed: one model kind, {', '.join(sorted(common))})")
        if len(kinds) != 1:
            installed = _registry_names("models")
            got = ", ".join(map(str, kinds)) or "none"
            raise ValueError(f"give exactly one model kind ({', '.join(installed)}) with its parameters, e.g. "
                             f"torchscript: {{path: model.pt}} (got {got})")
        kind, params = parse_spec({kinds[0]: v[kinds[0]]}, "model")
        from .. import registry

        try:
            check_call(registry.get("models", kind), "model kind", kind, params, takes_data=False)
        except ValueError as exc:
            raise ValueError(f"model.{kind}: {exc}") from None
        return {**{k: v[k] for k in v if k in common}, "kind": kind, "params": params}

    @model_serializer(mode="wrap")
    def _as_written(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        kind, params = data.pop("kind"), data.pop("params")
        return {kind: params, **data}

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    @field_validator("tta")
    @classmethod
    def _tta(cls, v: list[str]) -> list[str]:
        from ..errors import ConfigError
        from ..predictors.tta import check_axes

        try:
            return list(check_axes(v, "tta"))
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("tta: ")) from None

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("must list at least one class")
            if len(set(v)) != len(v):
                raise ValueError(f"class names must be unique (got {v!r})")
        return v

    def spec(self) -> dict[str, Any]:
        """The ``{kind: {parameters}}`` spec for :func:`tileseg.predictors.load_predictor`."""
        return {self.kind: dict(self.params)}

    def files(self) -> dict[str, str]:
        """``{parameter: path}`` of the kind's file parameters (weights)."""
        from .. import registry

        names = getattr(registry.get("models", self.kind), "file_params", ())
        return {p: self.params[p] for p in names if isinstance(self.params.get(p), str)}


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
    content: Literal["result", "raw"] = "result"
    overwrite: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _writer_from_path(cls, data: Any) -> Any:
        if isinstance(data, dict) and "writer" not in data and isinstance(data.get("path"), str):
            from ..writers import writer_for_path

            data = {**data, "writer": writer_for_path(data["path"])}
        return data

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

    @model_validator(mode="after")
    def _writer_options(self) -> OutputConfig:
        from ..step_call import check_params
        from ..writers import get_writer

        # prepare(image, path, *, overwrite, storage_options, **writer options)
        check_params(get_writer(self.writer).prepare, "writer", self.writer, self.options, skip=4, from_image=False)
        return self


class ExecutionConfig(_Section):
    """``execution:`` which Dask scheduler runs the graph."""

    scheduler: str = "threads"
    workers: int | None = Field(default=None, gt=0)
    threads_per_worker: int = Field(default=1, gt=0)
    resources: dict[str, float] = Field(default_factory=dict)
    malloc_arenas: int | None = Field(default=1, gt=0)
    malloc_mmap_threshold: int | None = Field(default=None, gt=0)
    memory_limit: str | int | None = None
    max_items_in_flight: int = Field(default=1, gt=0)
    retries: int = Field(default=0, ge=0)
    manifest: str | None = None
    input_checksum: bool = False
    check_free_space: bool = True
    lease_s: float = Field(default=120.0, gt=0)

    @field_validator("memory_limit")
    @classmethod
    def _memory_limit(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and v != "auto":
            from dask.utils import parse_bytes

            try:
                parse_bytes(v)
            except (ValueError, TypeError):
                raise ValueError(f"must be bytes (an integer), a size like '4GiB', or 'auto' (got {v!r})") from None
        if isinstance(v, int) and v <= 0:
            raise ValueError(f"must be > 0 (got {v!r})")
        return v

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
    level: int = 0  # negative counts from the coarsest level, as the readers do

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
    output: OutputConfig | None = None
    outputs: list[OutputConfig] | None = None
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
        names = _registry_names("preprocess")
        out = []
        for i, raw in enumerate(v):
            try:
                name, params = _step_pair(raw, "preprocess")
                if name not in names:
                    raise ValueError(f"unknown preprocess step {name!r}{_suggest(name, names)} "
                                     f"(installed: {', '.join(names)})")
                _check_params("preprocess", name, params)
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
                if name not in names:
                    raise ValueError(f"unknown postprocess step {name!r}{_suggest(name, names)} "
                                     f"(installed: {', '.join(names)})")
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
        elif self.model is not None and self.tiling is not None and self.tiling.patch_size is not None:
            from ..predictors.tta import AXES

            n = len(self.tiling.patch_size)
            too_deep = [a for a in self.model.tta if -AXES[a] > n]
            if too_deep:
                problems.append(f"model.tta: cannot flip axis {too_deep[0]!r} of {n}D patches "
                                f"(tiling.patch_size {self.tiling.patch_size!r})")
        if (self.output is None) == (self.outputs is None):
            problems.append("give exactly one of output: (one output) or outputs: (a list)")
        elif self.outputs is not None and not self.outputs:
            problems.append("outputs: must list at least one output")
        if self.model is not None and self.model.output == "labels":
            for i, (name, _) in enumerate(self.postprocess_steps()):
                if name in CLASSIFY_STEPS:
                    problems.append(
                        f"postprocess[{i}]: {name!r} turns probabilities into classes, but model.output is "
                        "'labels' (the default): the engine already makes the class map. Remove the step, "
                        "or set model.output: probabilities")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # ------------------------------------------------------------------ helpers
    def all_outputs(self) -> list[OutputConfig]:
        """The outputs of every item (``outputs:``, or the single ``output:``)."""
        return list(self.outputs) if self.outputs is not None else [self.output]  # type: ignore[list-item]

    def postprocess_steps(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, params), ...]`` of the postprocess steps."""
        return steps_of(self.postprocess)

    def preprocess_steps(self) -> list[tuple[str, dict[str, Any]]]:
        """``[(name, params), ...]`` of the preprocess steps."""
        return steps_of(self.preprocess)

    def method_step(self) -> tuple[str, dict[str, Any]] | None:
        """``(name, params)`` of the method, or ``None`` with a model."""
        return None if self.method is None else steps_of([self.method])[0]

    def tiling_options(self) -> Any:
        """The engine's :class:`~tileseg.options.TilingOptions` (model pipelines)."""
        from ..options import TilingOptions

        t = self.tiling
        assert t is not None and t.patch_size is not None
        return TilingOptions(patch_size=tuple(t.patch_size), overlap=t.overlap,
                             overlap_px=None if t.overlap_px is None else tuple(t.overlap_px), blend=t.blend,
                             chunks=None if t.chunks is None else tuple(t.chunks), pad_mode=t.pad_mode,
                             target_spacing=None if t.target_spacing is None else tuple(t.target_spacing))

    def inference_options(self, **runtime: Any) -> Any:
        """The engine's :class:`~tileseg.options.InferenceOptions` (``runtime``: resources, lookahead, ...)."""
        from ..options import InferenceOptions

        m = self.model
        assert m is not None
        skip = self.tiling.skip_nodata if self.tiling is not None else True
        return InferenceOptions(batch_size=m.batch_size, output=m.output, nan_policy=self.input.nan_policy,
                                skip_nodata=skip,
                                fill_value=float(self.input.fill_value), preprocess=tuple(self.preprocess),
                                class_names=None if m.classes is None else tuple(m.classes),
                                bad_output=m.bad_output, **runtime)
