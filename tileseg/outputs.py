"""Where an item's outputs go, checked before any work: templates, collisions, inputs, free space.

- :func:`render_output` fills ``{stem}``, ``{name}`` and ``{index}`` with
  values sanitised so no item can leave the template's folder (separators
  become ``_``; a name that is empty, ``.`` or ``..`` is refused);
- :func:`check_outputs` refuses two items writing one path;
- :func:`check_not_inputs` refuses an output that is, contains or lies
  inside any input of the run (inputs, AOIs, references, model files),
  ``overwrite`` included: an output never destroys an input;
- :func:`check_writable` creates each local output folder and a file in it
  before work starts; :func:`check_free_space` compares the free space
  with an item's planned (uncompressed) output size.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile
from collections.abc import Iterable
from typing import Any

from .errors import ConfigError, InputError, OutputError
from .store import is_url, local_path

_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")


def safe_field(value: str, field: str, item: str) -> str:
    """``value`` made safe as part of one path component (separators and control characters become ``_``).

    Raises
    ------
    InputError
        The value is empty, ``.`` or ``..`` (it would name a folder, not a file).

    Examples
    --------
    >>> safe_field("a/b\\\\c", "stem", "x")
    'a_b_c'
    """
    clean = _UNSAFE.sub("_", str(value))
    if clean.strip(".") == "":
        raise InputError(f"{item}: the input's {field} {value!r} cannot name an output (it would leave the "
                         "output folder); use {index} in output.path, or rename the input")
    return clean


def _fixed_folder(template: str) -> str:
    """The folder part of ``template`` before its first field (where every rendered path must stay)."""
    head = ""
    for text, field, _, _ in string.Formatter().parse(template):
        head += text
        if field is not None:
            break
    return head.rsplit("/", 1)[0] if "/" in head else ""


def _norm(path: str) -> str:
    local = local_path(path)
    if local is not None:
        return os.path.normpath(os.path.abspath(local))
    scheme, _, rest = path.partition("://")
    parts: list[str] = []
    for part in rest.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return f"{scheme}://" + "/".join(parts)


def render_output(template: str, item: str, index: int) -> str:
    """Fill ``{stem}``, ``{name}`` and ``{index}`` for one item, sanitised.

    Raises
    ------
    InputError
        A field value that would leave the template's folder (an input named ``..``).

    Examples
    --------
    >>> render_output("/out/{stem}_seg.zarr", "/data/a.ome.zarr", 0)
    '/out/a_seg.zarr'
    >>> render_output("/out/{index:03d}_{name}", "s3://b/x.zarr/", 7)
    '/out/007_x.zarr'
    """
    from .readers import item_stem

    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    name = str(item).rstrip("/").rsplit("/", 1)[-1]
    values = {"index": index,
              "stem": safe_field(item_stem(item), "stem", item) if "stem" in fields else "",
              "name": safe_field(name, "name", item) if "name" in fields else ""}
    out = template.format(**values)
    folder = _fixed_folder(template)
    if folder and not _inside(_norm(out), _norm(folder)):  # pragma: no cover - safe_field prevents it
        raise InputError(f"{item}: output {out!r} would be written outside {folder!r}")
    return out


def _inside(path: str, folder: str) -> bool:
    sep = "/" if "://" in folder else os.sep
    return path == folder or path.startswith(folder.rstrip(sep) + sep)


def check_outputs(paths: list[list[str]], inputs: list[str]) -> None:
    """Refuse two items (or one item twice) writing one output path.

    Raises
    ------
    ConfigError
        Naming both items and the path.
    """
    first: dict[str, str] = {}
    for outs, item in zip(paths, inputs):
        for out in outs:
            key = _norm(out)
            if key in first:
                raise ConfigError(f"output.path: {_collision(first[key], item, out)}")
            first[key] = item


def _collision(first: str, item: str, out: str) -> str:
    """Why ``first`` and ``item`` collide at ``out``, and the template field that would tell them apart."""
    from .readers import item_stem

    if first == item:
        return f"two outputs of item {item!r} write to {out!r}; give each output its own path"
    def name(path: str) -> str:
        return str(path).rstrip("/").rsplit("/", 1)[-1]

    hint = "use {stem}, {name} or {index} in the templates to make outputs unique"
    if name(first) == name(item):  # neither {stem} nor {name} tells them apart
        hint = f"both are named {name(item)!r}: use {{index}} in the templates to make outputs unique"
    elif item_stem(first) == item_stem(item):
        hint = f"both have the stem {item_stem(item)!r}: use {{name}} or {{index}} in the templates"
    return f"items {first!r} and {item!r} both write to {out!r}; {hint}"


def protected_paths(cfg: Any, items: Iterable[str], render: Any = render_output) -> list[tuple[str, str]]:
    """``(path, what)`` of everything a run reads: input items, AOIs, references and model files."""
    out: list[tuple[str, str]] = []
    for index, item in enumerate(items):
        head, sep, frag = str(item).rpartition("#")
        base = head if sep and head and frag and not os.path.exists(local_path(item) or "") else str(item)
        out.append((base, "input"))
        for what, template in (("input.aoi", cfg.input.aoi),
                               ("evaluate.reference.path",
                                cfg.evaluate.reference.path if cfg.evaluate is not None else None)):
            if template:
                try:
                    out.append((render(template, item, index), what))
                except InputError:
                    pass
    if cfg.model is not None:
        out += [(p, f"model.{cfg.model.kind}.{k}") for k, p in cfg.model.files().items()]
    return out


def _real(path: str) -> str:
    local = local_path(path)
    return os.path.realpath(local) if local is not None else _norm(path)


def _ancestors(path: str) -> list[str]:
    """Every folder above ``path`` (normalised, local or URL), nearest first."""
    out = []
    if "://" in path:
        scheme, _, rest = path.partition("://")
        parts = rest.split("/")
        out = [f"{scheme}://" + "/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    else:
        parent = os.path.dirname(path)
        while parent and parent != path:
            out.append(parent)
            path, parent = parent, os.path.dirname(parent)
    return out


def check_not_inputs(outputs: Iterable[str], protected: Iterable[tuple[str, str]], *, key: str = "output.path",
                     what: str = "output") -> None:
    """Refuse an output that is, contains or lies inside a path the run reads (``overwrite`` included).

    ``key`` and ``what`` name the pipeline key and the kind of file in the
    error (the run manifest is checked the same way, as ``execution.manifest``).

    Linear in the number of paths (set look-ups over each path's folders), so
    archives of many items are checked quickly.

    Raises
    ------
    ConfigError
        Naming the output, the input and how they overlap.
    """
    guarded: dict[str, tuple[str, str]] = {}
    around: dict[str, tuple[str, str]] = {}
    for p, kind in protected:
        real = _real(p)
        guarded.setdefault(real, (p, kind))
        for folder in _ancestors(real):
            around.setdefault(folder, (p, kind))
    for out in outputs:
        real = _real(out)
        hit, how = guarded.get(real), "is"
        if hit is None:
            hit, how = next(((guarded[a], "lies inside") for a in _ancestors(real) if a in guarded), (None, ""))
        if hit is None:
            hit, how = around.get(real), "contains"
        if hit is not None:
            raise ConfigError(f"{key}: the {what} {out!r} {how} the {hit[1]} {hit[0]!r}; what a run writes must "
                              "never replace or contain what it reads (overwrite: true included)")


def output_dir(outputs: list[str]) -> str:
    """The folder that holds the manifest and report: common parent of the outputs."""
    parents = [o.rstrip("/").rsplit("/", 1)[0] if is_url(o) else os.path.dirname(os.path.abspath(o))
               for o in outputs]
    if all(not is_url(p) for p in parents):
        return os.path.commonpath(parents)
    return parents[0]


def join(directory: str, name: str) -> str:
    """``directory/name`` for a local folder or a URL."""
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)


def check_writable(paths: Iterable[str]) -> None:
    """Create the folder of every local output and write (then remove) a file in it.

    Raises
    ------
    OutputError
        Naming the folder that cannot be created or written.
    """
    seen: set[str] = set()
    for path in paths:
        local = local_path(path)
        if local is None:
            continue
        parent = os.path.dirname(os.path.abspath(local.rstrip("/") or local))
        if parent in seen:
            continue
        seen.add(parent)
        try:
            os.makedirs(parent, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".tileseg-probe-", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise OutputError(f"output folder {parent!r} is not writable: {exc}") from exc


def check_free_space(needs: Iterable[tuple[str, int]]) -> None:
    """Refuse to start when a local output folder has less free space than planned.

    Parameters
    ----------
    needs : iterable of (path, bytes)
        Each output and its planned size (uncompressed: an upper bound for
        compressed formats).

    Raises
    ------
    OutputError
        Naming the folder, the free and the needed bytes.
    """
    per_dev: dict[str, list[Any]] = {}
    for path, nbytes in needs:
        local = local_path(path)
        if local is None:
            continue
        parent = os.path.dirname(os.path.abspath(local.rstrip("/") or local))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        entry = per_dev.setdefault(parent, [0, path])
        entry[0] += int(nbytes)
    for parent, (nbytes, path) in per_dev.items():
        free = shutil.disk_usage(parent).free
        if free < nbytes:
            raise OutputError(f"not enough free space for {path!r}: {free / 2**20:.1f} MiB free in {parent!r}, "
                              f"the output needs up to {nbytes / 2**20:.1f} MiB uncompressed; free some space, "
                              "write elsewhere, or set execution.check_free_space: false")
