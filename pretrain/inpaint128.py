"""The semantic-inpainting family: 128x128 input, the centre 64x64 predicted (paper Sec. 4, official Lua code).

Encoder: five 4x4 stride-2 convs (64, 64, 128, 256, 512) to 512x4x4, then a 4x4 "conv" to a 4000-d
bottleneck. Decoder: five 4x4 up-convs (512, 256, 128, 64, 3) to a 64x64 patch, tanh.
The 4x4-kernel conv on a 4x4 map, and the up-conv from 1x1 back to 4x4, are dense layers; written as
`nn.Linear` they run as one GEMM instead of a convolution with a degenerate output (several times
faster on CPU, same function and parameter count).
"""
from __future__ import annotations

import torch
from torch import nn

from pretrain.models import Discriminator

PATCH = 64


def _down(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.LeakyReLU(0.2, inplace=True)]


def _up(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class Inpaint128Generator(nn.Module):
    """Predicts the centre 64x64 of a 128x128 image from its context.

    `forward` returns the full-size image with the patch pasted in the centre, so the training loop
    and the masked loss treat both model families alike; `predict_patch` returns the patch alone.
    """

    def __init__(self, bottleneck: int = 4000, input_size: int = 128) -> None:
        super().__init__()
        if input_size != 128:
            raise ValueError(f"the inpainting family is built for 128x128 input, got {input_size}")
        self.encoder = nn.Sequential(*_down(3, 64, False), *_down(64, 64, True), *_down(64, 128, True),
                                     *_down(128, 256, True), *_down(256, 512, True))
        self.to_code = nn.Linear(512 * 4 * 4, bottleneck, bias=False)  # == Conv2d(512, 4000, 4) on 4x4
        self.code_act = nn.Sequential(nn.BatchNorm1d(bottleneck), nn.LeakyReLU(0.2, inplace=True))
        self.from_code = nn.Linear(bottleneck, 512 * 4 * 4, bias=False)  # == ConvTranspose2d(4000, 512, 4)
        self.from_code_act = nn.Sequential(nn.BatchNorm2d(512), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(*_up(512, 256), *_up(256, 128), *_up(128, 64),
                                     nn.ConvTranspose2d(64, 3, 4, stride=2, padding=1, bias=False), nn.Tanh())
        # tanh gives [-1, 1]; the suite's images are ImageNet-normalised (about [-2.1, 2.6]), so scale.
        self.output_scale = 2.7

    def predict_patch(self, x_masked: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x_masked)  # (B, 512, 4, 4)
        code = self.code_act(self.to_code(h.flatten(1)))  # (B, 4000)
        h = self.from_code_act(self.from_code(code).view(-1, 512, 4, 4))  # (B, 512, 4, 4)
        return self.output_scale * self.decoder(h)  # (B, 3, 64, 64)

    def forward(self, x_masked: torch.Tensor) -> torch.Tensor:
        patch = self.predict_patch(x_masked)  # (B, 3, 64, 64)
        out = x_masked.clone()  # (B, 3, 128, 128)
        out[..., 32:96, 32:96] = patch
        return out

    @staticmethod
    def discriminator_input(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The discriminator sees the 64x64 centre patch only, never the context."""
        return image[..., 32:96, 32:96]  # (B, 3, 64, 64)


def build_inpaint128() -> tuple[Inpaint128Generator, Discriminator]:
    """The generator and its 64x64 patch discriminator (four 4x4/2 convs, then the 4x4 conv to one logit)."""
    return Inpaint128Generator(), Discriminator()
