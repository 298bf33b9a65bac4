"""pretrain.engine.train_step: one shared discriminator pass gives the textbook GAN updates."""
import copy

import torch
from torch import nn

from pretrain.engine import train_step
from pretrain.losses import discriminator_loss, generator_adversarial_loss, masked_l2_loss, reconstruction_weights
from pretrain.masks import central_square_mask
from pretrain.models import ContextEncoder, Discriminator


class TinyGenerator(nn.Module):
    """Two convs: enough to have parameters that the adversarial loss moves."""

    discriminator_input = staticmethod(ContextEncoder.discriminator_input)

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def reference_step(g, d, batch, opt_g, opt_d, lambda_rec, lambda_adv):
    """The two updates written the textbook way: D's parameters frozen for G's loss, then a fresh, detached
    pass of the fill for D's loss."""
    x, mask, target = batch["input"], batch["mask"], batch["target"]
    pred = g(x)
    fake = g.discriminator_input(pred, mask)
    for p in d.parameters():
        p.requires_grad_(False)
    loss = lambda_rec * masked_l2_loss(pred, target, reconstruction_weights(mask, 7, 10.0)) \
        + lambda_adv * generator_adversarial_loss(d(fake))
    for p in d.parameters():
        p.requires_grad_(True)
    opt_g.zero_grad()
    loss.backward()
    opt_g.step()
    loss_d = discriminator_loss(d(g.discriminator_input(target, mask)), d(fake.detach()))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()
    return loss.item(), loss_d.item()


def test_shared_discriminator_pass_matches_separate_passes():
    torch.manual_seed(0)
    g, d = TinyGenerator(), Discriminator((8, 16, 32, 64))
    g_ref, d_ref = copy.deepcopy(g), copy.deepcopy(d)
    d_start = copy.deepcopy(d)
    target = torch.randn(4, 3, 64, 64)
    mask = central_square_mask(64).expand(4, 64, 64)
    batch = {"input": target.masked_fill(mask.unsqueeze(1), 0.0), "mask": mask, "target": target}
    # A large adversarial weight, so that a gradient going to the wrong network would show.
    lam_rec, lam_adv = 0.5, 0.5

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.1)

    opts = sgd(g), sgd(d)
    opts_ref = sgd(g_ref), sgd(d_ref)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(3):
        out = train_step(g, d, batch, *opts, scaler, lam_rec, lam_adv, 7, 10.0, "none", torch.device("cpu"))
        loss, loss_d = reference_step(g_ref, d_ref, batch, *opts_ref, lam_rec, lam_adv)
        assert abs(out["loss"] - loss) < 1e-5 and abs(out["loss_d"] - loss_d) < 1e-5
    for mine, ref in ((g, g_ref), (d, d_ref)):
        for (name, p), p_ref in zip(mine.named_parameters(), ref.parameters()):
            assert torch.allclose(p, p_ref, atol=1e-5), name
    moved = max((p - q).abs().max().item() for p, q in zip(d.parameters(), d_start.parameters()))
    assert moved > 1e-3  # D really trained, so the comparison above compared something

