"""--channels_last: the student and the teacher run in channels-last memory format in every
stage, the run's numbers equal the default layout's, and every state dict (checkpoints,
stage hand-off, export) is written in the default layout that safetensors needs."""

from __future__ import annotations

import pytest
import timm
import torch
from helpers import logged_losses, tiny_recipe
from safetensors.torch import load_file, save_file

import refilled_hf  # noqa: F401  (registers the CIFAR wide ResNets)
from refilled_hf import trainer as trainer_module
from refilled_hf.backbone import load_timm_model, use_channels_last
from refilled_hf.config import RefilledConfig
from refilled_hf.pipeline import run_distillation


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def _channels_last(model: torch.nn.Module) -> bool:
    """Every conv weight channels-last, and at least one (3x3) not also in the default layout
    (1x1 kernels are both)."""
    weights = _conv_weights(model)
    return (
        bool(weights)
        and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
        and any(not w.is_contiguous() for w in weights)
    )


def test_channels_last_weights_save_in_the_default_layout_and_compute_the_same(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("cifar_wrn_16_1", num_classes=5).eval()
    images = torch.randn(4, 3, 32, 32)
    expected = model(images)
    assert use_channels_last(use_channels_last(model)) is model  # idempotent
    assert _channels_last(model)
    assert torch.allclose(model(images), expected, rtol=1e-4, atol=1e-5)
    # the whole model's state dict and any submodule's: default layout, accepted by safetensors
    for state in (model.state_dict(), model.stages.state_dict(), model.stem.state_dict()):
        assert state and all(t.is_contiguous() for t in state.values())
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    fresh = timm.create_model("cifar_wrn_16_1", num_classes=5).eval()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert torch.allclose(fresh(images), expected, rtol=1e-4, atol=1e-5)
    # loading into a channels-last model keeps its layout (resume)
    use_channels_last(fresh)
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    assert _channels_last(fresh)
    # one training step's gradients agree between the layouts. In float64: in float32, single-threaded
    # CPU kernels for channels-last batch norm sum a channel's gradient in another order, and where
    # its terms nearly cancel the two layouts' gradients differ by percents of their size (seen at
    # one thread, for some initial weights); a layout error would differ at any precision.
    plain = timm.create_model("cifar_wrn_16_1", num_classes=5, drop_rate=0.0).double()
    nhwc = timm.create_model("cifar_wrn_16_1", num_classes=5, drop_rate=0.0).double()
    nhwc.load_state_dict(plain.state_dict())
    use_channels_last(nhwc)
    assert _channels_last(nhwc)
    labels = torch.tensor([0, 1, 2, 3])
    for net in (plain, nhwc):
        torch.nn.functional.cross_entropy(net(images.double()), labels).backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), nhwc.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=name)
    # the parameters themselves were not copied out of the model by the hook
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in _conv_weights(model))


@pytest.mark.slow
def test_a_channels_last_run_uses_it_in_both_stages_and_equals_the_default_run(
    data_dir, teacher_dir, tmp_path, monkeypatch
):
    seen: dict[str, tuple[bool, bool]] = {}
    compute_loss = trainer_module.RefilledTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        inner = self.accelerator.unwrap_model(model)
        seen[self.stage] = (_channels_last(inner), _channels_last(self.teacher))
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RefilledTrainer, "compute_loss", spy)
    # dropout draws its mask in memory order, so the two layouts draw different masks from one
    # seed: without dropout the two runs must compute the same numbers
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda x, p=0.5, training=True, inplace=False: x)
    base = tiny_recipe(data_dir, tmp_path / "default", method="refilled", teacher=f"local-dir:{teacher_dir}")
    default = run_distillation(RefilledConfig(**base))
    assert seen == {"stage1": (False, False), "stage2": (False, False)}
    nhwc = run_distillation(RefilledConfig(**{**base, "output_dir": str(tmp_path / "nhwc"), "channels_last": True}))
    assert seen == {"stage1": (True, True), "stage2": (True, True)}
    # the first step, from the same initial weights: the same numbers up to rounding; later
    # steps drift by rounding (other conv kernels), which training amplifies (semi-hard mining
    # on near-tied distances flips tuples): up to 2.2 % by the last of 12 logged losses
    first = logged_losses(tmp_path / "nhwc", "stage1")[0]
    assert first == pytest.approx(logged_losses(tmp_path / "default", "stage1")[0], rel=1e-5)
    for stage in ("stage1", "stage2"):
        losses, expected = logged_losses(tmp_path / "nhwc", stage), logged_losses(tmp_path / "default", stage)
        assert losses == pytest.approx(expected, rel=5e-2, abs=1e-4)

    def one_image(split: str) -> float:  # the accuracy one image of the split is worth
        return 100 / default["final"][f"{split}_samples"] + 1e-6

    assert nhwc["stage1"]["test_ncm_top1"] == pytest.approx(default["stage1"]["test_ncm_top1"], abs=one_image("test"))
    for split in ("test", "validation"):
        assert nhwc["final"][f"{split}_top1"] == pytest.approx(default["final"][f"{split}_top1"], abs=one_image(split))
    # checkpoints and the export: the same keys and shapes as the default run's, default layout
    checkpoint = max((tmp_path / "nhwc" / "stage2").glob("checkpoint-*"))
    reference = max((tmp_path / "default" / "stage2").glob("checkpoint-*"))
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {
        k: v.shape for k, v in load_file(str(reference / "model.safetensors")).items()
    }
    exported = load_timm_model(f"local-dir:{tmp_path / 'nhwc' / 'model'}")
    expected = load_timm_model(f"local-dir:{tmp_path / 'default' / 'model'}")
    assert not _channels_last(exported)  # a plain model for whoever loads it
    assert {k: v.shape for k, v in exported.state_dict().items()} == {
        k: v.shape for k, v in expected.state_dict().items()
    }
    # (the weights themselves drift apart by rounding over the run, as the losses above do:
    # one step's gradients in the two layouts agree, see the test above)
