import pytest
import torch

from transferkit.model import build_model
from transferkit.training.optim import EMA, backbone_blocks, block_key, param_groups, set_backbone_frozen, warmup_cosine


def test_block_key():
    assert block_key("features.3.conv.0.0.weight") == "features.3"
    assert block_key("layer2.1.bn1.bias") == "layer2.1"
    assert block_key("conv1.weight") == "conv1"


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "resnet18", "efficientnet_b0"])
def test_layer_decay_lr_grows_from_stem_to_head(backbone):
    model = build_model(backbone, "none", {"a": ["x", "y"]}, image_size=32)
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layer_decay=0.8)
    scales = []
    for g in groups:
        if not scales or scales[-1] != g["lr_scale"]:
            scales.append(g["lr_scale"])
    assert scales == sorted(scales) and scales[-1] == 1.0 and len(scales) >= 5
    assert groups[-1]["name"] == "heads"
    # every trainable parameter is in exactly one group; 1-D tensors get no weight decay
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(g["weight_decay"] == 0.0 for g in groups if g["params"][0].ndim == 1)
    assert len(backbone_blocks(model.backbone)) + 1 == len(scales)


def test_freeze_stops_backbone_gradients_and_batchnorm_statistics():
    model = build_model("mobilenet_v2", "none", {"a": ["x", "y"]}, image_size=32)
    model.train()
    set_backbone_frozen(model, True)
    bn = next(m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    out = model(torch.randn(4, 3, 32, 32))["a"].sum()
    out.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.heads["a"].weight.grad is not None
    assert torch.equal(bn.running_mean, before) and not bn.training
    model.train()
    set_backbone_frozen(model, False)
    assert all(p.requires_grad for p in model.backbone.parameters()) and bn.training


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5, abs=1e-6) and f(100) == pytest.approx(0.0, abs=1e-9)


def test_ema_tracks_weights():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.5)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(2.0)
    ema.update(lin)
    torch.testing.assert_close(ema.state_dict()["weight"], start + 1.0)
