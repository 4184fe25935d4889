"""``tileseg export``: a PyTorch model (architecture + state_dict, or a ``python:`` callable) to a
``torch.export`` program (``.pt2``) and/or ONNX, each with a dynamic batch axis and each verified
against the PyTorch model on random input before it is written; optional ONNX Runtime INT8
quantisation with its accuracy change measured on sample patches.

The exported model returns the one tensor the conventions' ``output`` selects
(a torchvision ``out``, Hugging Face ``logits``), in the model's own layout
and output stride: give the exported file the same ``layout``,
``output_stride`` and ``activation`` as the source, but no ``output``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError, ModelError, require

log = logging.getLogger(__name__)

__all__ = ["export_model", "ExportReport"]


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how closely each file matches the PyTorch model."""

    written: dict[str, str] = field(default_factory=dict)
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    quantization: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {"written": self.written, "max_abs_diff": self.max_abs_diff, "quantization": self.quantization}


def _selected(module: Any, output: Any) -> Any:
    """``module`` returning the one tensor the conventions select (dict/tuple/output objects)."""
    import torch

    from .predictors.conventions import select_output

    class Selected(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return select_output(self.model(x), output, torch.is_tensor)

    return Selected().eval()


def _check_close(name: str, got: np.ndarray, ref: np.ndarray, rtol: float, atol: float) -> float:
    diff = float(np.max(np.abs(got.astype(np.float64) - ref))) if got.size else 0.0
    if got.shape != ref.shape or not np.allclose(got, ref, rtol=rtol, atol=atol):
        raise ModelError(f"export to {name} not written: its output differs from the PyTorch model on random input "
                         f"(shape {got.shape} vs {ref.shape}, max abs diff {diff:.3g}; rtol={rtol}, atol={atol})")
    return diff


def _replace(tmp: Path, dest: Path) -> None:
    os.replace(tmp, dest)


def export_model(spec: dict[str, Any], *, patch_size: tuple[int, ...], in_channels: int | None = None,
                 pt2: str | os.PathLike | None = None, onnx: str | os.PathLike | None = None,
                 int8: str | os.PathLike | None = None, samples: np.ndarray | None = None,
                 opset: int | None = None, rtol: float = 1e-3, atol: float = 1e-4, seed: int = 0) -> ExportReport:
    """Export a torch model kind to ``.pt2`` and/or ``.onnx`` (dynamic batch), verified before writing.

    Parameters
    ----------
    spec : dict
        A torch model kind, e.g. ``{"state_dict": {"path": "w.pt", "architecture": {"smp": {...}}}}``.
    patch_size : tuple of int
        Spatial size of the example input.
    in_channels : int, optional
        Input channels when the model cannot tell.
    pt2, onnx : path, optional
        Where to write the exported program / the ONNX file.
    int8 : path, optional
        Also write an ONNX Runtime static INT8 quantisation of the ONNX file
        (needs ``onnx``), calibrated on ``samples``.
    samples : numpy.ndarray, optional
        ``(N, C, *patch)`` sample patches for calibration and the accuracy
        report (default: 8 random normal patches).
    opset : int, optional
        ONNX opset (default: the exporter's).
    rtol, atol : float
        Tolerance of the check against the PyTorch model.
    seed : int
        Seed of the random check input.

    Returns
    -------
    ExportReport

    Raises
    ------
    ModelError
        If an export fails or its output differs from the PyTorch model (nothing is written then).
    ConfigError
        If the spec is not a torch model kind, or nothing to write was asked for.
    """
    torch = require("torch", "models")
    from .predictors import load_predictor
    from .predictors.torch import TorchPredictor

    if pt2 is None and onnx is None:
        raise ConfigError("export: give at least one of pt2 / onnx to write")
    if int8 is not None and onnx is None:
        raise ConfigError("export: int8 quantisation needs an onnx path")
    kind = next(iter(spec)) if isinstance(spec, dict) and spec else None
    if kind in ("torchscript", "exported"):
        raise ConfigError(f"export: a {kind!r} model is already compiled and cannot be exported again (its "
                          "parameters are not nn.Parameters and its batch size may be fixed); export from the "
                          "source: a state_dict with its architecture, or a python: callable")
    predictor = load_predictor(spec, device="cpu")
    if not isinstance(predictor, TorchPredictor):
        raise ConfigError(f"export: {next(iter(spec))!r} is not a PyTorch model kind")
    conv = predictor.conventions
    cin = in_channels or predictor.in_channels
    if cin is None:
        raise ConfigError("export: the model does not say how many input channels it takes; give in_channels")
    patch = tuple(int(p) for p in patch_size)
    model = _selected(predictor.module, conv.output)
    rng = np.random.default_rng(seed)
    shape = (cin, *patch) if not conv.channels_last else (*patch, cin)
    x2 = rng.normal(size=(2, *shape)).astype(np.float32)
    x3 = rng.normal(size=(3, *shape)).astype(np.float32)  # another batch size checks the dynamic axis
    with torch.inference_mode():
        ref2, ref3 = (model(torch.from_numpy(x)).float().numpy() for x in (x2, x3))
    report = ExportReport()
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = ({0: batch},)
    if pt2 is not None:
        try:
            program = torch.export.export(model, (torch.from_numpy(x2),), dynamic_shapes=dynamic)
        except Exception as exc:
            raise ModelError(f"torch.export failed: {exc.__class__.__name__}: {str(exc)[:800]}") from exc
        with torch.inference_mode():
            got = [program.module()(torch.from_numpy(x)).numpy() for x in (x2, x3)]
        diff = max(_check_close(str(pt2), g, r, rtol, atol) for g, r in zip(got, (ref2, ref3)))
        dest = Path(pt2)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmpdir:
            tmp = Path(tmpdir) / (dest.stem + ".pt2")
            torch.export.save(program, str(tmp))
            _replace(tmp, dest)
        report.written["pt2"], report.max_abs_diff["pt2"] = str(dest), diff
    if onnx is not None:
        ort = require("onnxruntime", "onnx")
        dest = Path(onnx)
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmpdir:
            tmp = Path(tmpdir) / dest.name
            try:
                torch.onnx.export(model, (torch.from_numpy(x2),), str(tmp), input_names=["input"],
                                  output_names=["output"], dynamic_shapes=dynamic, dynamo=True,
                                  opset_version=opset, external_data=False, verbose=False)
            except Exception as exc:
                raise ModelError(f"ONNX export failed: {exc.__class__.__name__}: {str(exc)[:800]}") from exc
            sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = [sess.run(None, {"input": x})[0] for x in (x2, x3)]
            diff = max(_check_close(str(onnx), g, r, rtol, atol) for g, r in zip(got, (ref2, ref3)))
            _replace(tmp, dest)
        report.written["onnx"], report.max_abs_diff["onnx"] = str(dest), diff
        if int8 is not None:
            if samples is None:
                samples = rng.normal(size=(8, cin, *patch)).astype(np.float32)
            samples = np.asarray(samples, dtype=np.float32)
            if conv.channels_last and samples.shape[1] == cin and samples.shape[-1] != cin:
                samples = np.moveaxis(samples, 1, -1)
            report.quantization = quantize_int8(dest, Path(int8), samples, sess)
            report.written["int8"] = str(int8)
    return report


def quantize_int8(src: Path, dest: Path, samples: np.ndarray, reference: Any) -> dict[str, Any]:
    """Static INT8 (QDQ) quantisation of ``src`` calibrated on ``samples``; its change on them.

    ``reference`` is an ONNX Runtime session of ``src``; ``samples`` are in
    the model's own layout.

    Returns
    -------
    dict
        ``max_abs_diff`` and ``mean_abs_diff`` of the outputs, and
        ``label_agreement``: the fraction of pixels whose argmax class (``> 0``
        for one channel) is the same as with the float model; ``pre_processed``:
        whether onnxruntime's quantisation pre-processing ran.
    """
    require("onnx", "onnx")
    ort = require("onnxruntime", "onnx")
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = reference.get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: samples[i:i + 1]} for i in range(len(samples))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmpdir:
        pre = Path(tmpdir) / "pre.onnx"
        tmp = Path(tmpdir) / dest.name
        pre_processed = True
        try:  # symbolic shape inference fails on a dynamic batch axis; ONNX's own shape inference is enough
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as exc:  # pre-processing only improves quantisation; the plain model still works
            log.warning("INT8: onnxruntime's quantisation pre-processing failed (%s); quantising the model as is", exc)
            pre, pre_processed = src, False
        quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        q = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        ref = reference.run(None, {name: samples})[0]
        got = q.run(None, {name: samples})[0]
        _replace(tmp, dest)
    axis = -1 if ref.shape[-1] < ref.shape[1] else 1
    if ref.shape[axis] == 1:
        same = (ref > 0) == (got > 0)
    else:
        same = np.argmax(ref, axis=axis) == np.argmax(got, axis=axis)
    return {"max_abs_diff": float(np.max(np.abs(got - ref))), "mean_abs_diff": float(np.mean(np.abs(got - ref))),
            "label_agreement": float(np.mean(same)), "n_samples": int(len(samples)), "pre_processed": pre_processed}
