"""CIFAR wide ResNets through timm, and the embedding helper on any timm model."""

from __future__ import annotations

import pytest
import timm
import torch

import refilled_hf
from refilled_hf import embed, embed_and_logits
from refilled_hf.backbone import StudentModel
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


def test_forward_intermediates_are_the_groups_outputs_as_timms_models_give_them():
    torch.manual_seed(0)
    model = timm.create_model("cifar_wrn_16_1", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    # by hand: the stem, then each group in turn; the final BN-ReLU only after the last
    groups, h = [], model.stem(x)
    for stage in model.stages:
        h = stage(h)
        groups.append(h)
    final = torch.relu(torch.nn.functional.batch_norm(
        groups[-1], model.norm.running_mean, model.norm.running_var, model.norm.weight, model.norm.bias, eps=1e-5
    ))  # fmt: skip

    features, intermediates = model.forward_intermediates(x)
    torch.testing.assert_close(features, final)
    torch.testing.assert_close(features, model.forward_features(x))
    assert len(intermediates) == 3
    for got, want in zip(intermediates, groups):
        torch.testing.assert_close(got, want)
    taken = model.forward_intermediates(x, indices=[0, -1], norm=True, intermediates_only=True)
    torch.testing.assert_close(taken[0], groups[0])
    torch.testing.assert_close(taken[1], final)
    features, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True)
    torch.testing.assert_close(features, groups[0])
    torch.testing.assert_close(first, groups[0])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")

    # timm's getter wrapper prunes the groups after the last one taken
    getter = timm.create_model("cifar_wrn_16_1", features_only=True, feature_cls="getter", out_indices=(0, 1))
    getter.model.load_state_dict(model.state_dict(), strict=False)
    getter.eval()
    assert getter.feature_info.channels() == [16, 32] and len(getter.model.stages) == 2
    for got, want in zip(getter(x), groups[:2]):
        torch.testing.assert_close(got, want)


def test_pruning_keeps_the_groups_asked_for_and_drops_what_no_longer_fits():
    model = timm.create_model("cifar_wrn_16_2", num_classes=5)
    assert model.prune_intermediate_layers([1]) == [1]
    assert len(model.stages) == 2 and isinstance(model.norm, torch.nn.Identity)
    assert model.num_features == 64
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 64, 16, 16)
    whole = timm.create_model("cifar_wrn_16_2", num_classes=5)
    assert whole.prune_intermediate_layers(1, prune_head=False) == [2]
    assert whole(torch.randn(1, 3, 32, 32)).shape == (1, 5) and whole.num_features == 128


def test_the_final_norm_keeps_batchnorms_state_dict_keys():
    """Exports of earlier releases (a plain BatchNorm2d then a ReLU) load unchanged."""
    keys = timm.create_model("cifar_wrn_16_1").state_dict().keys()
    assert [k for k in keys if k.startswith("norm.")] == [
        "norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"
    ]  # fmt: skip


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


def test_a_model_of_fixed_input_size_is_built_for_the_size_it_will_run_at(tmp_path, monkeypatch):
    """timm's ViTs take only the size they were built for (`fixed_input_size`): --image_size 32
    with a ViT student failed with "Input height (32) doesn't match model (224)"."""
    from refilled_hf import backbone
    from refilled_hf.backbone import ModelLoadError, load_timm_model
    from refilled_hf.hub import export_model

    assert timm.models.get_pretrained_cfg("test_vit3").fixed_input_size  # (3, 160, 160), strict
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(AssertionError, match="doesn't match model"):
        load_timm_model("test_vit3", num_classes=3)(x)
    model = load_timm_model("test_vit3", num_classes=3, image_size=32)
    assert model(x).shape == (2, 3) and model.patch_embed.img_size == (32, 32)
    assert load_timm_model("test_vit3", image_size=160).patch_embed.img_size == (160, 160)
    with monkeypatch.context() as patch:  # (as twins' "img_size (30, 30) should be divided by patch_size (4, 4)")
        patch.setattr(timm, "create_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not divided")))
        with pytest.raises(ModelLoadError, match=r"'test_vit3' takes a fixed input size, and timm cannot build it "
                                                 r"for 30 px inputs \(AssertionError: not divided\): choose an "
                                                 r"input size its patches"):  # fmt: skip
            load_timm_model("test_vit3", image_size=30)
    # a model that takes any size is built as it is (resnets have no img_size argument)
    assert load_timm_model("test_resnet", num_classes=3, image_size=32)(x).shape == (2, 3)
    # its weights: a checkpoint trained at 32 px, a folder exported at 32 px and one at 160 px
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    again = load_timm_model("test_vit3", checkpoint=tmp_path / "w.safetensors", image_size=32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))
    # at another size, its position embeddings are resampled, as timm does for a folder's or the Hub's weights
    at64 = load_timm_model("test_vit3", checkpoint=tmp_path / "w.safetensors", image_size=64).eval()
    assert at64.pos_embed.shape[1] == 1 + (64 // 16) ** 2 and "state_dict" not in at64.pretrained_cfg
    torch.testing.assert_close(at64.head.weight, model.head.weight)  # the classifier is the checkpoint's
    grid = model.pos_embed[:, 1:].reshape(1, 2, 2, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True, align_corners=False)
    torch.testing.assert_close(at64.pos_embed[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 16, -1))
    state = {k: v for k, v in model.state_dict().items() if k != "norm.weight"}  # another mismatch stays an error
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelLoadError, match=r"does not match the architecture 'test_vit3': 1 missing keys "
                                             r"\(norm\.weight\)\. Check"):  # fmt: skip
        load_timm_model("test_vit3", checkpoint=tmp_path / "partial.safetensors", image_size=64)
    export_model(model, tmp_path / "at32", label_names=["a", "b", "c"])
    torch.testing.assert_close(load_timm_model(f"local-dir:{tmp_path / 'at32'}", image_size=32).eval()(x), model(x))
    export_model(load_timm_model("test_vit3", num_classes=3), tmp_path / "at160", label_names=["a", "b", "c"])
    resampled = load_timm_model(f"local-dir:{tmp_path / 'at160'}", image_size=32)  # position embeddings resampled
    assert resampled(x).shape == (2, 3) and resampled.pos_embed.shape[1] == 1 + (32 // 16) ** 2
    # an hf-hub: model's config is read once it is fetched: built again, for the size
    calls = []

    def fetched(spec, *, num_classes=None, checkpoint=None, pretrained=False, **kwargs):
        calls.append(kwargs.get("img_size"))
        return timm.create_model(f"local-dir:{tmp_path / 'at160'}", pretrained=True, **kwargs)

    monkeypatch.setattr(backbone, "_load_timm_model", fetched)
    assert load_timm_model("hf-hub:someone/vit", image_size=32)(x).shape == (2, 3) and calls == [None, 32]


def test_checkpoint_of_another_class_count_keeps_the_creation_arguments(tmp_path):
    """A checkpoint whose head predicts another class count than the architecture's default
    rebuilt the model without the arguments given (--student_drop_rate was dropped)."""
    from safetensors.torch import save_file

    from refilled_hf.backbone import load_timm_model

    save_file(timm.create_model("test_resnet", num_classes=7).state_dict(), str(tmp_path / "w.safetensors"))
    model = load_timm_model("test_resnet", checkpoint=tmp_path / "w.safetensors", drop_rate=0.3)
    assert model.num_classes == 7 and model.drop_rate == 0.3


def test_a_backbone_checkpoint_in_a_format_timm_converts_loads_as_an_embedding_model(tmp_path):
    """A self-supervised backbone's weights (DINOv2's original files: no classifier, a
    ``mask_token`` timm drops) load through timm's checkpoint filter, built without a
    classifier; a checkpoint of another architecture is still refused, naming the keys."""
    from safetensors.torch import save_file

    from refilled_hf.backbone import ModelLoadError, load_timm_model

    backbone = timm.create_model("test_vit3", num_classes=0).eval()
    state = {**backbone.state_dict(), "mask_token": torch.zeros(1, backbone.embed_dim)}
    save_file(state, str(tmp_path / "dinov2_format.safetensors"))
    loaded = load_timm_model("test_vit3", checkpoint=tmp_path / "dinov2_format.safetensors").eval()
    x = torch.randn(2, 3, 160, 160)
    assert loaded.num_classes == 0 and "mask_token" not in loaded.state_dict()
    torch.testing.assert_close(loaded(x), backbone(x))
    save_file(timm.create_model("test_resnet").state_dict(), str(tmp_path / "resnet.safetensors"))
    with pytest.raises(ModelLoadError, match=r"does not match the architecture 'test_vit3': \d+ missing keys \("):
        load_timm_model("test_vit3", checkpoint=tmp_path / "resnet.safetensors")


def _without_gradient_by_backward(student: StudentModel) -> list[str]:
    """Reference: a real forward and backward pass, on a copy, listing the trainable
    parameters that got no gradient."""
    import copy

    student = copy.deepcopy(student).train()
    outputs = student(pixel_values=torch.randn(2, *student.input_size))
    sum(o.sum() for o in outputs.values()).backward()
    return sorted(n for n, p in student.named_parameters() if p.requires_grad and p.grad is None)


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("cifar_wrn_16_1", {}, {True: [], False: []}),
        # two classifiers, (head, head_dist): stage 1 freezes both
        ("deit_tiny_distilled_patch16_224", {"img_size": 32}, {True: [], False: []}),
        # a parameter no forward pass uses
        ("cifar_wrn_16_1", {"spare": True}, {True: ["model.spare"], False: ["model.spare"]}),
    ],
)
def test_the_parameters_ddp_would_find_unused_are_the_ones_a_backward_pass_leaves_without_gradient(
    name, kwargs, expected
):
    spare = kwargs.pop("spare", False)
    model = timm.create_model(name, num_classes=5, **kwargs)
    if spare:
        model.spare = torch.nn.Parameter(torch.zeros(3))
    student = StudentModel(model, input_size=(3, 32, 32)).eval()
    some_norm = next(m for m in student.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)))
    some_norm.train()  # a module the user left in another mode than its model: kept so
    modes = [m.training for m in student.modules()]
    state = {k: v.clone() for k, v in student.state_dict().items()}
    for stage1 in (True, False):
        student.set_embeddings_only(stage1)
        heads = model.get_classifier()
        heads = heads if isinstance(heads, tuple) else (heads,)
        assert all(p.requires_grad is not stage1 for head in heads for p in head.parameters())
        rng = torch.get_rng_state()
        found = student.parameters_without_gradient()
        # stand-ins on the meta device: no random state, mode, weight or running statistic changed
        assert torch.equal(rng, torch.get_rng_state()) and [m.training for m in student.modules()] == modes
        assert found == expected[stage1] == _without_gradient_by_backward(student)
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())


def test_parameters_without_gradient_is_unknown_where_the_pass_fails():
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=3)  # built for 224 px only
    assert StudentModel(vit, input_size=(3, 32, 32)).parameters_without_gradient() is None
    assert StudentModel(vit).parameters_without_gradient() == []  # its pretrained_cfg's 224 px


def test_parameters_without_gradient_of_a_compiled_student_are_found_without_compiling():
    """Stage 2 probes a student that stage 1 compiled in place (--torch_compile)."""
    model = timm.create_model("cifar_wrn_16_1", num_classes=5)
    model.spare = torch.nn.Parameter(torch.zeros(3))
    student = StudentModel(model, input_size=(3, 32, 32))
    student.compile()
    assert student.parameters_without_gradient() == ["model.spare"]


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        ("cifar_wrn_16_1", {}, True),  # dropout 0.3 in every block (functional)
        ("cifar_wrn_16_1", {"drop_rate": 0.0}, False),
        ("resnet18", {}, False),
        ("resnet18", {"drop_rate": 0.2}, True),  # before the head only: stage 1 does not use it, stage 2 does
        ("vit_tiny_patch16_224", {"drop_path_rate": 0.1, "img_size": 32}, True),  # drop path (bernoulli)
    ],
)
def test_a_student_says_whether_its_training_pass_draws_random_numbers(name, kwargs, expected):
    student = StudentModel(timm.create_model(name, num_classes=4, **kwargs), input_size=(3, 32, 32)).eval()
    student.set_embeddings_only(True)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    rng = torch.get_rng_state()
    assert student.draws_random_numbers_in_training() is expected
    # on the meta device: no random state, mode, weight or running statistic changed
    assert torch.equal(rng, torch.get_rng_state()) and not student.training and student.embeddings_only
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())
    # the answer is what a real training pass does with torch's generator
    student.set_embeddings_only(False)
    images = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    student.train()(images)
    assert (not torch.equal(rng, torch.get_rng_state())) is expected


def test_a_hub_model_that_cannot_be_fetched_says_how_to_read_the_cache_without_retries(monkeypatch):
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from refilled_hf.backbone import ModelLoadError, load_timm_model

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", offline)
    for offline_mode, hinted in ((False, True), (True, False)):  # (set, it already reads the cache at once)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline_mode)
        with pytest.raises(ModelLoadError, match="Could not load 'hf-hub:timm/resnet18.a1_in1k'") as raised:
            load_timm_model("hf-hub:timm/resnet18.a1_in1k")
        assert ("HF_HUB_OFFLINE=1 reads what the Hub cache holds at once" in str(raised.value)) is hinted
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad config")))
    with pytest.raises(ModelLoadError) as raised:
        load_timm_model("hf-hub:timm/resnet18.a1_in1k")
    assert "HF_HUB_OFFLINE" not in str(raised.value)
