"""The built-in U-Net (2D and 3D), a small fully convolutional segmentation net.

Each level is a double ``3x3`` (``3x3x3``) convolution, each followed by an
optional normalisation and a ReLU; the encoder goes down by ``2x`` max-pooling,
the decoder up by ``2x`` transposed convolutions, with skip connections by
concatenation, and a ``1x1`` head gives ``out_channels`` logits.

Build it from a pipeline with the model spec::

    model:
      unet: {in_channels: 1, out_channels: 2, spatial_dims: 2, depth: 3, base_features: 16}
      weights: models/unet2d_state_dict.pt      # torch.save(model.state_dict(), ...)

This module imports torch at import time; import it only when a model is needed
(:func:`tileseg.predictors.load_predictor` does so lazily).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError, ModelError

__all__ = ["UNet", "unet_receptive_radius"]

NORMS = ("batch", "instance", "group", None)


def _norm(kind: str | None, dims: int, channels: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    # group: up to 8 groups, always a divisor of the channel count
    groups = math.gcd(8, channels)
    return nn.GroupNorm(groups, channels)


class _DoubleConv(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, norm: str | None) -> None:
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        bias = norm is None
        super().__init__(
            conv(cin, cout, 3, padding=1, bias=bias), _norm(norm, dims, cout), nn.ReLU(inplace=True),
            conv(cout, cout, 3, padding=1, bias=bias), _norm(norm, dims, cout), nn.ReLU(inplace=True),
        )


def unet_receptive_radius(depth: int) -> int:
    """Conservative receptive-field radius (pixels) of :class:`UNet` of ``depth`` levels.

    Every output pixel depends only on input pixels within this distance (per
    axis). Each ``3x3`` conv adds one step at the current scale; each pooling
    and each upsampling adds at most one step of misalignment at its scale.

    Examples
    --------
    >>> unet_receptive_radius(3)
    26
    """
    radius, step = 0, 1
    for _ in range(depth - 1):  # encoder level + pool
        radius += 2 * step + step
        step *= 2
    radius += 2 * step  # bottleneck
    for _ in range(depth - 1):  # up + decoder level
        radius += step // 2
        step //= 2
        radius += 2 * step
    return radius


class UNet(nn.Module):
    """U-Net for 2D or 3D images.

    Parameters
    ----------
    in_channels : int
        Input channels ``C``.
    out_channels : int
        Output channels ``K`` (logits).
    spatial_dims : {2, 3}
        2D or 3D convolutions.
    depth : int
        Number of resolution levels including the bottleneck (2 to 6; 3 or 4
        are typical). Input spatial sizes must be divisible by
        ``2 ** (depth - 1)`` (:attr:`size_divisor`).
    base_features : int
        Channels of the first level; doubled at every level down.
    norm : {"batch", "instance", "group", None}
        Normalisation after every convolution (``group`` uses up to 8 groups).
        ``instance`` and ``group`` normalise with statistics of the whole
        patch, so their output depends on the patch, not only on a local
        neighbourhood (no finite :attr:`receptive_field`).

    Raises
    ------
    ConfigError
        If a parameter is out of range.

    Examples
    --------
    >>> import torch
    >>> net = UNet(1, 2, spatial_dims=2, depth=3, base_features=4)
    >>> net(torch.zeros(1, 1, 32, 48)).shape
    torch.Size([1, 2, 32, 48])
    """

    def __init__(self, in_channels: int, out_channels: int, spatial_dims: int = 2, depth: int = 3,
                 base_features: int = 16, norm: str | None = "batch") -> None:
        super().__init__()
        for key, value, low in (("in_channels", in_channels, 1), ("out_channels", out_channels, 1),
                                ("base_features", base_features, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"unet.{key}: must be an integer >= {low}, got {value!r}")
        if spatial_dims not in (2, 3):
            raise ConfigError(f"unet.spatial_dims: must be 2 or 3, got {spatial_dims!r}")
        if not isinstance(depth, int) or not 2 <= depth <= 6:
            raise ConfigError(f"unet.depth: must be an integer from 2 to 6, got {depth!r}")
        if norm not in NORMS:
            raise ConfigError(f"unet.norm: must be one of {NORMS}, got {norm!r}")
        self.config = {
            "in_channels": in_channels, "out_channels": out_channels, "spatial_dims": spatial_dims,
            "depth": depth, "base_features": base_features, "norm": norm,
        }
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.spatial_dims = spatial_dims
        self.size_divisor = 2 ** (depth - 1)
        #: Receptive-field radius in pixels per spatial axis (conservative); empty when
        #: instance/group norm makes every output depend on the whole patch.
        self.receptive_field = ((unet_receptive_radius(depth),) * spatial_dims
                                if norm in ("batch", None) else ())
        feats = [base_features * 2**i for i in range(depth)]
        pool = nn.MaxPool2d if spatial_dims == 2 else nn.MaxPool3d
        upconv = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
        head = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.down = nn.ModuleList()
        cin = in_channels
        for f in feats:
            self.down.append(_DoubleConv(spatial_dims, cin, f, norm))
            cin = f
        self.pool = pool(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for f in reversed(feats[:-1]):
            self.up.append(upconv(f * 2, f, 2, stride=2))
            self.dec.append(_DoubleConv(spatial_dims, f * 2, f, norm))
        self.head = head(feats[0], out_channels, 1)

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.spatial_dims + 2:
            raise ModelError(
                f"UNet ({self.spatial_dims}D) expects a batch (N, C, {'Z, ' if self.spatial_dims == 3 else ''}Y, X),"
                f" got shape {tuple(x.shape)!r}")
        if x.shape[1] != self.in_channels:
            raise ModelError(f"model expects {self.in_channels} input channels, image has {x.shape[1]}")
        bad = [s for s in x.shape[2:] if s % self.size_divisor]
        if bad:
            raise ModelError(
                f"UNet of depth {len(self.down)} needs patch sizes divisible by {self.size_divisor}, "
                f"got {tuple(x.shape[2:])!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        else:
            for s in x.shape[2:]:
                if s % self.size_divisor != 0:
                    raise RuntimeError(
                        "UNet needs patch sizes divisible by " + str(self.size_divisor))
        skips: list[torch.Tensor] = []
        n = len(self.down)
        for i, block in enumerate(self.down):
            x = block(x)
            if i < n - 1:
                skips.append(x)
                x = self.pool(x)
        for i, (up, dec) in enumerate(zip(self.up, self.dec)):
            x = up(x)
            x = dec(torch.cat([skips[n - 2 - i], x], dim=1))
        return self.head(x)
