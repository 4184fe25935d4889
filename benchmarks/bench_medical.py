"""Benchmark: a CT series, DICOM in -> DICOM SEG + NIfTI out, with a small 3D U-Net.

Variants, each in its own process (wall time and the child's peak RSS from ``wait4``):

* ``tileseg``: ``tileseg run`` of the series (the DICOM reader decodes slabs of
  slices in their tasks) -> DICOM SEG (highdicom, assembled at the end) and
  NIfTI (streamed slab by slab);
* ``tileseg-nifti``: the same with the NIfTI output only (what the engine itself costs);
* ``usual``: pydicom reads every slice into one float32 volume, MONAI
  ``sliding_window_inference`` (same net, patch, overlap, Gaussian blending,
  batch) on it, argmax, nibabel writes the NIfTI (no SEG);
* ``floor``: a process that only imports torch, dask and tileseg, loads the
  net and runs one forward of a batch: the part of every variant's peak RSS
  that does not depend on the image;
* ``seg-dense``: a dense SEG alone, what the DICOM SEG writer costs: ``tileseg
  run`` with a HU threshold (> -500 HU: the water cylinder, on every slice)
  -> DICOM SEG only;
* ``seg-finalize``: the same dense SEG written in-process by the ``dicom_seg``
  writer (``tileseg.open`` -> threshold -> write task), timing only its
  ``finalize`` and sampling the process's RSS every 5 ms during it: the
  growth over the RSS before ``finalize`` (highdicom and pydicom's code
  dictionaries already loaded) is what assembling the SEG costs;
* ``seg-highdicom``: the same SEG the usual way: pydicom reads every slice, the
  mask is computed in memory and highdicom's ``Segmentation`` is built from the
  whole array (what tileseg's writer did before it streamed the frames).

The series is :func:`tileseg.testing.dicom.write_ct_series` (512 x 512 x N,
shuffled files), written once into the work folder; the net is the bundled
small 3D U-Net (``examples/models/unet3d.pt``, trained on bright blobs: on the
z-scored CT it marks the bone sphere), patch 64^3, overlap 0.25, batch 2.
Ratios are against ``usual`` in the same run.

Usage::

    python benchmarks/bench_medical.py --slices 600
    python benchmarks/bench_medical.py --slices 64 --size 128          # smoke run
    python benchmarks/bench_medical.py --slices 1500 --variants seg-dense seg-highdicom
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's tileseg, also in the children that run this file
MODEL = ROOT / "examples" / "models" / "unet3d.pt"  # the bundled small 3D U-Net (bright blobs)
PATCH, OVERLAP, BATCH = (64, 64, 64), 0.25, 2
DENSE_HU = -500  # the phantom's water cylinder (0 HU) runs through every slice; air is -1000 HU


def prepare(workdir: Path, slices: int, size: int) -> tuple[Path, Path]:
    """The series (written once) and the model file."""
    series = workdir / f"ct{slices}x{size}"
    if not series.exists():
        from tileseg.testing.dicom import write_ct_series

        write_ct_series(series, shape=(slices, size, size), spacing=(1.25, 0.7, 0.7))
    return series, MODEL


def run_variant(name: str, series: Path, weights: Path, workdir: Path) -> dict:
    t0 = time.perf_counter()
    if name.startswith("tileseg") or name == "seg-dense":
        import tileseg

        if name == "seg-dense":
            outs = [f"{{path: '{workdir}/out_{name}.dcm', writer: dicom_seg}}"]
            method = f"method: {{fixed_physical: {{threshold: {DENSE_HU}}}}}\n"
        else:
            outs = [f"{{path: '{workdir}/out_{name}.nii.gz', writer: nifti}}"]
            if name == "tileseg":
                outs.append(f"{{path: '{workdir}/out_{name}.dcm', writer: dicom_seg}}")
            method = (f"preprocess: [zscore]\ntiling: {{patch_size: {list(PATCH)}, overlap: {OVERLAP}}}\n"
                      f"model: {{torchscript: {{path: '{weights}'}}, batch_size: {BATCH}, "
                      "classes: [background, bright]}\n")
        pipe = workdir / f"{name}.yaml"
        pipe.write_text(
            "version: 1\n"
            f"input: {{path: '{series}'}}\n"
            + method +
            f"outputs: [{', '.join(outs)}]\n"
            # the medical pipelines pin glibc's mmap threshold (pipelines/ct_model.yaml): freed slabs go back
            "execution: {scheduler: threads, workers: 2, malloc_mmap_threshold: 1048576}\n")
        report = tileseg.run(pipe, resume=False)
        if report.items[0].status != "ok":
            raise RuntimeError(report.items[0].error)
        shape = report.items[0].shape
    elif name == "floor":
        return floor(weights)
    elif name == "seg-highdicom":
        shape = highdicom_seg(series, workdir / "out_seg-highdicom.dcm")
    elif name == "seg-finalize":
        return finalize_only(series, workdir / "out_seg-finalize.dcm")
    elif name == "usual":
        import nibabel as nib
        import numpy as np
        import pydicom
        import torch
        from monai.inferers import sliding_window_inference

        torch.set_num_threads(2)
        dss = [pydicom.dcmread(f) for f in sorted(series.iterdir())]
        dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
        vol = np.stack([d.pixel_array.astype(np.float32) * float(d.RescaleSlope) + float(d.RescaleIntercept)
                        for d in dss])
        del dss
        vol = (vol - vol.mean()) / vol.std()  # the same global z-score
        net = torch.jit.load(str(weights)).eval()
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(vol[None, None]), PATCH, BATCH, net,
                                              overlap=OVERLAP, mode="gaussian")
        labels = logits.argmax(1)[0].to(torch.uint8).numpy()
        del logits
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), np.eye(4)), str(workdir / "out_usual.nii.gz"))
        shape = list(vol.shape)
    else:
        raise ValueError(name)
    return {"variant": name, "shape": shape, "seconds": round(time.perf_counter() - t0, 2)}


def floor(weights: Path) -> dict:
    """``floor``: what any run of the net costs before its data: torch, dask and tileseg imported, the
    model loaded and one forward of a batch (its activations), in a process of its own."""
    import dask.array  # noqa: F401
    import torch

    import tileseg  # noqa: F401

    t0 = time.perf_counter()
    torch.set_num_threads(2)
    net = torch.jit.load(str(weights)).eval()
    with torch.inference_mode():
        net(torch.zeros((BATCH, 1) + PATCH))
    return {"variant": "floor", "shape": [BATCH, *PATCH], "seconds": round(time.perf_counter() - t0, 2)}


def finalize_only(series: Path, out: Path) -> dict:
    """``seg-finalize``: the dicom_seg writer's finalize alone, with its RSS growth (sampled every 5 ms)."""
    import threading

    import dask
    import psutil

    import tileseg
    from tileseg.writers import get_writer

    image = tileseg.open(str(series))
    mask = image.with_data((image.data > DENSE_HU).astype("uint8"), class_names=["background", "water"])
    writer = get_writer("dicom_seg")
    handle = writer.prepare(mask, str(out), overwrite=True)
    with dask.config.set(scheduler="threads", num_workers=2):
        dask.compute(writer.write_task(handle, mask))
    import highdicom.seg  # noqa: F401 - imports and pydicom's code dictionaries: a fixed cost, not the SEG's
    from pydicom.sr.codedict import codes

    _ = (codes.SCT.Tissue, codes.DCM.ImageProcessing)
    proc = psutil.Process()
    before = peak = proc.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    writer.finalize(handle)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"variant": "seg-finalize", "shape": list(mask.shape), "seconds": round(seconds, 2),
            "rss_before_mib": round(before / 2**20), "finalize_growth_mib": round((peak - before) / 2**20),
            "seg_mib": round(out.stat().st_size / 2**20, 1)}


def highdicom_seg(series: Path, out: Path) -> list[int]:
    """The dense SEG of ``seg-dense`` built the usual way: the whole mask in memory, highdicom's Segmentation."""
    import highdicom as hd
    import numpy as np
    import pydicom
    from pydicom.sr.codedict import codes

    slices = []
    for f in sorted(series.iterdir()):
        d = pydicom.dcmread(f)
        slices.append((float(d.ImagePositionPatient[2]), d,
                       d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) > DENSE_HU))
        del d.PixelData  # highdicom needs the headers only
    slices.sort(key=lambda t: t[0])
    dss = [d for _, d, _ in slices]
    mask = np.stack([m for _, _, m in slices])
    del slices
    algorithm = hd.AlgorithmIdentificationSequence(name="bench", version="1", family=codes.DCM.ImageProcessing)
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="water", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    seg = hd.seg.Segmentation(
        source_images=dss, pixel_array=mask.astype(np.uint8), segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9901,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="bench", manufacturer_model_name="bench",
        software_versions="1", device_serial_number="0", omit_empty_frames=True)
    seg.save_as(str(out), enforce_file_format=True)
    return list(mask.shape)


def launch(name: str, args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--slices", str(args.slices), "--size", str(args.size),
           "--workdir", str(workdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read() if proc.stdout else ""
    if os.waitstatus_to_exitcode(status) != 0:
        return {"variant": name, "error": out.strip()[-300:] or f"exit {status}"}
    row = json.loads(out.strip().splitlines()[-1])
    voxels = 1
    for s in row["shape"]:
        voxels *= s
    row["mvox_per_s"] = round(voxels / 1e6 / row["seconds"], 2)
    row["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
    row["float_volume_mib"] = round(voxels * 4 / 2**20)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=600)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--variants", nargs="+",
                    default=["floor", "tileseg", "tileseg-nifti", "usual", "seg-dense", "seg-finalize", "seg-highdicom"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tileseg-bench-med-"))
    if not args.worker and not (workdir / f"ct{args.slices}x{args.size}").exists():
        # written by a child: a child's peak RSS (wait4) starts from its parent's RSS when it was forked
        subprocess.run([sys.executable, __file__, "--worker", "prepare", "--slices", str(args.slices),
                        "--size", str(args.size), "--workdir", str(workdir)], check=True, stdout=subprocess.DEVNULL)
    series, weights = prepare(workdir, args.slices, args.size)
    if args.worker == "prepare":
        return
    if args.worker:
        print(json.dumps(run_variant(args.worker, series, weights, workdir)))
        return
    rows = [launch(v, args, workdir) for v in args.variants]
    baselines = {"seg-dense": "seg-highdicom", "seg-finalize": "seg-highdicom",
                 "seg-highdicom": "seg-highdicom"}  # else: usual
    print("| variant | volume | seconds | Mvoxel/s | speed vs | peak RSS (MiB) | RSS vs | float32 volume (MiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error']} | | | | | | |")
            continue
        against = baselines.get(r["variant"], "usual")
        base = next((b for b in rows if b.get("variant") == against and "seconds" in b), None)
        speed = f"{base['seconds'] / r['seconds']:.2f}x {against}" if base else "-"
        memory = f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x" if base else "-"
        print(f"| {r['variant']} | {'x'.join(map(str, r['shape']))} | {r['seconds']} | {r['mvox_per_s']} | {speed} | "
              f"{r['peak_rss_mib']} | {memory} | {r['float_volume_mib']} |")
    low = next((r for r in rows if r.get("variant") == "floor" and "peak_rss_mib" in r), None)
    if low:
        print(f"\nfloor (imports + model + one forward): {low['peak_rss_mib']} MiB; above it:")
        for r in rows:
            if r.get("variant") != "floor" and "peak_rss_mib" in r:
                print(f"  {r['variant']}: {r['peak_rss_mib'] - low['peak_rss_mib']} MiB "
                      f"({(r['peak_rss_mib'] - low['peak_rss_mib']) / r['float_volume_mib']:.2f}x the float32 volume)")
    for r in rows:
        if "finalize_growth_mib" in r:
            print(f"\nseg-finalize: finalize {r['seconds']} s, RSS {r['rss_before_mib']} MiB before it, grew by "
                  f"{r['finalize_growth_mib']} MiB during it; SEG file {r['seg_mib']} MiB")


if __name__ == "__main__":
    main()
