"""--torch_compile: the student and the teacher run compiled in both stages, the run's
numbers equal the eager run's (under aot_eager, which draws eager's dropout masks; inductor
draws its own, which a resume must keep: tests/test_integrity.py), checkpoints and the
export keep plain keys; bad options are refused before any work."""

from __future__ import annotations

import pytest
import torch
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
    # Semi-hard mining is a discrete choice: the traced graphs' other rounding flips a mined
    # tuple now and then (distances of an untrained model are nearly tied), after which the
    # runs part by chance (seen: weights 0.7 % apart after 2 + 2 steps, 3 % after 2 x 2
    # epochs). So stage 1 learns at a negligible rate here and stage 2 (no discrete choice)
    # starts from the same weights in both runs; two steps per stage.
    base = tiny_recipe(data_dir, tmp_path / "eager", method="refilled", teacher=f"local-dir:{teacher_dir}",
                       max_steps=2, stage1_learning_rate=1e-7)  # fmt: skip
    eager = run_distillation(RefilledConfig(**base))
    assert seen == {"stage1": (False, False), "stage2": (False, False)}
    torch._dynamo.reset()
    counters.clear()
    # aot_eager traces forward and backward as inductor does, without a C++ compile (seconds on a CPU), and
    # draws the student's dropout masks with eager's kernels (inductor draws its own: another run)
    compiled = run_distillation(RefilledConfig(**{**base, "output_dir": str(tmp_path / "compiled"),
                                                 "torch_compile_backend": "aot_eager"}))  # fmt: skip
    assert seen == {"stage1": (True, True), "stage2": (True, True)}
    assert counters["frames"]["ok"] >= 4  # teacher and student graphs (training and evaluation)
    assert not counters["graph_break"], dict(counters["graph_break"])  # mining stays outside the graphs
    for stage in ("stage1", "stage2"):  # the same numbers up to rounding
        expected = logged_losses(tmp_path / "eager", stage)
        assert len(expected) == 2 and logged_losses(tmp_path / "compiled", stage) == pytest.approx(expected, rel=1e-4)
    # rounding may still move one borderline image of these few across a decision boundary
    one_image = 100 / eager["final"]["test_samples"] + 1e-6
    assert compiled["stage1"]["test_ncm_top1"] == pytest.approx(eager["stage1"]["test_ncm_top1"], abs=one_image)
    for split in ("test", "validation"):
        one_image = 100 / eager["final"][f"{split}_samples"] + 1e-6
        assert compiled["final"][f"{split}_top1"] == pytest.approx(eager["final"][f"{split}_top1"], abs=one_image)
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
        assert difference <= 1e-4 * torch.linalg.vector_norm(b.float()) + 1e-7, name


def test_a_machine_that_cannot_build_kernels_is_refused_before_any_image_is_decoded(data_dir, tmp_path, monkeypatch):
    """A missing compiler (inductor's C++ on a CPU, Triton's C compiler on a GPU) used to
    surface at the first training step, after the data was decoded, as an internal error."""
    import torch._dynamo

    from refilled_hf import pipeline

    name = "refilled_test_without_compiler"
    if name not in torch._dynamo.list_backends(exclude_tags=()):

        @torch._dynamo.register_backend(name=name)
        def without_compiler(graph, example_inputs):
            raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    decoded = []
    prepare = pipeline.prepare_data
    monkeypatch.setattr(pipeline, "prepare_data", lambda *a, **k: decoded.append(1) or prepare(*a, **k))
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", torch_compile_backend=name)
    refused = rf"torch.compile \({name}\) cannot build kernels on this machine \(RuntimeError: Failed to find C comp"
    with pytest.raises(ConfigError, match=refused + ".*or run without --torch_compile"):
        run_distillation(RefilledConfig(**recipe))
    assert not decoded and not (tmp_path / "run" / "run.json").exists()
    # a backend that builds: the run goes on
    run_distillation(RefilledConfig(**{**recipe, "torch_compile_backend": "aot_eager", "max_steps": 1}))
    assert decoded


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


def test_cuda_graph_modes_mark_each_step_and_copy_the_teacher_outputs(data_dir, teacher_dir, tmp_path, monkeypatch):
    """reduce-overhead replays CUDA graphs into static buffers (a GPU-only failure: 'accessing
    tensor output of CUDAGraphs that has been overwritten'). Checked here without compiling:
    every training step is marked, and the losses never see the teacher's own output
    tensors, which the student's graph may overwrite."""
    import torch

    from refilled_hf.backbone import FrozenTeacher

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)  # no compile on a CPU
    monkeypatch.setattr(torch, "compile", lambda function, **kwargs: function)  # (nor preflight's toolchain check)
    marks, teacher_outputs, loss_inputs = [], [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    forward = FrozenTeacher.forward

    def teacher_spy(self, images):
        out = forward(self, images)
        teacher_outputs.extend(out)  # held, so that no later tensor can reuse their memory
        return out

    monkeypatch.setattr(FrozenTeacher, "forward", teacher_spy)
    for name in ("relationship_loss_with_stats", "local_classifier_loss"):
        original = getattr(trainer_module, name)

        def loss_spy(*args, _original=original, **kwargs):
            loss_inputs.extend(a for a in args if isinstance(a, torch.Tensor))
            return _original(*args, **kwargs)

        monkeypatch.setattr(trainer_module, name, loss_spy)
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="refilled", teacher=f"local-dir:{teacher_dir}",
                         max_steps=2, torch_compile_mode="reduce-overhead")  # fmt: skip
    run_distillation(RefilledConfig(**recipe))
    assert len(marks) >= 4  # two training steps in each stage (evaluation losses may add more)
    assert loss_inputs and teacher_outputs
    assert not {t.data_ptr() for t in loss_inputs} & {t.data_ptr() for t in teacher_outputs}


@pytest.mark.slow
def test_a_launchers_dynamo_backend_compiles_in_place_once_and_is_recorded(data_dir, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend X` reaches Accelerate through the environment: the
    run compiles the student in place with X (--torch_compile), and Accelerate wraps nothing
    on top (it compiled the whole student again, and the run recorded no compile)."""
    seen = []
    compute_loss = trainer_module.RefilledTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append(
            (
                self.accelerator.unwrap_model(model)._compiled_call_impl is not None,
                isinstance(model, torch._dynamo.eval_frame.OptimizedModule),
            )
        )
        return compute_loss(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.RefilledTrainer, "compute_loss", spy)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "AOT_EAGER")
    recipe = tiny_recipe(data_dir, tmp_path / "run", method="ce", max_steps=1)
    config = RefilledConfig(**recipe)
    assert config.torch_compile and config.torch_compile_backend == "aot_eager" and config.torch_compile_mode is None
    run_distillation(config)
    assert seen and all(seen_ == (True, False) for seen_ in seen)  # in place, and not wrapped again
    card = (tmp_path / "run" / "model" / "README.md").read_text()
    assert "torch_compile: true" in card and "torch_compile_backend: aot_eager" in card  # its recipe reruns it so
