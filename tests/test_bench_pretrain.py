"""The benchmark's baseline must be the same network as ours, only written the slow way."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_pretrain import StraightforwardPortGenerator  # noqa: E402

from pretrain.inpaint128 import Inpaint128Generator  # noqa: E402


def test_conv_bottleneck_port_equals_the_dense_bottleneck():
    torch.manual_seed(0)
    ours, port = Inpaint128Generator().eval(), StraightforwardPortGenerator().eval()
    state = ours.state_dict()
    # Conv2d(512, 4000, 4) on a 4x4 map is Linear(8192, 4000) over the flattened (c, y, x) map.
    state["to_code.weight"] = state["to_code.weight"].view(4000, 512, 4, 4)
    # ConvTranspose2d(4000, 512, 4) from 1x1 is Linear(4000, 8192) producing (c, y, x).
    state["from_code.weight"] = state["from_code.weight"].t().reshape(4000, 512, 4, 4)
    # BatchNorm1d(4000) and BatchNorm2d(4000) hold the same buffers.
    port.load_state_dict(state)
    x = torch.randn(2, 3, 128, 128)
    torch.testing.assert_close(port(x), ours(x), atol=1e-4, rtol=1e-4)
    assert sum(p.numel() for p in port.parameters()) == sum(p.numel() for p in ours.parameters())
