"""CIFAR wide ResNets through timm, and the embedding helper on any timm model."""

from __future__ import annotations

import pytest
import timm
import torch

import refilled_hf
from refilled_hf import embed, embed_and_logits
from refilled_hf.models import CIFAR100_MEAN, CIFAR100_STD, CifarWideResNet

# name: (parameters with 100 classes, embedding width); the paper's counts are
# 2.2M / 0.70M / 0.57M / 0.18M.
EXPECTED = {
    "cifar_wrn_40_2": (2_255_156, 128),
    "cifar_wrn_16_2": (703_284, 128),
    "cifar_wrn_40_1": (569_780, 64),
    "cifar_wrn_16_1": (180_916, 64),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_wrn_builds_through_timm(name):
    params, width = EXPECTED[name]
    model = timm.create_model(name, num_classes=100).eval()
    assert isinstance(model, CifarWideResNet)
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.num_features == width
    x = torch.randn(2, 3, 32, 32)
    features = model.forward_features(x)
    assert features.shape == (2, width, 8, 8)
    assert torch.all(features >= 0), "forward_features ends with BN-ReLU"
    pre = model.forward_head(features, pre_logits=True)
    assert pre.shape == (2, width)
    torch.testing.assert_close(pre, features.mean((2, 3)))
    torch.testing.assert_close(model(x), model.get_classifier()(pre))
    torch.testing.assert_close(embed(model, x), pre)


def test_wrn_pretrained_cfg_and_dropout():
    model = timm.create_model("cifar_wrn_16_2", num_classes=10)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32)
    assert tuple(cfg["mean"]) == CIFAR100_MEAN and tuple(cfg["std"]) == CIFAR100_STD
    assert cfg["architecture"] == "cifar_wrn_16_2"
    data_cfg = timm.data.resolve_data_config({}, model=model)
    assert data_cfg["input_size"] == (3, 32, 32)
    blocks = [m for m in model.modules() if hasattr(m, "drop_rate") and not isinstance(m, CifarWideResNet)]
    assert blocks and all(b.drop_rate == 0.3 for b in blocks)
    assert all(b.drop_rate == 0.0 for b in timm.create_model("cifar_wrn_16_1", drop_rate=0.0).stages[0])
    assert "cifar_wrn_16_2" in timm.list_models("cifar_wrn*")


def test_wrn_dropout_is_active_only_in_training():
    model = timm.create_model("cifar_wrn_16_1", num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    a = model(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x))


def test_general_builder_and_head_reset():
    model = timm.create_model("cifar_wrn", depth=22, widen_factor=3, num_classes=7)
    assert model.num_features == 192 and len(model.stages[0]) == 3
    model.reset_classifier(4)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 192)
    with pytest.raises(ValueError, match="depth"):
        timm.create_model("cifar_wrn", depth=15)


def test_features_only():
    model = timm.create_model("cifar_wrn_16_1", features_only=True)
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [16, 32, 64]
    assert [o.shape[-1] for o in outs] == [32, 16, 8]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto"])
def test_embed_works_on_stock_timm_models(name):
    model = timm.create_model(name, pretrained=False, num_classes=3).eval()
    size = model.pretrained_cfg["input_size"][-1]
    x = torch.randn(2, 3, size, size)
    emb, logits = embed_and_logits(model, x)
    assert emb.shape == (2, model.num_features)
    torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(embed(model, x), emb)


def test_embed_rejects_non_timm_modules():
    with pytest.raises(TypeError, match="timm model"):
        embed(torch.nn.Linear(3, 3), torch.randn(1, 3))


def test_public_api():
    for name in ("relationship_loss", "local_classifier_loss", "class_centers", "semi_hard_triplets", "kd_loss"):
        assert callable(getattr(refilled_hf, name))
