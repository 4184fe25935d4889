"""The public functions: open, segment, write, run, load_pipeline.

Each one shows its real signature and imports the heavy parts of tileseg
(dask, zarr, torch) only when called, so ``import tileseg`` stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .config import PipelineConfig
    from .image import Image
    from .report import RunReport
    from .writers import WriteJob

#: Readers' default size budget (about 1.1e12 pixels, 16 TiB).
_MAX_PIXELS = 2**40
_MAX_BYTES = 2**44


def open(  # noqa: A001 - mirrors rasterio.open / zarr.open
    path: str | os.PathLike[str] | Any,
    *,
    reader: str = "auto",
    array: str | None = None,
    level: int | None = None,
    axes: str | Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int | None = _MAX_PIXELS,
    max_bytes: int | None = _MAX_BYTES,
    options: dict[str, Any] | None = None,
) -> Image:
    """Open an image lazily.

    Parameters
    ----------
    path : str, os.PathLike, array, xarray.DataArray or Image
        Local path or fsspec URL of an image (Zarr/OME-Zarr, or any format a
        reader plugin handles); arrays and images are wrapped.
    reader : str
        Reader name from the registry, or ``"auto"`` to detect it.
    array : str, optional
        Node inside a container (e.g. ``"labels/cells"`` in a Zarr store).
    level : int, optional
        Resolution level of a multiscale image (0: full resolution).
    axes : str or sequence of str, optional
        Axis names of the stored array (``"cyx"``), overriding what the file
        declares.
    storage_options : dict, optional
        fsspec options for URLs.
    max_pixels, max_bytes : int or None
        Refuse images declaring more (checked before anything is allocated).
    options : dict, optional
        Reader-specific keyword arguments (e.g. ``{"chunks": (256, 256)}``).

    Returns
    -------
    Image
        Lazy image (dask array plus geometry), channel axis first.

    Examples
    --------
    >>> import numpy as np, zarr, tempfile, os, tileseg
    >>> p = os.path.join(tempfile.mkdtemp(), "a.zarr")
    >>> zarr.create_array(p, shape=(1, 32, 48), chunks=(1, 16, 16), dtype="uint8")[:] = 7
    >>> img = tileseg.open(p, axes="cyx")
    >>> img.axes, img.spatial_shape
    (('c', 'y', 'x'), (32, 48))
    """
    from .readers import open_image

    return open_image(path, reader=reader, array=array, level=level, axes=axes, storage_options=storage_options,
                      max_pixels=max_pixels, max_bytes=max_bytes, **(options or {}))


def segment(
    image: Any,
    model: Any,
    *,
    patch_size: int | Sequence[int],
    overlap: float | None = None,
    overlap_px: int | Sequence[int] | None = None,
    blend: str = "gaussian",
    batch_size: int = 8,
    output: str = "labels",
    chunks: Any = None,
    pad_mode: str = "reflect",
    target_spacing: Sequence[float] | None = None,
    device: str | None = None,
    precision: str = "fp32",
    tta: Sequence[str] = (),
    channels_last: bool = False,
    compile: bool = False,
    preprocess: Sequence[Any] | None = None,
    nan_policy: str = "error",
    fill_value: float = 0.0,
    skip_nodata: bool = True,
    class_names: Sequence[str] | None = None,
    out_channels: int | None = None,
    resources: dict[str, float] | None = None,
    lookahead: int | None = None,
    bad_output: str = "error",
) -> Any:
    """Segment an image patch by patch, lazily, with the input's geometry kept.

    Parameters
    ----------
    image : Image, xarray.DataArray, numpy or dask array
        2D/3D image, optional leading channel axis (an array with
        ``len(patch_size) + 1`` dimensions has one).
    model : dict, str, torch.nn.Module, Predictor or callable
        A model spec ``{"torchscript": {"path": ...}}``,
        ``{"state_dict": {"path": ..., "architecture": {"unet": {...}}}}``
        (see :mod:`tileseg.predictors`), a TorchScript path, a module, a
        predictor, or any callable mapping ``(N, C, *patch)`` to ``(N, K, *patch)``.
    patch_size : int or sequence of int
        Patch size per spatial axis.
    overlap : float, optional
        Fraction of the patch, ``0 <= overlap < 1`` (default 0.25).
    overlap_px : int or sequence of int, optional
        Overlap in pixels instead of ``overlap``.
    blend : {"gaussian", "hann", "constant", "crop"}
        How overlapping predictions are combined.
    batch_size : int
        Patches per model call.
    output : {"labels", "probabilities", "logits"}
        Class map (argmax; ``> 0.5`` for one channel), softmax/sigmoid, or logits.
    chunks : int, sequence or None
        Output chunk size per spatial axis; the result does not depend on it.
    pad_mode : {"reflect", "constant", "edge", "symmetric"}
        Padding of axes shorter than the patch.
    target_spacing : sequence of float, optional
        Run the model on the image resampled (linearly, lazily) to this spacing,
        in the image's units, and resample its logits back onto exactly the
        input's grid before making labels (nnU-Net's way, see
        :mod:`tileseg.resample`). ``patch_size`` and ``chunks`` then count
        pixels at the target spacing.
    device : str, optional
        Torch device (default CUDA when available in the worker, else CPU).
    precision : {"fp32", "fp16", "bf16"}
        Autocast precision for torch models.
    tta : sequence of str
        Flip test-time augmentation over these axes (``"x"``, ``"y"``,
        ``"z"``): every combination of flips is folded into the batch (one
        forward of ``2**len(tta)`` times the patches) and the outputs are
        flipped back and averaged as logits.
    channels_last : bool
        Channels-last memory format for torch models (often faster on GPUs).
    compile : bool
        ``torch.compile`` a torch model once per worker process (eager, with a
        warning, where compiling fails).
    preprocess : list, optional
        Preprocessing steps, e.g. ``["zscore"]`` (see :mod:`tileseg.preprocess`);
        use the same as in training.
    nan_policy : {"error", "fill"}
        NaN input raises an error naming the pixel box, or is replaced by ``fill_value``.
    fill_value : float
        What the model sees at NaN (``nan_policy="fill"``) and invalid pixels, and the
        ``pad_mode="constant"`` value.
    skip_nodata : bool
        Patches whose pixels are all invalid (the image's ``nodata``/``mask``) are never
        predicted; found with one lazy reduction over the validity mask.
    class_names : sequence of str, optional
        One name per class (two for a one-channel model).
    out_channels : int, optional
        K, when the model cannot say (else one patch is probed).
    resources : dict, optional
        Dask resources for model inference tasks, e.g. ``{"GPU": 1}``: on a
        distributed client (active when this is called) they run only on
        workers offering them, whatever graph optimisation does; other tasks
        run anywhere (see :mod:`tileseg.placement`).
    lookahead : int, optional
        Ordering edges that bound memory when the whole result is computed
        or stored: the model task of output block ``i`` (C order) waits until
        block ``i - lookahead`` is final. Default: two blocks per thread of
        the scheduler (at least 4; :func:`tileseg.graph.resolve_lookahead`);
        0 turns them off. Computing part of the result never computes more
        because of them (edges to blocks it does not need are dropped).
    bad_output : {"error", "nodata"}
        NaN or Inf in the model's output raises a ``ModelError`` naming the
        image and the patch's pixel box, or those pixels become the result's
        nodata (counted as ``bad_output_px`` in :mod:`tileseg.counters`).

    Returns
    -------
    Image or xarray.DataArray
        The result with the input's geometry, class names and nodata; an
        ``xarray.DataArray`` (dims, coords and attrs kept) when ``image`` was one.

    Raises
    ------
    PlacementError
        ``resources`` given, a distributed client active, and no worker offers them.

    Examples
    --------
    >>> import numpy as np, tileseg
    >>> x = np.random.default_rng(0).random((100, 90), dtype=np.float32)
    >>> y = tileseg.segment(x, lambda b: b, patch_size=(32, 32), blend="constant", output="logits", chunks=40)
    >>> y.axes, bool(np.allclose(y.data.compute()[0], x))
    (('c', 'y', 'x'), True)
    """
    from .graph import segment_image
    from .image import _is_xarray, as_image
    from .options import InferenceOptions, TilingOptions
    from .predictors import load_predictor

    tiling = TilingOptions(patch_size=patch_size if np.isscalar(patch_size) else tuple(patch_size), overlap=overlap,
                           overlap_px=overlap_px, blend=blend, chunks=chunks, pad_mode=pad_mode,
                           target_spacing=None if target_spacing is None else tuple(target_spacing))
    inference = InferenceOptions(batch_size=batch_size, output=output, nan_policy=nan_policy, fill_value=fill_value,
                                 preprocess=tuple(preprocess or ()), out_channels=out_channels,
                                 class_names=None if class_names is None else tuple(class_names),
                                 resources=resources, lookahead=lookahead, skip_nodata=skip_nodata,
                                 bad_output=bad_output)
    given_xarray = _is_xarray(image)
    spatial_ndim = None if np.isscalar(patch_size) else len(tuple(patch_size))
    try:
        img = as_image(image, spatial_ndim=spatial_ndim)
    except ValueError as exc:
        from .errors import InputError

        raise InputError(str(exc)) from exc
    if resources:  # no worker offers them: fail now rather than wait forever
        from .placement import prepare

        prepare(resources)
    predictor = load_predictor(model, device=device, precision=precision, tta=tta, channels_last=channels_last,
                               compile=compile)
    if not np.isscalar(patch_size):
        from .predictors.check import check_patch_size

        check_patch_size(predictor, tuple(patch_size))
    result = segment_image(img, predictor, tiling, inference)
    if given_xarray:
        from .interop.xarray import to_xarray

        return to_xarray(result, like=image)
    return result


def write(
    image: Any,
    path: str | os.PathLike[str],
    *,
    writer: str | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    compute: bool = True,
    options: dict[str, Any] | None = None,
) -> WriteJob:
    """Write an image with its metadata through the writer registry (atomic, resumable).

    The output appears at ``path`` only when complete (local outputs are
    written beside it and renamed into place; completion is recorded in the
    output), exactly as ``tileseg run`` writes.

    Parameters
    ----------
    image : Image or xarray.DataArray
        What to write (e.g. the result of :func:`segment`).
    path : str or os.PathLike
        Output path or fsspec URL.
    writer : str, optional
        Writer name from the registry (``"zarr"``, ``"cog"``, ``"vector"``, ``"nifti"``,
        ``"dicom_seg"``); by default the one the path's ending asks for
        (:func:`~tileseg.writers.writer_for_path`: ``.tif`` COG, ``.nii.gz`` NIfTI,
        ``.dcm`` DICOM SEG, ``.gpkg`` polygons, anything else Zarr).
    overwrite : bool
        Replace a finished output already at ``path``.
    storage_options : dict, optional
        fsspec options for URLs.
    compute : bool
        Write now (default). ``False`` returns the job with its Dask task:
        compute it, then call ``get_writer(writer).finalize(job.handle)``.
    options : dict, optional
        Writer-specific keyword arguments (e.g. ``{"chunks": (512, 512)}``).

    Returns
    -------
    WriteJob
        ``job.handle.path`` is the output; ``job.done`` tells whether it was finalized.
    """
    from .image import as_image
    from .placement import prepare, resources_in
    from .writers import get_writer, writer_for_path

    image = as_image(image)
    if compute:  # a segmentation whose inference needs resources: placed on the client computing it now
        prepare(resources_in(image.data))
    return get_writer(writer or writer_for_path(os.fspath(path))).write(image, os.fspath(path), overwrite=overwrite,
                                    storage_options=storage_options, compute=compute, options=options)


def run(
    pipeline: str | os.PathLike[str] | dict[str, Any] | PipelineConfig,
    *,
    scheduler: str | None = None,
    client: Any = None,
    resume: bool = True,
    fresh: bool = False,
    retry_failed: bool = False,
    progress: bool = False,
) -> RunReport:
    """Run a pipeline over all its input items; returns the :class:`~tileseg.report.RunReport`.

    Inside an active ``distributed.Client`` (or with ``client=``) the run
    computes on that cluster and creates no scheduler of its own, unless
    ``scheduler`` or the pipeline's ``execution.scheduler`` names one. The
    parameters are those of :func:`tileseg.runner.run_pipeline` (``fresh``
    recomputes everything, ``retry_failed`` retries items that failed before,
    ``progress`` shows a progress bar). ``report.ok`` is false when an item failed.
    """
    from .runner import run_pipeline

    return run_pipeline(pipeline, scheduler=scheduler, client=client, resume=resume, fresh=fresh,
                        retry_failed=retry_failed, progress=progress)


def load_pipeline(
    path: str | os.PathLike[str] | dict[str, Any],
    *,
    overrides: dict[str, Any] | None = None,
) -> PipelineConfig:
    """Load and validate a pipeline file; errors name the YAML key (see :func:`tileseg.config.load_pipeline`).

    ``overrides`` replaces values by dotted key before validation, e.g.
    ``{"input.path": "/data/day1", "outputs.0.path": "out/{stem}.zarr"}``.
    """
    from .config import load_pipeline as _load

    return _load(path, overrides=overrides)

