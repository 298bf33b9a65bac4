import pytest
import torch
from torch import nn

from pretrain.inpaint128 import Inpaint128Generator, build_inpaint128
from pretrain.models import (
    FEATURE_KEYS,
    AlexNetEncoder,
    ChannelsFirstGroupNorm,
    ChannelWiseFC,
    ContextEncoder,
    Discriminator,
    build_encoder,
)


@pytest.mark.parametrize("arch", ["caffe", "torchvision"])
@pytest.mark.parametrize("pool_free", [False, True])
def test_alexnet_encoder_maps_227_to_pool5(arch, pool_free):
    enc = AlexNetEncoder(arch, pool_free=pool_free)
    assert enc(torch.randn(2, 3, 227, 227)).shape == (2, 256, 6, 6)


def test_alexnet_features_by_key_have_the_documented_shapes():
    feats = AlexNetEncoder()(torch.randn(1, 3, 227, 227), FEATURE_KEYS)
    shapes = [tuple(f.shape[1:]) for f in feats]
    assert shapes == [(96, 55, 55), (96, 27, 27), (256, 27, 27), (256, 13, 13), (384, 13, 13), (384, 13, 13),
                      (256, 13, 13), (256, 6, 6)]
    with pytest.raises(KeyError, match="fc6"):
        AlexNetEncoder()(torch.randn(1, 3, 227, 227), ["fc6"])


def test_pool_free_replaces_every_pool_by_a_strided_conv():
    enc = AlexNetEncoder(pool_free=True)
    for name in ("pool1", "pool2", "pool5"):
        conv = getattr(enc, name)[0]
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (2, 2)
    assert not any(isinstance(m, nn.MaxPool2d) for m in enc.modules())


def test_channelwise_fc_equals_a_linear_per_channel():
    torch.manual_seed(0)
    layer = ChannelWiseFC(256, 6, 6)
    assert sum(p.numel() for p in layer.parameters()) == 256 * (36 * 36 + 36)
    x = torch.randn(4, 256, 6, 6)
    expected = torch.empty_like(x)
    for c in range(256):  # the slow definition: an independent nn.Linear(36, 36) per channel
        lin = nn.Linear(36, 36)
        with torch.no_grad():
            lin.weight.copy_(layer.weight[c].T)
            lin.bias.copy_(layer.bias[c])
        expected[:, c] = lin(x[:, c].reshape(4, 36)).reshape(4, 6, 6)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_channelwise_fc_has_no_cross_channel_weights():
    layer = ChannelWiseFC(8, 3, 3)
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    layer(x)[0, 2].sum().backward()
    grad_per_channel = x.grad.abs().sum((0, 2, 3))
    assert grad_per_channel[2] > 0 and grad_per_channel[[0, 1, 3, 4, 5, 6, 7]].sum() == 0


@pytest.mark.parametrize("encoder", ["alexnet", "alexnet-poolfree"])
def test_context_encoder_outputs_full_image(encoder):
    model = ContextEncoder(build_encoder(encoder), 227)
    assert model(torch.randn(2, 3, 227, 227)).shape == (2, 3, 227, 227)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_first_group_norm_is_group_norm_and_keeps_the_layout(dtype):
    torch.manual_seed(0)
    ours, ref = ChannelsFirstGroupNorm(4, 16).to(dtype), nn.GroupNorm(4, 16).to(dtype)
    with torch.no_grad():
        for p in (*ours.parameters(), *ref.parameters()):
            p.uniform_(0.5, 1.5)  # not the identity init, so the affine part is checked too
        ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = ours(x), ref(x_ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(y.float(), y_ref.float(), atol=tol)
    assert torch.allclose(x.grad.float(), x_ref.grad.float(), atol=tol)
    assert torch.allclose(ours.weight.grad.float(), ref.weight.grad.float(), atol=tol * 10)


def test_timm_encoder_plugs_in():
    model = ContextEncoder(build_encoder("timm:resnet18"), 128)
    assert model(torch.randn(2, 3, 128, 128)).shape == (2, 3, 128, 128)


def test_discriminators_give_one_logit_per_image():
    assert Discriminator()(torch.randn(3, 3, 227, 227)).shape == (3,)
    assert Discriminator()(torch.randn(3, 3, 64, 64)).shape == (3,)


def test_inpaint128_shapes_and_paste():
    gen, disc = build_inpaint128()
    x = torch.randn(2, 3, 128, 128)
    gen.eval()
    patch = gen.predict_patch(x)
    assert patch.shape == (2, 3, 64, 64)
    full = gen(x)
    assert full.shape == (2, 3, 128, 128)
    torch.testing.assert_close(full[..., 32:96, 32:96], patch)
    outside = torch.ones(128, 128, dtype=torch.bool)
    outside[32:96, 32:96] = False
    torch.testing.assert_close(full[..., outside], x[..., outside])  # the context passes through untouched
    assert disc(Inpaint128Generator.discriminator_input(full, None)).shape == (2,)
    # the 4x4 bottleneck convs as dense layers: 512*4*4 -> 4000 -> 512*4*4
    assert gen.to_code.weight.shape == (4000, 8192) and gen.from_code.weight.shape == (8192, 4000)
