"""The feature-learning context encoder: AlexNet trunk -> channel-wise FC -> up-conv decoder.

Pathak et al. 2016, Sec. 3.1 and Fig. 2. The encoder is what transfer/ keeps; the bottleneck and
decoder exist only to make the encoder learn by inpainting.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_KEYS = ("conv1", "pool1", "conv2", "pool2", "conv3", "conv4", "conv5", "pool5")

# Caffe's AlexNet (the paper's) has grouped conv2/4/5 from the two-GPU split; torchvision's is the
# "one weird trick" variant. Both map 227x227 to 256x6x6, so every transfer head fits either.
ALEXNET_ARCHS: dict[str, dict] = {
    "caffe": {"widths": (96, 256, 384, 384, 256), "groups": (1, 2, 1, 2, 2), "conv1_padding": 0},
    "torchvision": {"widths": (64, 192, 384, 256, 256), "groups": (1, 1, 1, 1, 1), "conv1_padding": 2},
}


class AlexNetEncoder(nn.Module):
    """AlexNet conv1..pool5, with any intermediate layer available for probing.

    `forward(x, out_feat_keys)` follows VISSL's trunks: with no keys it returns pool5, otherwise the
    list of the named features (after ReLU for conv layers), in the order asked.
    `pool_free=True` replaces each 3x3/2 max-pool by a learned conv of the same kernel and stride
    (the paper's variant for finer inpainting).
    """

    def __init__(self, arch: str = "caffe", pool_free: bool = False) -> None:
        super().__init__()
        if arch not in ALEXNET_ARCHS:
            raise ValueError(f"unknown AlexNet arch {arch!r}; choose one of {sorted(ALEXNET_ARCHS)}")
        spec = ALEXNET_ARCHS[arch]
        w1, w2, w3, w4, w5 = spec["widths"]
        g1, g2, g3, g4, g5 = spec["groups"]
        self.arch, self.pool_free = arch, pool_free
        self.conv1 = nn.Conv2d(3, w1, 11, stride=4, padding=spec["conv1_padding"], groups=g1)
        self.conv2 = nn.Conv2d(w1, w2, 5, padding=2, groups=g2)
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1, groups=g3)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1, groups=g4)
        self.conv5 = nn.Conv2d(w4, w5, 3, padding=1, groups=g5)
        self.pool1, self.pool2, self.pool5 = (self._pool(c) for c in (w1, w2, w5))
        self.feature_channels = {"conv1": w1, "pool1": w1, "conv2": w2, "pool2": w2,
                                 "conv3": w3, "conv4": w4, "conv5": w5, "pool5": w5}
        self.out_channels = w5
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _pool(self, channels: int) -> nn.Module:
        if self.pool_free:
            return nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU(inplace=True))
        return nn.MaxPool2d(3, stride=2)

    def forward(self, x: torch.Tensor, out_feat_keys: Sequence[str] | None = None):
        unknown = set(out_feat_keys or ()) - set(FEATURE_KEYS)
        if unknown:
            raise KeyError(f"unknown feature keys {sorted(unknown)}; available: {FEATURE_KEYS}")
        feats: dict[str, torch.Tensor] = {}
        deepest = max(FEATURE_KEYS.index(k) for k in (out_feat_keys or ["pool5"]))
        for key in FEATURE_KEYS[: deepest + 1]:  # stop at the deepest layer asked for
            layer = getattr(self, key)
            x = F.relu(layer(x), inplace=True) if key.startswith("conv") else layer(x)
            feats[key] = x  # conv1 (B, 96, 55, 55) ... pool5 (B, 256, 6, 6) for a 227x227 input
        if out_feat_keys is None:
            return x
        return [feats[k] for k in out_feat_keys]


def gaussian_init_(trunk: nn.Module, std: float = 0.01) -> None:
    """Every conv weight ~ N(0, std^2), biases 0: the Caffe-era random start (the paper's Table 2 'random')."""
    for m in trunk.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


class TimmEncoder(nn.Module):
    """Any timm CNN's last feature map as the context encoder's trunk (random init, nothing downloaded)."""

    def __init__(self, model_name: str) -> None:
        super().__init__()
        import timm  # imported lazily: only this option needs it

        self.body = timm.create_model(model_name, features_only=True, pretrained=False, out_indices=(-1,))
        self.out_channels = self.body.feature_info.channels()[-1]
        self.feature_channels = {"last": self.out_channels}

    def forward(self, x: torch.Tensor, out_feat_keys: Sequence[str] | None = None):
        out = self.body(x)[-1]  # (B, C, H/32, W/32)
        return out if out_feat_keys is None else [out]


class ChannelWiseFC(nn.Module):
    """A dense layer inside each feature map, with no weights across maps.

    For 256 maps of 6x6 that is 256 x (36x36 + 36) parameters instead of the 256x36 squared of a
    full FC layer: the decoder can still reason about the whole image layout, at 1/256 the cost.
    One batched einsum, not a loop over channels.
    """

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        n = height * width
        self.channels, self.height, self.width = channels, height, width
        self.weight = nn.Parameter(torch.empty(channels, n, n))  # (C, in=HW, out=HW)
        self.bias = nn.Parameter(torch.zeros(channels, n))  # (C, HW)
        nn.init.kaiming_uniform_(self.weight.view(channels * n, n), a=5 ** 0.5)  # nn.Linear's default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape  # (B, C, H, W)
        if (c, h, w) != (self.channels, self.height, self.width):
            raise ValueError(f"ChannelWiseFC built for {(self.channels, self.height, self.width)}, got {(c, h, w)}")
        y = torch.einsum("bci,cio->bco", x.reshape(b, c, h * w), self.weight)  # (B, C, HW)
        return (y + self.bias).reshape(b, c, h, w)  # (B, C, H, W)


class ContextEncoderBottleneck(nn.Module):
    """Channel-wise FC, dropout 0.5, then a stride-1 1x1 conv to mix information across channels."""

    def __init__(self, channels: int, height: int, width: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.channel_fc = ChannelWiseFC(channels, height, width)
        self.dropout = nn.Dropout(dropout)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(F.relu(self.channel_fc(x)))  # (B, C, H, W)
        return F.relu(self.mix(x))  # (B, C, H, W)


class ChannelsFirstGroupNorm(nn.GroupNorm):
    """GroupNorm computed on an NCHW copy of a channels_last input, returned in the input's layout.

    PyTorch's CPU GroupNorm backward has no fast channels_last path for bf16: at (64, 16, 96, 96) it took
    94 ms against 1.7 ms in NCHW here, so the two layout copies (~3 ms) pay for themselves many times.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)  # (B, C, H, W)


class UpConvDecoder(nn.Module):
    """Five 4x4 stride-2 up-convolutions with ReLU: 6x6 -> 192x192, then resized to the output size.

    Widths halve from 128: at 96x96 and 192x192 a wide up-conv would cost more than the whole
    encoder (widths from 256 made the decoder 3x the encoder's FLOPs), and only the encoder is kept.
    GroupNorm rather than BatchNorm: per-sample statistics make a DDP step identical to a
    single-process step of the same global batch (CPU/gloo has no SyncBatchNorm).

    The final resize is bilinear because 227 is not a power-of-two multiple of 6; it is the only
    non-learned step and it happens at full resolution, where it cannot blur the features.
    """

    def __init__(self, in_channels: int, widths: Sequence[int] = (128, 64, 32, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.ConvTranspose2d(c, w, 4, stride=2, padding=1), ChannelsFirstGroupNorm(8, w), nn.ReLU(inplace=True)]
            c = w
        layers.append(nn.ConvTranspose2d(c, 3, 4, stride=2, padding=1))  # last up-conv: linear output
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        # A 3-channel map in channels_last makes every later elementwise op (resize, masked loss, D's view)
        # stride across pixels; back in NCHW it matches the target's layout.
        y = self.body(z).contiguous()  # (B, 3, 32*h, 32*w)
        if tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=out_size, mode="bilinear", align_corners=False)  # (B, 3, H, W)
        return y


class ContextEncoder(nn.Module):
    """Encoder -> channel-wise FC bottleneck -> decoder; predicts the whole image, the loss picks the hole."""

    def __init__(self, encoder: nn.Module, input_size: int = 227, dropout: float = 0.5) -> None:
        super().__init__()
        self.encoder = encoder
        with torch.no_grad():  # infer the trunk's output grid once, so any trunk (timm too) fits
            c, h, w = encoder(torch.zeros(1, 3, input_size, input_size)).shape[1:]
        self.bottleneck = ContextEncoderBottleneck(c, h, w, dropout)
        self.decoder = UpConvDecoder(c)

    def forward(self, x_masked: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x_masked)  # (B, 256, 6, 6)
        z = self.bottleneck(z)  # (B, 256, 6, 6)
        return self.decoder(z, x_masked.shape[-2:])  # (B, 3, H, W)

    @staticmethod
    def discriminator_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only the hole's content, context zeroed, at 64x64 (the paper's discriminator input size): the
        discriminator judges the fill, not the scene. At 64 px its three passes per step cost a quarter of
        what they did at 128 px (they were a fifth of the whole bf16 step), for a loss weighted 0.001."""
        region = image * mask.unsqueeze(1)  # (B, 3, H, W)
        return F.interpolate(region, size=(64, 64), mode="bilinear", align_corners=False)  # (B, 3, 64, 64)


class Discriminator(nn.Module):
    """DCGAN discriminator: four 4x4 stride-2 convs, then a dense layer to one logit.

    It is shown only the predicted (or real) hole content, with the context zeroed, so it judges the
    fill and cannot shortcut by comparing the fill to its surroundings. For a 64x64 input the last
    layer is exactly the paper's 4x4 conv to one output; larger inputs are average-pooled to 4x4 first.
    """

    def __init__(self, widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for i, w in enumerate(widths):
            layers.append(nn.Conv2d(c, w, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c * 16, 1)

    def forward(self, region: torch.Tensor) -> torch.Tensor:
        h = self.body(region)  # (B, 512, H/16, W/16)
        if h.shape[-1] != 4 or h.shape[-2] != 4:
            h = F.adaptive_avg_pool2d(h, 4)  # (B, 512, 4, 4)
        return self.head(h.flatten(1)).squeeze(1)  # (B,) logits


def build_encoder(name: str) -> nn.Module:
    """`alexnet`, `alexnet-poolfree`, `alexnet-torchvision`, or `timm:<model>`."""
    if name == "alexnet":
        return AlexNetEncoder("caffe")
    if name == "alexnet-poolfree":
        return AlexNetEncoder("caffe", pool_free=True)
    if name == "alexnet-torchvision":
        return AlexNetEncoder("torchvision")
    if name.startswith("timm:"):
        return TimmEncoder(name.split(":", 1)[1])
    raise ValueError(f"unknown encoder {name!r}: use alexnet, alexnet-poolfree, alexnet-torchvision or timm:<name>")
