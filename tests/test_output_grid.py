"""Strided models stitched on their own output grid: tiled == one forward over the whole image."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tileseg  # noqa: E402
from tileseg.errors import TilingError  # noqa: E402
from tileseg.image import Image  # noqa: E402
from tileseg.output_grid import depth_to_space, space_to_depth  # noqa: E402
from tileseg.predictors.conventions import Conventions  # noqa: E402
from tileseg.predictors.torch import TorchPredictor  # noqa: E402
from tileseg.testing import blobs_2d  # noqa: E402


class Strided(torch.nn.Module):
    """3x3 convolution (receptive-field radius 1 input pixel), tanh, 2x2 average pooling: output stride 2."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(torch.tanh(self.conv(x)), 2)


def test_space_to_depth_round_trip():
    a = np.random.default_rng(0).normal(size=(2, 6, 4, 8)).astype(np.float32)
    small = space_to_depth(a, 2)
    assert small.shape == (16, 3, 2, 4)
    np.testing.assert_array_equal(depth_to_space(small[None], 2)[0], a)


def test_output_grid_equals_whole_image_forward_and_has_coarse_geometry():
    image, _ = blobs_2d((70, 91), 0, dtype=np.float32, radius=(3.0, 10.0), coverage=0.25)
    img = Image(data=image, axes=("y", "x"), spacing=(0.5, 0.25), origin=(10.0, -4.0))
    model = Strided().eval()
    p = TorchPredictor(model, device="cpu", conventions=Conventions(output_stride=2, output_grid=True))
    # crop blending with 8 px overlap (4 on the output grid) keeps pixels >= 4 input px from any patch edge
    out = tileseg.segment(img, p, patch_size=(32, 32), overlap_px=8, blend="crop", output="logits", chunks=(40, 40))
    padded = np.pad(image, ((0, 0), (0, 1)), mode="reflect")  # 91 -> 92, a multiple of the stride
    with torch.no_grad():
        want = model(torch.from_numpy(padded)[None, None])[0].numpy()
    got = out.data.compute()
    assert got.shape == want.shape == (3, 35, 46)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert out.spacing == (1.0, 0.5)
    assert out.origin == (10.0 + 0.25, -4.0 + 0.125)  # centre of the first 2 x 2 block of input pixels
    labels = tileseg.segment(img, p, patch_size=(32, 32), overlap_px=8, blend="gaussian", chunks=(40, 40))
    assert labels.data.shape == (35, 46) and labels.class_names is not None


def test_patch_not_a_multiple_of_the_stride_is_refused():
    p = TorchPredictor(Strided().eval(), device="cpu", conventions=Conventions(output_stride=2, output_grid=True))
    with pytest.raises(TilingError, match="multiple of the model's output_stride 2"):
        tileseg.segment(np.zeros((40, 40), np.float32), p, patch_size=(33, 32))
