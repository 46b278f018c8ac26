"""--torch_compile: the student and the teacher run compiled in both stages, the run's
numbers equal the eager run's, checkpoints and the export keep plain keys; bad options
are refused before any work."""

from __future__ import annotations

import pytest
from helpers import logged_losses, tiny_recipe
from safetensors.torch import load_file

from refilled_hf import trainer as trainer_module
from refilled_hf.backbone import load_timm_model
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.pipeline import run_distillation


@pytest.mark.slow
def test_a_compiled_run_compiles_both_models_in_both_stages_and_equals_the_eager_run(
    data_dir, teacher_dir, tmp_path, monkeypatch
):
    import torch._dynamo
    from torch._dynamo.utils import counters

    seen: dict[str, tuple[bool, bool]] = {}
    compute_loss = trainer_module.RefilledTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        # the module each call goes through, after DDP/accelerate wrapping: compiled in place?
        inner = self.accelerator.unwrap_model(model)
        seen[self.stage] = (inner._compiled_call_impl is not None, self.teacher._compiled_call_impl is not None)
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RefilledTrainer, "compute_loss", spy)
    base = tiny_recipe(data_dir, tmp_path / "eager", method="refilled", teacher=f"local-dir:{teacher_dir}")
    eager = run_distillation(RefilledConfig(**base))
    assert seen == {"stage1": (False, False), "stage2": (False, False)}
    torch._dynamo.reset()
    counters.clear()
    # aot_eager traces forward and backward as inductor does, without a C++ compile (seconds on a CPU)
    compiled = run_distillation(RefilledConfig(**{**base, "output_dir": str(tmp_path / "compiled"),
                                                 "torch_compile_backend": "aot_eager"}))  # fmt: skip
    assert seen == {"stage1": (True, True), "stage2": (True, True)}
    assert counters["frames"]["ok"] >= 4  # teacher and student graphs (training and evaluation)
    assert not counters["graph_break"], dict(counters["graph_break"])  # mining stays outside the graphs
    for stage in ("stage1", "stage2"):
        expected = logged_losses(tmp_path / "eager", stage)
        assert logged_losses(tmp_path / "compiled", stage) == pytest.approx(expected, rel=1e-4)
    assert compiled["stage1"]["test_ncm_top1"] == eager["stage1"]["test_ncm_top1"]
    for key in ("test_top1", "validation_top1"):
        assert compiled["final"][key] == eager["final"][key]
    assert compiled["final"]["test_loss"] == pytest.approx(eager["final"]["test_loss"], rel=1e-4)
    # compiled in place: checkpoints and the export hold the model's own keys
    checkpoint = max((tmp_path / "compiled" / "stage2").glob("checkpoint-*"))
    keys = load_file(str(checkpoint / "model.safetensors")).keys()
    assert keys and not any("_orig_mod" in k for k in keys)
    exported = load_timm_model(f"local-dir:{tmp_path / 'compiled' / 'model'}")
    reference = load_timm_model(f"local-dir:{tmp_path / 'eager' / 'model'}")
    # the same training up to floating-point rounding (which the traced graphs order differently)
    for (name, a), (_, b) in zip(exported.state_dict().items(), reference.state_dict().items()):
        difference = torch.linalg.vector_norm((a - b).float())
        assert difference <= 1e-2 * torch.linalg.vector_norm(b.float()) + 1e-6, name


def test_compile_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="Unknown --torch_compile_backend 'inductr'.*inductor"):
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True, torch_compile_backend="inductr")
    with pytest.raises(ConfigError, match="Unknown --torch_compile_mode 'fast'.*reduce-overhead"):
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True, torch_compile_mode="fast")
    with pytest.raises(ConfigError, match="only applies to the inductor backend.*aot_eager"):
        RefilledConfig(output_dir=str(tmp_path), use_cpu=True, torch_compile_backend="aot_eager",
                       torch_compile_mode="max-autotune")  # fmt: skip
    config = RefilledConfig(output_dir=str(tmp_path), use_cpu=True, torch_compile_mode="reduce-overhead")
    assert config.torch_compile and config.torch_compile_backend == "inductor"  # the mode turns compile on
