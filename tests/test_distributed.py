"""Two CPU processes (gloo) against one: same teacher centres, every test image counted
once, a single writer of the export."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_recipe, write_image_dataset, write_random_teacher
from safetensors.torch import load_file

from refilled_hf.config import RefilledConfig
from refilled_hf.evaluation import evaluate_model

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distill(recipe: Path, out: Path, processes: int, say_cpu: bool = True, *extra: str,
            ok: bool = True) -> subprocess.CompletedProcess:  # fmt: skip
    # These runs mean the CPU: hide any GPU, or a second rank asks for a device ordinal that is not there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)
    if say_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    cli = ["-m", "refilled_hf.cli", "distill", "--config", str(recipe), "--output_dir", str(out), *extra]
    if processes == 1:
        cmd = [sys.executable, *cli]
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
        cmd = [sys.executable, *launcher, *cli]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_processes_match_one(tmp_path):
    """A REFILLED run (lambda searched) over 2 processes measures and selects as over one; a
    SIGTERM to one of its processes stops both at the same checkpointed step and the resumed
    run ends as the uninterrupted one; a finished run is not trained again, and a resume with
    other settings is refused by every process. (One test: each 2-process launch costs half a
    minute of imports on 2 CPU cores, and the uninterrupted run is the resume's reference.)"""
    data = write_image_dataset(tmp_path / "data")
    teacher = write_random_teacher(tmp_path / "teacher", name="cifar_wrn_16_2")
    recipe = tiny_recipe(
        data,
        tmp_path / "unused",
        method="refilled",
        teacher=f"local-dir:{teacher}",
        per_device_train_batch_size=6,
        per_device_eval_batch_size=4,
        distill_weight=None,
        logging_steps=2,
        save_total_limit=5,
    )  # fmt: skip  (distill_weight: the default, lambda chosen on validation, 1 or 10)
    recipe.pop("output_dir")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    distill(path, tmp_path / "one", 1)
    two = distill(path, tmp_path / "two", 2)

    centers = [
        load_file(str(tmp_path / run / "stage2-lambda1" / "teacher_centers.safetensors"))["centers"]
        for run in ("one", "two")
    ]
    torch.testing.assert_close(centers[1], centers[0], rtol=0, atol=1e-6)
    results = {run: json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "two")}
    assert results["two"]["world_size"] == 2
    for run in ("one", "two"):
        # 18 test images; with 2 ranks and batch 4, the last batch is padded: still 18.
        assert results[run]["final"]["test_samples"] == 18
        assert results[run]["stage1"]["test_samples"] == 18
        assert results[run]["final"]["validation_samples"] == 9
        search, alone = results[run]["distill_weight_search"], results[run]["student_alone"]
        assert [c["validation_samples"] for c in search["candidates"]] == [9, 9]  # every process's share counted
        assert alone["validation_samples"] == 9
        best = max(search["candidates"], key=lambda c: c["validation_top1"])  # ties: the first, as listed
        assert search["selected"] == best["distill_weight"]
        pick = alone if alone["validation_top1"] > best["validation_top1"] else best  # ties: REFILLED's
        assert alone["exported"] is (pick is alone)
        assert results[run]["final"]["validation_top1"] == pick["validation_top1"]
        exported = load_file(str(tmp_path / run / "model" / "model.safetensors"))
        chosen = load_file(str(tmp_path / run / pick["stage_dir"] / "final" / "model.safetensors"))
        assert all(exported[k].equal(chosen[k]) for k in chosen)
    log = two.stdout + two.stderr
    assert log.count("Exported the model to") == 1 and "(process 0)" in log
    # what every process would say alike is said once (replicas: --log_level_replica, warnings)
    assert log.count("Data path: ") == 1 and log.count("Teacher input: ") == 1
    # every parameter is used in every stage: DDP is told so, and does not walk the graph at each
    # step to find unused ones (transformers' default for models not its own; PyTorch warned)
    assert "find_unused_parameters=True was specified" not in log
    # no warning raised in refilled-hf's own code (torch's deprecated autograd all-gather warned)
    assert not re.search(r"refilled_hf/\S+\.py:\d+: \w*Warning", log), log

    # a notice that reaches rank 0 at step 1: the processes agree at the next logging step (2), both
    # stop there after one checkpoint, and the resumed run ends as the uninterrupted one
    script = tmp_path / "signal_rank_zero.py"
    script.write_text(_SIGNAL_RANK_0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = subprocess.run([*launcher, str(script), str(path), str(tmp_path / "stopped")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0, log[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: SIGTERM received: stage1 stopped at step 2 of" in log, log[-3000:]
    # the notice's warning says when the processes stop (it said "at the end of this step")
    assert ("SIGTERM received: the stage stops after a checkpoint at the next logging step, where its 2 processes "
            "agree (every 2 steps, --logging_steps)") in log, log[-3000:]  # fmt: skip
    stage1 = tmp_path / "stopped" / "stage1"
    assert sorted(p.name for p in stage1.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (stage1 / "checkpoint-2" / "rng_state_1.pth").is_file()
    assert not (tmp_path / "stopped" / "results.json").exists()
    distill(path, tmp_path / "stopped", 2, True, "--resume_from_checkpoint", "true")
    resumed = json.loads((tmp_path / "stopped" / "results.json").read_text())
    assert resumed["final"]["test_top1"] == results["two"]["final"]["test_top1"]
    assert resumed["final"]["validation_loss"] == pytest.approx(results["two"]["final"]["validation_loss"], rel=1e-5)
    assert resumed["distill_weight_search"]["selected"] == results["two"]["distill_weight_search"]["selected"]

    # run again once finished: its results, nothing trained; another run's settings: every process
    # refuses with the same message (the others used to fail on the closed process group)
    before = (tmp_path / "two" / "results.json").read_bytes()
    again = distill(path, tmp_path / "two", 2, True, "--resume_from_checkpoint", "true")
    assert "holds this run, finished: nothing is trained again" in again.stderr
    assert (tmp_path / "two" / "results.json").read_bytes() == before
    refused = distill(path, tmp_path / "two", 2, True, "--resume_from_checkpoint", "true", "--seed", "3", ok=False)
    log = refused.stdout + refused.stderr
    assert log.count("error: Cannot resume: the run in") == 2 and "internal error" not in log


def test_a_run_over_two_processes_reports_every_processs_numbers_of_the_models_it_exports(tmp_path):
    """One 2-process ce run, launched by torchrun on a machine without a GPU and without
    --use_cpu, checked for three past faults:
    - its processes trained alone, each as process 0 of 1 (the second failed on the first
      one's lock of --output_dir);
    - each process updates its batch-norm statistics from its own batches, so they drift apart
      in training, and the export holds rank 0's: each process measured its share of the
      images with its own statistics, and the run reported a top-1 and a loss of no model it
      wrote;
    - transformers logs `loss` averaged over the processes, but the loss components (`ce`, ...)
      were rank 0's alone, and so was the end's `train_loss` for the steps after the last log
      (all of them under a --logging_steps longer than the stage)."""
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "unused", method="ce", per_device_train_batch_size=6,
                         per_device_eval_batch_size=4, stage2_epochs=3)  # fmt: skip
    for key in ("output_dir", "use_cpu"):
        recipe.pop(key)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = distill(path, tmp_path / "each", 2, say_cpu=False)  # logs every step
    results = json.loads((tmp_path / "each" / "results.json").read_text())
    assert results["world_size"] == 2 and results["schedule"]["global_batch"] == 12
    log = run.stdout + run.stderr
    assert log.count("Exported the model to") == 1 and "parallel_mode != ParallelMode.DISTRIBUTED" not in log
    assert log.count("ce: training 9 steps (3 epochs) in ") == 1  # said by process 0 only

    reported = results["final"]
    assert reported["test_samples"] == 18
    config = RefilledConfig(**{**recipe, "use_cpu": True, "output_dir": str(tmp_path / "evaluated")})
    for split in ("test", "validation"):
        alone = evaluate_model(f"local-dir:{tmp_path / 'each' / 'model'}", config, split=split)
        for metric in ("top1", "loss", "samples"):
            key = f"{split}_{metric}"
            assert alone[key] == pytest.approx(reported[key], rel=1e-5, abs=1e-5), key

    history = json.loads(max((tmp_path / "each" / "ce").glob("checkpoint-*/trainer_state.json")).read_text())
    steps = [entry for entry in history["log_history"] if "loss" in entry]
    assert len(steps) == history["global_step"] > 2
    for entry in steps:  # ce alone: the loss is its cross-entropy
        assert entry["ce"] == pytest.approx(entry["loss"], abs=1e-5), entry
    distill(path, tmp_path / "once", 2, True, "--logging_steps", "1000")  # no log before the end
    results = json.loads((tmp_path / "once" / "results.json").read_text())
    mean = sum(entry["loss"] for entry in steps) / len(steps)
    assert results["final"]["train_metrics"]["train_loss"] == pytest.approx(mean, abs=1e-5)
    # and the training so far that each checkpoint records for a resume (every epoch, no log yet)
    for checkpoint in (tmp_path / "once" / "ce").glob("checkpoint-*"):
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        so_far = state["stateful_callbacks"]["RefilledTrainingSoFar"]["attributes"]
        logged = sum(entry["loss"] for entry in steps[: state["global_step"]])
        assert so_far["steps"] == state["global_step"] and so_far["loss_sum"] == pytest.approx(logged, abs=1e-4)


# The equivalence scenarios below run in one launch per process count: each launch costs
# seconds of imports (torch, timm, transformers) per process, far more than a scenario's
# own work, and one launch per scenario and process count made them the suite's slowest
# tests. Each scenario is a function of the script that returns what its test compares;
# it seeds what it draws, so neither the other scenarios nor their order change it.
SCENARIOS_SCRIPT = """
import gc, os, sys, numpy as np, timm, torch, torch.distributed as dist
from refilled_hf import RefilledConfig, RefilledTrainer
from refilled_hf.data_device import DeviceImages
from refilled_hf.distributed import gather_for_mining
from refilled_hf.losses import relationship_loss_with_stats

out, folder, names = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
world = int(os.environ.get("WORLD_SIZE", "1"))
rank = int(os.environ.get("RANK", "0"))
if world > 1:
    dist.init_process_group("gloo")  # the Trainers' accelerate state takes this group over


def share(n):
    # this process's contiguous share of a global batch of n
    return slice(rank * n // world, (rank + 1) * n // world)


def mining():
    g = torch.Generator().manual_seed(0)
    x, teacher = torch.randn(32, 16, generator=g), torch.randn(32, 24, generator=g)
    labels = torch.arange(32) % 4
    model = torch.nn.Linear(16, 8)
    model.load_state_dict({"weight": torch.randn(8, 16, generator=g), "bias": torch.randn(8, generator=g)})
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    mined = gather_for_mining(net(x[share(32)]), teacher[share(32)], labels[share(32)])
    loss, stats = relationship_loss_with_stats(*mined)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "tuples": stats["tuples"], "triplets": int(stats["triplets"]),
            "rows": mined[0].shape[0], **{k: v.detach().clone() for k, v in model.state_dict().items()}}


def augmentation():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    store = DeviceImages.from_arrays([image], 32, (0.5,) * 3, (0.25,) * 3, padding=4, flip=True, device="cpu")
    torch.manual_seed(0)  # as the Trainer seeds every process
    draws = torch.stack([d.long() for d in store.draw(32 // world)], 1)  # this process's batch of the global 32
    if world > 1:
        parts = [torch.empty_like(draws) for _ in range(world)]
        dist.all_gather(parts, draws)
        draws = torch.cat(parts)
    return {"draws": draws}


def stage_gradients(stage):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1, 6, 7, 6, 7, 6, 7, 6, 7])  # the halves hold other classes
    torch.manual_seed(0)
    student = timm.create_model("cifar_wrn_16_1", num_classes=8)
    teacher = timm.create_model("cifar_wrn_16_1", num_classes=5)
    args = RefilledConfig(output_dir=f"{folder}/{stage}", use_cpu=True, eval_strategy="no", save_strategy="no",
                          report_to=[], centers="batch", confidence_weights=True, distill_weight=10.0)
    trainer = RefilledTrainer(model=student, args=args, stage=stage, num_classes=8, teacher=teacher)
    model = trainer.model.eval()  # batch norm by running statistics: each image's output is its own in any split
    loss = trainer.compute_loss(model, {"pixel_values": images[share(16)], "labels": labels[share(16)]})
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    if world > 1:
        dist.all_reduce(grads)  # DDP's average of the processes' gradients
        grads /= world
    return {"grads": grads, "world": trainer.args.world_size}


def stage2():
    return stage_gradients("stage2")


def rkd():
    return stage_gradients("rkd")


def predict():
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(11)]
    torch.manual_seed(0)
    student = timm.create_model("cifar_wrn_16_1", num_classes=3)
    args = RefilledConfig(output_dir=f"{folder}/predict", use_cpu=True, eval_strategy="no", save_strategy="no",
                          per_device_eval_batch_size=2, report_to=[])
    trainer = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3)
    output = trainer.predict(images)
    return {"world": trainer.args.world_size, "predictions": torch.from_numpy(output.predictions),
            "labels": torch.from_numpy(output.label_ids), "metrics": output.metrics}


def unused():
    g = torch.Generator().manual_seed(0)
    images = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(16)]
    found = {}
    for spare in (False, True):
        torch.manual_seed(0)
        student = timm.create_model("cifar_wrn_16_1", num_classes=3)
        if spare:  # a parameter no forward pass uses: DDP must look for it at every step, or fail at the second
            student.spare = torch.nn.Parameter(torch.zeros(2))
        args = RefilledConfig(output_dir=f"{folder}/unused-{spare}", use_cpu=True, eval_strategy="no",
                              save_strategy="no", per_device_train_batch_size=4, max_steps=3, report_to=[],
                              stage2_epochs=2)  # 4 steps, --max_steps stops at 3
        trainer = RefilledTrainer(model=student, args=args, stage="ce", num_classes=3, train_dataset=images)
        trainer.train()
        found[spare] = (trainer.model_wrapped.find_unused_parameters, trainer.state.global_step)
    return found


def diverged():
    # one process alone counted a non-finite loss: every process must stop (not only that one)
    from refilled_hf.stages import DivergedError, _check_finite

    torch.manual_seed(0)
    args = RefilledConfig(output_dir=f"{folder}/diverged", use_cpu=True, eval_strategy="no", save_strategy="no",
                          report_to=[])
    trainer = RefilledTrainer(model=timm.create_model("cifar_wrn_16_1", num_classes=3), args=args, stage="ce",
                              num_classes=3)
    trainer.nonfinite_losses = torch.tensor(1 if rank == world - 1 else 0)
    trainer.train_metrics = {"train_loss": 0.5}
    try:
        _check_finite(trainer)
    except DivergedError as err:
        return {"stopped": str(err)}
    return {"stopped": None}


results = {}
for name in names:
    results[name] = globals()[name]()
    gc.collect()  # the scenario's DDP wrappers and Trainers go while gloo is up
if rank == 0:
    torch.save(results, out)
if dist.is_initialized():
    # tear gloo down before exit, every DDP wrapper first: a rank exiting with either alive aborted
    # after its work was done ('terminate called without an active exception', SIGABRT) in 1 run
    # of 16 under load with a wrapper alive, and in none of 40 without it
    dist.barrier()
    dist.destroy_process_group()
"""

SCENARIOS = ("mining", "augmentation", "stage2", "rkd", "predict")


def run_scenarios(tmp_path: Path, processes: int, names: tuple[str, ...]) -> dict:
    """What each scenario of ``SCENARIOS_SCRIPT`` named in ``names`` returned on process 0, run in
    ``processes`` CPU processes (gloo, under torchrun where more than one)."""
    script = tmp_path / "scenarios.py"
    script.write_text(SCENARIOS_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    out = tmp_path / f"processes{processes}"
    cmd = [sys.executable, *(launcher if processes > 1 else []), str(script), f"{out}.pt", str(out), ",".join(names)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(f"{out}.pt")


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory) -> dict[str, tuple]:
    """Each scenario's (one process, two processes) results; DDP's unused-parameter scenario
    (one process is not wrapped) and the divergence one (one process of several) have two
    processes only."""
    folder = tmp_path_factory.mktemp("scenarios")
    one = run_scenarios(folder, 1, SCENARIOS)
    two = run_scenarios(folder, 2, (*SCENARIOS, "unused", "diverged"))
    return {name: (one.get(name), two[name]) for name in two}


def test_global_mining_over_two_processes_equals_one_process_on_the_whole_batch(scenarios):
    a, b = scenarios["mining"]
    assert a["rows"] == b["rows"] == 32  # the two processes mined the whole batch
    assert a["tuples"] == b["tuples"] > 0 and a["triplets"] == b["triplets"]
    torch.testing.assert_close(b["loss"], a["loss"], rtol=0, atol=1e-6)
    for key in ("weight", "bias"):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)


def test_the_device_path_draws_over_two_processes_what_one_process_draws_for_the_global_batch(scenarios):
    # Each process drew from its identically seeded generator: the k-th image of both
    # processes' batches got the same crop and flip, 16 distinct draws for 32 images.
    one, two = scenarios["augmentation"]
    assert torch.equal(two["draws"], one["draws"])


@pytest.mark.parametrize("stage", ["stage2", "rkd"])
def test_stage2_and_rkd_over_two_processes_equal_one_process_on_the_whole_batch(scenarios, stage):
    # Each process took stage 2's local classes, per-batch centres (--centers batch) and the range
    # of its confidence weights, or RKD's pairs and triples, from its own half of the batch.
    one, two = scenarios[stage]
    assert (one["world"], two["world"]) == (1, 2)
    torch.testing.assert_close(two["grads"], one["grads"], rtol=1e-4, atol=1e-6)


def test_predict_over_two_processes_returns_every_image_once_in_the_data_sets_order(scenarios):
    a, b = scenarios["predict"]
    assert (a["world"], b["world"]) == (1, 2)
    # 11 images in batches of 2 over 2 processes: the last batch is padded, and the padding dropped
    assert b["predictions"].shape == (11, 3) and b["labels"].tolist() == [i % 3 for i in range(11)]
    torch.testing.assert_close(b["predictions"], a["predictions"], rtol=0, atol=1e-5)
    assert b["metrics"]["test_samples"] == 11 and b["metrics"]["test_top1"] == pytest.approx(a["metrics"]["test_top1"])


def test_ddp_looks_for_unused_parameters_exactly_where_the_student_has_some(scenarios):
    assert scenarios["unused"][1] == {False: (False, 3), True: (True, 3)}


def test_a_non_finite_loss_on_one_process_stops_every_process(scenarios):
    # rank 1 alone counted it; rank 0 (whose answer comes back) must stop too, not go on to export
    stopped = scenarios["diverged"][1]["stopped"]
    assert stopped is not None and "1 training steps had a non-finite loss (counted over its 2 processes" in stopped


def test_the_cli_tears_the_process_group_down_before_exit(monkeypatch, capsys):
    """A process that exits with gloo's threads alive can abort after a successful run."""
    import torch.distributed as dist

    from refilled_hf.cli import main

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    assert main(["losses-demo"]) == 0 and not dist.is_initialized()
    dist.init_process_group("gloo", rank=0, world_size=1)
    assert main(["distill", "--no_such_field", "1"]) == 2 and not dist.is_initialized()  # a refused command too
    capsys.readouterr()


_SIGNAL_RANK_0 = """
import os, signal, sys
import torch.distributed as dist
import yaml
from transformers import TrainerCallback
from refilled_hf.config import RefilledConfig
from refilled_hf.pipeline import RunInterrupted, run_distillation

class SignalRankZero(TrainerCallback):  # a notice that reaches one process only
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["RANK"] == "0" and args.output_dir.endswith("stage1") and state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

recipe = {**yaml.safe_load(open(sys.argv[1])), "output_dir": sys.argv[2]}
try:
    run_distillation(RefilledConfig(**recipe), callbacks=[SignalRankZero()])
    code = 0
except RunInterrupted as err:
    print(f"rank {os.environ['RANK']}: {err}", flush=True)
    code = 128 + err.signal_number
if dist.is_initialized():
    dist.destroy_process_group()
sys.exit(code)
"""
