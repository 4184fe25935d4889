"""`import tileseg` and listing plugins stay cheap: no heavy library is imported."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "scipy", "skimage", "dask_image", "sklearn", "zarr", "monai", "distributed", "onnxruntime",
         "rasterio", "rio_cogeo", "pyogrio", "shapely", "pydicom", "highdicom", "nibabel")


def test_import_and_registry_listing_load_nothing_heavy():
    code = (
        "import sys, tileseg\n"
        "from tileseg import registry\n"
        "names = {k: registry.available(k) for k in registry.KINDS}\n"
        "assert 'otsu' in names['methods'] and 'label' in names['postprocess'] and 'unet' in names['architectures'] and 'torchscript' in names['models'] and 'zscore' in names['preprocess']\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_plugin_names_suggest_the_nearest():
    import pytest

    from tileseg import registry
    from tileseg.errors import PluginError

    with pytest.raises(PluginError, match="did you mean 'otsu'"):
        registry.get("methods", "otsuu")
