"""Load a pipeline file: ``yaml.safe_load``, validate, resolve relative paths.

Every problem becomes one line of a single :class:`~tileseg.errors.ConfigError`,
written as the YAML path and the reason::

    pipeline.yaml: 2 problems
      tiling.overlap: must be >= 0 and < 1 (got -0.1)
      model.batch_sise: unknown key; did you mean 'batch_size'?
"""

from __future__ import annotations

import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..store import is_url
from .schema import PipelineConfig


def load_pipeline(
    source: Any,
    *,
    base_dir: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """Load and validate a pipeline.

    Parameters
    ----------
    source : str, os.PathLike, dict or PipelineConfig
        A YAML file, an already parsed mapping, or a validated pipeline
        (returned unchanged).
    base_dir : path, optional
        Directory that relative paths are resolved against; defaults to the
        pipeline file's directory (or the current directory for a mapping).
    overrides : mapping, optional
        Values replacing the file's, by dotted key (``{"input.path": "/data/day1",
        "outputs.0.path": "out/{stem}.zarr"}``), applied before validation (see
        :func:`apply_overrides`). Relative override paths resolve like the file's.

    Returns
    -------
    PipelineConfig
        The validated pipeline with absolute local paths.

    Raises
    ------
    ConfigError
        If the file cannot be read, is not valid YAML (file, line and column
        are named) or does not match the schema (every problem is listed with
        its YAML path).

    Examples
    --------
    >>> cfg = load_pipeline("pipelines/demo.yaml")  # doctest: +SKIP
    >>> cfg.tiling.patch_size  # doctest: +SKIP
    [256, 256]
    """
    if isinstance(source, PipelineConfig):
        if overrides:
            raise ConfigError("overrides apply to a pipeline file or mapping, not to a validated PipelineConfig")
        return source
    if isinstance(source, dict):
        check_size(source, "<mapping>")
        data = apply_overrides(source, overrides or {}, "<mapping>")
        return parse_pipeline(data, base_dir=base_dir or os.getcwd(), source="<mapping>")
    path = Path(os.fspath(source)).expanduser()
    data = apply_overrides(read_yaml(path), overrides or {}, str(path))
    return parse_pipeline(data, base_dir=base_dir or path.resolve().parent, source=str(path))


def apply_overrides(data: Any, overrides: Mapping[str, Any], source: str = "<pipeline>") -> Any:
    """A copy of parsed pipeline ``data`` with values replaced by dotted key.

    Keys walk mappings by name and lists by index (``outputs.0.path``); a
    missing mapping key is created, so ``execution.retries`` may be set even
    when the file has no ``execution`` section. The result is validated later
    like the file itself.

    Raises
    ------
    ConfigError
        For an empty key part, an index past a list's end, or a key that walks
        into a scalar.

    Examples
    --------
    >>> apply_overrides({"input": {"path": "a"}}, {"input.path": "b", "execution.scheduler": "threads"})
    {'input': {'path': 'b'}, 'execution': {'scheduler': 'threads'}}
    """
    import copy

    if not overrides:
        return data
    if not isinstance(data, dict):
        return data  # parse_pipeline reports the shape error
    out = copy.deepcopy(data)
    for key, value in overrides.items():
        parts = str(key).split(".")
        if any(not p for p in parts):
            raise ConfigError(f"{source}: override {key!r}: empty part in the dotted key")
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{source}: override {key!r}: {where} is not an index of the "
                                      f"{len(node)}-element list {'.'.join(parts[:i]) or '<top>'}")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise ConfigError(f"{source}: override {key!r}: {'.'.join(parts[:i])} is a "
                                  f"{type(node).__name__}, not a section or list")
    check_size(out, source)
    return out


#: A pipeline file larger than this is refused before parsing.
MAX_YAML_BYTES = 1 << 20
#: Most values (mappings, lists and scalars, each alias expansion counted again) a pipeline may hold.
MAX_YAML_NODES = 100_000


def _safe_unique_loader() -> Any:
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently).

    Keys brought in by a merge (``<<: *alias``) may still be overridden, as YAML intends.
    """
    import yaml

    class SafeUniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.get(key)
                    except TypeError:  # unhashable key: the base class reports it
                        continue
                    if first is not None:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark,
                            f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    return SafeUniqueKeyLoader


def read_yaml(path: Path) -> Any:
    """Parse a YAML file with yaml's safe loader; syntax errors and duplicate keys name line and column.

    Files over :data:`MAX_YAML_BYTES`, and documents whose aliases expand to
    more than :data:`MAX_YAML_NODES` values (an "alias bomb"), are refused
    with a :class:`~tileseg.errors.ConfigError` before anything walks them.
    """
    import yaml

    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: pipeline file is {path.stat().st_size} bytes, over the "
                              f"{MAX_YAML_BYTES}-byte limit for pipeline files")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: pipeline file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read pipeline file: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_safe_unique_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"{where}: invalid YAML: {detail} (line {mark.line + 1 if mark else '?'})") from None
    check_size(data, str(path))
    return data


def check_size(data: Any, source: str, limit: int = MAX_YAML_NODES) -> None:
    """Refuse parsed YAML that expands to more than ``limit`` values (shared aliases counted each time).

    ``yaml.safe_load`` keeps an aliased node as one shared object, so a few
    lines can stand for billions of values that later steps (validation,
    hashing, JSON reports) would walk. The count stops as soon as it passes
    the limit.

    Raises
    ------
    ConfigError
        Naming the file and the limit.
    """
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(f"{source}: the pipeline expands to more than {limit} values (YAML aliases "
                              "repeated over and over?); refusing to load it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)


def parse_pipeline(data: Any, *, base_dir: str | os.PathLike[str], source: str = "<pipeline>") -> PipelineConfig:
    """Validate a parsed mapping and resolve its relative paths against ``base_dir``.

    Raises
    ------
    ConfigError
        Listing every problem as ``yaml.path: reason``.
    """
    if data is None:
        raise ConfigError(f"{source}: the pipeline is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (got {type(data).__name__})")
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        lines = format_errors(exc)
        raise ConfigError(_join(source, lines)) from None
    cfg = resolve_paths(cfg, Path(base_dir))
    missing = _missing_files(cfg)
    if missing:
        raise ConfigError(_join(source, missing))
    return cfg


def _join(source: str, lines: list[str]) -> str:
    n = len(lines)
    head = f"{source}: {n} problem{'s' if n != 1 else ''}"
    return head + "".join(f"\n  {line}" for line in lines)


# --------------------------------------------------------------------------- errors


def yaml_path(loc: tuple[Any, ...]) -> str:
    """``('postprocess', 1, 'opening')`` -> ``postprocess[1].opening``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "[key]":
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _section_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that holds the key at ``loc`` (None if not a model)."""
    cls: Any = PipelineConfig
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
        field = cls.model_fields.get(part)
        if field is None:
            return None
        cls = _model_in(field.annotation)
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_errors(exc: ValidationError) -> list[str]:
    """One ``path: reason`` line per pydantic error, deduplicated, in order."""
    from ..registry import suggest

    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        kind = err.get("type", "")
        msg = str(err.get("msg", ""))
        got = err.get("input")
        if kind == "extra_forbidden":
            section = _section_at(loc[:-1])
            hint = ""
            if section is not None:
                fields = [f for f in section.model_fields if f not in ("kind", "params")]
                hint = suggest(str(loc[-1]), fields) + f" (allowed: {', '.join(fields)})"
            lines.append(f"{yaml_path(loc)}: unknown key{hint}")
            continue
        if kind == "missing":
            lines.append(f"{yaml_path(loc)}: required key is missing")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif msg.startswith("Assertion failed, "):
            msg = msg[len("Assertion failed, "):]
        elif kind.endswith("_type") or kind in ("literal_error", "enum"):
            msg = f"wrong type or value: {msg[0].lower()}{msg[1:]} (got {got!r})"
        elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
            msg = f"{msg[0].lower()}{msg[1:]} (got {got!r})"
        path = yaml_path(loc)
        step = re.match(r"step (\d+): ", msg)
        if step:  # list validators name the offending entry this way
            path, msg = f"{path}[{step.group(1)}]", msg[step.end():]
        key = re.match(r"(\w+)\.([\w.]+): ", msg)
        if key and path == key.group(1):  # section validators name the offending key this way
            path, msg = f"{path}.{key.group(2)}", msg[key.end():]
        for part in msg.split("\n"):
            line = f"{path}: {part}" if path else part
            if line not in lines:
                lines.append(line)
    return lines


# --------------------------------------------------------------------------- paths


def _resolve(path: str, base: Path) -> str:
    if is_url(path):
        return path
    p = Path(os.path.expanduser(path))
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(str(p))


def resolve_paths(cfg: PipelineConfig, base_dir: Path) -> PipelineConfig:
    """A copy of ``cfg`` with input, model file, output and reference paths made absolute."""
    base = Path(base_dir).expanduser().resolve()
    updates: dict[str, Any] = {
        "input": cfg.input.model_copy(update={
            "path": [_resolve(p, base) for p in cfg.input.path],
            "aoi": None if cfg.input.aoi is None else _resolve(cfg.input.aoi, base)}),
    }
    if cfg.output is not None:
        updates["output"] = cfg.output.model_copy(update={"path": _resolve(cfg.output.path, base)})
    if cfg.outputs is not None:
        updates["outputs"] = [o.model_copy(update={"path": _resolve(o.path, base)}) for o in cfg.outputs]
    if cfg.model is not None:
        params = {**cfg.model.params, **{k: _resolve(v, base) for k, v in cfg.model.files().items()}}
        updates["model"] = cfg.model.model_copy(update={"params": params})
    if cfg.execution.manifest is not None:
        updates["execution"] = cfg.execution.model_copy(
            update={"manifest": _resolve(cfg.execution.manifest, base)})
    if cfg.evaluate is not None and cfg.evaluate.reference.path is not None:
        ref = cfg.evaluate.reference.model_copy(update={"path": _resolve(cfg.evaluate.reference.path, base)})
        updates["evaluate"] = cfg.evaluate.model_copy(update={"reference": ref})
    return cfg.model_copy(update=updates)


def _missing_files(cfg: PipelineConfig) -> list[str]:
    problems = []
    if cfg.model is not None:
        for key, p in cfg.model.files().items():
            if not is_url(p) and not os.path.isfile(p):
                problems.append(f"model.{cfg.model.kind}.{key}: file not found: {p!r}")
    return problems
