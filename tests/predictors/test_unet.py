from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tileseg.errors import ConfigError, ModelError  # noqa: E402
from tileseg.predictors.unet import UNet, unet_receptive_radius  # noqa: E402


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.script(module)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "instance", "group", None])
def test_output_shape_equals_input_shape(dims, norm):
    torch.manual_seed(0)
    net = UNet(2, 3, spatial_dims=dims, depth=3, base_features=4, norm=norm).eval()
    spatial = (12, 16, 20)[:dims] if dims == 3 else (20, 36)
    x = torch.randn(2, 2, *spatial)
    y = net(x)
    assert y.shape == (2, 3, *spatial)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_scripted_matches_eager(depth):
    torch.manual_seed(1)
    net = UNet(1, 2, spatial_dims=2, depth=depth, base_features=4).eval()
    x = torch.randn(1, 1, 32, 40)
    scripted = _script(net)
    assert torch.allclose(scripted(x), net(x), atol=1e-6)
    assert scripted.in_channels == 1 and scripted.out_channels == 2
    assert scripted.size_divisor == 2 ** (depth - 1)


def test_bad_sizes_raise_clear_error():
    net = UNet(1, 2, spatial_dims=2, depth=3, base_features=4).eval()
    with pytest.raises(ModelError, match=r"divisible by 4.*\(30, 32\)"):
        net(torch.zeros(1, 1, 30, 32))
    with pytest.raises(ModelError, match="model expects 1 input channels, image has 3"):
        net(torch.zeros(1, 3, 32, 32))
    net3 = UNet(1, 2, spatial_dims=3, depth=4, base_features=2).eval()
    with pytest.raises(ModelError, match="divisible by 8"):
        net3(torch.zeros(1, 1, 16, 16, 12))
    # the scripted net still refuses (as a torch.jit.Error from TorchScript)
    with pytest.raises(torch.jit.Error, match="divisible by 4"):
        _script(net)(torch.zeros(1, 1, 30, 32))


@pytest.mark.parametrize("kwargs, key", [
    ({"spatial_dims": 4}, "spatial_dims"), ({"depth": 1}, "depth"), ({"norm": "layer"}, "norm"),
    ({"base_features": 0}, "base_features"),
])
def test_bad_config(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        UNet(1, 2, **kwargs)


def test_receptive_field_bounds_the_gradient_support():
    """Input pixels further than the declared radius never influence an output pixel."""
    torch.manual_seed(2)
    for depth in (2, 3):
        net = UNet(1, 1, spatial_dims=2, depth=depth, base_features=4, norm=None).eval()
        r = net.receptive_field[0]
        assert r == unet_receptive_radius(depth)
        size = 2 * r + 24
        for cy, cx in [(size // 2, size // 2), (size // 2 + 1, size // 2 - 1)]:
            x = torch.randn(1, 1, size, size, requires_grad=True)
            net(x)[0, 0, cy, cx].backward()
            ys, xs = np.nonzero(x.grad[0, 0].numpy())
            assert len(ys) > 0
            reach = max(np.abs(ys - cy).max(), np.abs(xs - cx).max())
            assert reach <= r
            assert reach >= r - 2 ** depth  # the bound is not wildly loose


def test_receptive_field_unknown_with_patch_statistics_norm():
    assert UNet(1, 2, norm="instance").receptive_field == ()
    assert UNet(1, 2, norm="batch", spatial_dims=3).receptive_field == (26, 26, 26)
