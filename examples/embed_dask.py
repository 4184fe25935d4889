"""Embed tileseg in your own Dask code: open -> segment -> your own step -> write, one graph, your cluster.

Usage (after ``bash examples/quickstart.sh``, which makes the demo scene and model)::

    python examples/embed_dask.py                                  # a LocalCluster with 2 worker processes
    python examples/embed_dask.py --scheduler tcp://host:8786      # your existing cluster

tileseg builds lazy Dask arrays; nothing runs until the one ``compute`` at the
end, on the ``distributed.Client`` you created (tileseg creates no cluster of
its own when a client is active). The custom step here outlines every object
of the segmentation with scikit-image's ``find_boundaries`` through
``map_overlap`` (a 1-pixel halo makes it exact across chunk borders), and
``tileseg.write`` writes the outlines atomically with the scene's geometry.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import tileseg

ROOT = Path(__file__).resolve().parents[1]


def outlines(labels: np.ndarray) -> np.ndarray:
    """Your own step: 1 on the inner border of every object, 0 elsewhere (scikit-image)."""
    from skimage.segmentation import find_boundaries

    return find_boundaries(labels, mode="inner").astype(np.uint8)


def build(image_path: str, model_path: str, out_path: str, *, array: str | None = "image",
          patch: int = 256) -> tuple[tileseg.Image, object]:
    """The lazy graph: open, segment, outline, write. Returns the outlines and the unfinished write job."""
    img = tileseg.open(image_path, array=array)                          # lazy: dask array + geometry
    seg = tileseg.segment(img, {"torchscript": {"path": model_path}}, patch_size=(patch, patch), overlap=0.25,
                          batch_size=8, preprocess=["zscore"], class_names=["background", "blob"])
    edges = seg.data.map_overlap(outlines, depth=1, boundary="none", dtype=np.uint8)
    result = seg.with_data(edges, class_names=("other", "outline"))       # same spacing/origin/CRS, new pixels
    job = tileseg.write(result, out_path, overwrite=True, compute=False)  # a Dask task, not run yet
    return result, job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", default=str(ROOT / "data" / "demo" / "scene2d.zarr"))
    ap.add_argument("--array", default="image")
    ap.add_argument("--model", default=str(ROOT / "examples" / "models" / "unet2d.pt"))
    ap.add_argument("--out", default=str(ROOT / "out" / "embedded" / "scene2d_outlines.zarr"))
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--scheduler", default=None, help="address of an existing Dask scheduler (default: a LocalCluster)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    from distributed import Client, LocalCluster

    from tileseg.writers import get_writer

    cluster = None if args.scheduler else LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                                       dashboard_address=":0")
    with Client(args.scheduler or cluster) as client:
        print(f"dashboard: {client.dashboard_link}")
        _, job = build(args.image, args.model, args.out, array=args.array, patch=args.patch)
        client.compute(job.task).result()      # one graph on your cluster: read, infer, stitch, outline, write
        get_writer("zarr").finalize(job.handle)  # record completion: the output is now final
    if cluster is not None:
        cluster.close()
    print(f"outlines written to {job.handle.path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
