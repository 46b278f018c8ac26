"""The command line: recipes plus overrides, help, errors, evaluate."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import tiny_recipe, write_image_dataset

from refilled_hf.cli import CliError, main, parse_command, parse_config, resolved_config
from refilled_hf.config import ConfigError, RefilledConfig
from refilled_hf.rundir import DiskFullError


def write_recipe(path, **fields):
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_recipe_then_command_line_overrides(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", method="rkd", teacher="resnet18", distill_weight=3.0, tau1=2.0)
    (config,) = parse_config((RefilledConfig,), ["--config", recipe, "--distill_weight", "7"], "t")
    assert config.method == "rkd" and config.tau1 == 2.0
    assert config.distill_weight == 7.0  # the command line wins
    assert config.weight_decay == 5e-4 and config.per_device_train_batch_size == 128  # task defaults


def test_an_unset_output_dir_is_the_methods_own_folder(tmp_path, caplog):
    """Every command wrote to outputs/refilled: the teacher train-teacher trained there, and a
    baseline, left the REFILLED run that followed them refused ("holds another run")."""
    from refilled_hf.cli import parse_command

    folder = {method: parse_command("distill", ["--method", method])[0].output_dir for method in ("refilled", "ce")}
    assert folder == {"refilled": "outputs/refilled", "ce": "outputs/ce"}
    assert parse_command("train-teacher", [])[0].output_dir == "outputs/teacher"
    recipe = write_recipe(tmp_path / "r.yaml", method="kd", output_dir="runs/kd")
    assert parse_command("train-teacher", ["--config", recipe])[0].output_dir == "runs/kd"  # a recipe's is kept
    assert parse_command("distill", ["--config", recipe])[0].output_dir == "runs/kd"
    assert parse_command("distill", ["--method", "rkd", "--output_dir", "x"])[0].output_dir == "x"
    evaluated = parse_command("evaluate", ["--model", "m"])[1]
    assert "output_dir" not in evaluated.fields_unused_by("evaluate")  # not the user's: no warning
    assert "output_dir" in parse_command("evaluate", ["--model", "m", "--output_dir", "x"])[1].fields_unused_by(
        "evaluate"
    )


def test_none_on_the_command_line_unsets_an_optional_field_a_recipe_sets(tmp_path):
    """The cross-task recipe names the teacher's classes; a user whose teacher knows others
    was told to leave --teacher_classes unset, which the command line could not do."""
    recipe = write_recipe(tmp_path / "r.yaml", teacher="resnet18", teacher_classes="cifar100-first-half",
                          shots_per_class=50, distill_weight=10.0, classes="50-99", image_size=48)  # fmt: skip
    argv = ["--config", recipe, "--teacher_classes", "none", "--shots_per_class", "NONE", "--distill_weight", "null",
            "--classes", "None", "--image_size", "none"]  # fmt: skip
    (config,) = parse_config((RefilledConfig,), argv, "t")
    assert (config.teacher_classes, config.shots_per_class, config.distill_weight, config.classes) == (None,) * 4
    assert config.image_size is None and config.teacher == "resnet18"
    (config,) = parse_config((RefilledConfig,), ["--config", recipe], "t")  # the recipe's values otherwise
    assert (config.teacher_classes, config.shots_per_class, config.distill_weight) == ("cifar100-first-half", 50, 10)
    with pytest.raises(SystemExit):  # a field that is never unset keeps its type's error
        parse_config((RefilledConfig,), ["--teacher", "x", "--stage1_epochs", "none"], "t")
    # --save_total_limit's none keeps every checkpoint (YAML's null could, the command line could not)
    assert parse_config((RefilledConfig,), ["--save_total_limit", "none"], "t")[0].save_total_limit is None
    assert parse_config((RefilledConfig,), ["--save_total_limit", "3"], "t")[0].save_total_limit == 3
    with pytest.raises(SystemExit):
        parse_config((RefilledConfig,), ["--teacher", "x", "--shots_per_class", "many"], "t")


def test_unknown_recipe_key_is_rejected_with_a_suggestion(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teacher="resnet18", distil_weight=3.0)
    with pytest.raises(CliError, match="distil_weight.*did you mean 'distill_weight'"):
        parse_config((RefilledConfig,), ["--config", recipe], "t")


def test_unknown_flag_and_bad_values(tmp_path):
    with pytest.raises(CliError, match="Unknown arguments") as refused:
        parse_config((RefilledConfig,), ["--teacher", "x", "--no_such_flag", "1"], "t")
    assert "did you mean" not in str(refused.value)
    with pytest.raises(CliError, match=r"--stage1_milestones: did you mean --stage2_milestones\? See"):
        parse_config((RefilledConfig,), ["--stage1_milestones", "3"], "t")
    with pytest.raises(CliError, match=r"--distil-weight: did you mean --distill_weight\?"):
        parse_config((RefilledConfig,), ["--distil-weight=3"], "t")
    with pytest.raises(ConfigError, match="Unknown method 'fitnet'"):
        parse_config((RefilledConfig,), ["--teacher", "x", "--method", "fitnet"], "t")
    # an unknown word is named before a missing required one (argparse said only `--folder` is required)
    with pytest.raises(CliError, match=r"Unknown arguments: \['--model_dir', 'out/model'\]"):
        parse_command("push", ["--model_dir", "out/model", "--hub_model_id", "me/model"])
    with pytest.raises(SystemExit):  # without one, argparse's own message, the usage line first
        parse_command("push", ["--hub_model_id", "me/model"])


def test_disable_tqdm_turns_off_the_progress_bars_of_datasets_too(tmp_path, capsys):
    """A job's log collected datasets' bars (reading the files, generating each split) although
    the run said --disable_tqdm true."""
    import datasets
    from huggingface_hub.utils import enable_progress_bars

    fresh = write_image_dataset(tmp_path / "data", per_class_train=4, per_class_test=2)  # (nothing cached yet)
    argv = ["train-teacher", "--teacher", "cifar_wrn_16_1", "--dataset", str(fresh), "--classes", "0-1", "--image_size",
            "16", "--stage2_epochs", "1", "--validation_fraction", "0", "--use_cpu", "true"]  # fmt: skip
    try:
        assert main([*argv, "--output_dir", str(tmp_path / "quiet"), "--disable_tqdm", "true"]) == 0
        quiet = capsys.readouterr().err
    finally:  # (the rest of the suite as it was)
        datasets.enable_progress_bars()
        enable_progress_bars()
    assert "Generating train split" not in quiet and "it/s]" not in quiet
    fresh = write_image_dataset(tmp_path / "data2", per_class_train=4, per_class_test=2)
    argv[argv.index(str(tmp_path / "data"))] = str(fresh)
    assert main([*argv, "--output_dir", str(tmp_path / "bars"), "--disable_tqdm", "false"]) == 0
    assert "Generating train split" in capsys.readouterr().err  # (what the quiet run would have shown)


def test_resolved_config_hides_tokens():
    config = RefilledConfig(teacher="x", hub_token="hf_secret_value", output_dir="o")
    shown = resolved_config(config)
    assert "hub_token" not in shown and "hf_secret_value" not in json.dumps(shown, default=str)
    assert shown["method"] == "refilled" and shown["output_dir"] == "o"


def test_version_and_unknown_commands(capsys):
    import timm
    import transformers

    from refilled_hf import __version__

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"refilled-hf {__version__} (torch {torch.__version__}")
    assert f"timm {timm.__version__}" in out and f"transformers {transformers.__version__}" in out
    assert main(["distil", "--teacher", "x"]) == 2
    captured = capsys.readouterr()
    assert "refilled-hf: error: unknown command 'distil' (did you mean 'distill'?)" in captured.err
    assert "usage: refilled-hf" in captured.out
    assert main([]) == 2 and "unknown command" not in capsys.readouterr().err


def test_help_lists_commands_and_fields(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train-teacher", "distill", "evaluate", "quickstart"):
        assert command in out
    proc = subprocess.run(
        [sys.executable, "-m", "refilled_hf.cli", "distill", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    for flag in ("--config", "--distill_weight", "--stage1_variant", "--shots_per_class", "--teacher"):
        assert flag in proc.stdout
    assert "lambda: weight of the stage-2 local-classifier KL" in " ".join(proc.stdout.split())


def test_help_shows_refilled_hf_options_before_the_inherited_trainer_options(capsys, monkeypatch):
    """argparse lists options as added: refilled-hf's own came after some 100 Trainer options."""
    monkeypatch.setenv("COLUMNS", "2000")
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: refilled-hf distill [--config recipe.yaml] [--field value ...]\n")
    sections: dict[str, list[str]] = {}
    title = None
    for line in out.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            sections[title] = []
        elif title and line.startswith("  --"):
            sections[title].append(line.split()[0].rstrip(","))
    own, honoured, refused = (sections[t] for t in list(sections)[1:])
    assert list(sections)[1] == "refilled-hf options"
    assert own[:3] == ["--config", "--method", "--student"]
    assert {"--teacher", "--classes", "--distill_weight", "--stage1_epochs"} <= set(own)
    assert {"--output_dir", "--seed", "--bf16", "--per_device_train_batch_size", "--max_steps"} <= set(honoured)
    assert {"--learning_rate", "--num_train_epochs", "--fsdp", "--do_train"} <= set(refused)
    assert not set(own) & set(honoured) and not set(honoured) & set(refused)
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    assert capsys.readouterr().out.startswith(
        "usage: refilled-hf evaluate --model MODEL [--config recipe.yaml] [--field value ...]\n"
    )


def test_cli_errors_exit_2_with_the_message(tmp_path, capsys):
    code = main(["distill", "--teacher", "resnet18", "--method", "kd", "--tau2", "0"])
    assert code == 2
    assert "`tau2` must be > 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error,code,message",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 1,
         r"error: out of memory on the GPU; lower --per_device_train_batch_size"),
        (MemoryError(), 1, r"error: out of memory on the host; lower --per_device_train_batch_size"),
        (OSError(28, "No space left on device"), 1, r"error: OSError: \[Errno 28\] No space left on device$"),
        (DiskFullError(28, "No space left on the disk while ... --resume_from_checkpoint true"), 1,
         r"error: No space left on the disk while \.\.\. --resume_from_checkpoint true$"),
        (KeyboardInterrupt(), 130, r"interrupted\.$"),
        (RuntimeError("a bug"), 1, r"internal error: RuntimeError: a bug \(set REFILLED_HF_TRACEBACK=1"),
    ],
    ids=["gpu-oom", "host-oom", "disk-full", "disk-full-while-training", "interrupt", "bug"],
)  # fmt: skip
def test_failures_during_a_command_end_in_one_line_and_a_nonzero_exit(error, code, message, monkeypatch, capsys):
    from refilled_hf import cli

    def fail(argv):
        raise error

    monkeypatch.setattr(cli, "cmd_evaluate", fail)
    monkeypatch.delenv("REFILLED_HF_TRACEBACK", raising=False)
    assert main(["evaluate"]) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and re.search(message, err), err


def test_a_tracker_that_fails_is_named_as_such_not_as_a_bug(monkeypatch, capsys):
    """An error raised through transformers' tracker callbacks (a store MLflow refuses, a W&B
    login; here W&B's own check that it is installed) is the tracker's setup, not a bug to
    report: it says so, and how to go on."""
    from transformers.integrations import WandbCallback, integration_utils

    from refilled_hf import cli

    def train(argv, command):  # the callback's own check: a raise from inside transformers' integrations
        WandbCallback()

    monkeypatch.setattr(integration_utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(cli, "cmd_train", train)
    monkeypatch.delenv("REFILLED_HF_TRACEBACK", raising=False)
    assert main(["distill"]) == 1
    err = capsys.readouterr().err.strip()
    said = "refilled-hf distill: error: the experiment tracker (--report_to) failed: RuntimeError: WandbCallback"
    assert err.startswith(said) and "--report_to none" in err and "internal" not in err


@pytest.mark.slow
def test_distill_then_evaluate_from_the_command_line(tmp_path):
    data = write_image_dataset(tmp_path / "data")
    recipe = tiny_recipe(data, tmp_path / "run", method="ce", stage2_epochs=1)
    path = write_recipe(tmp_path / "ce.yaml", **recipe)
    proc = subprocess.run([sys.executable, "-m", "refilled_hf.cli", "distill", "--config", path],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resolved configuration:" in proc.stdout and "test top-1 (%)" in proc.stdout
    model = f"local-dir:{tmp_path / 'run' / 'model'}"
    args = ["evaluate", "--model", model, "--dataset", str(data), "--classes", "3-5", "--use_cpu", "true",
            "--validation_fraction", "0.25", "--output_dir", str(tmp_path / "eval"), "--image_size", "16"]  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "refilled_hf.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{") :])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert metrics["test_samples"] == 18
    assert metrics["test_top1"] == pytest.approx(results["final"]["test_top1"])


def test_results_summary_names_the_lambda_and_every_candidate(capsys):
    from refilled_hf.cli import _print_results

    search = {"selected": 10.0, "candidates": [{"distill_weight": 1.0, "validation_top1": 40.0},
                                               {"distill_weight": 10.0, "validation_top1": 42.5},
                                               {"distill_weight": 100.0, "diverged": "loss NaN"}]}  # fmt: skip
    _print_results({"method": "refilled", "final": {"test_top1": 41.0}, "distill_weight": 10.0,
                    "distill_weight_search": search})  # fmt: skip
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "lambda 1 validation (%) 40.00" in lines and "lambda 10 validation (%) 42.50" in lines
    assert "lambda 100 validation (%) diverged" in lines and "lambda (chosen on validation) 10" in lines
    _print_results({"method": "refilled", "final": {"test_top1": 41.0}, "distill_weight": 3.0})
    assert "lambda 3" in [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for exported, says in ((True, "the student alone (cross-entropy)"), (False, "REFILLED's pick")):
        alone = {"epochs": 20.0, "validation_top1": 43.0 if exported else 39.0, "exported": exported}
        _print_results({"method": "refilled", "final": {"test_top1": 41.0}, "distill_weight": 10.0,
                        "distill_weight_search": search, "student_alone": alone})  # fmt: skip
        lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
        assert f"student alone (20 ep.) validation (%) {alone['validation_top1']:.2f}" in lines
        assert f"exported model {says}" in lines
    cut = {"epochs": 400.0, "validation_top1": 2.0, "exported": True, "train_metrics": {"epoch": 0.15}}  # --max_steps
    _print_results({"method": "refilled", "final": {"test_top1": 2.0}, "distill_weight_search": search,
                    "student_alone": cut})  # fmt: skip
    out = capsys.readouterr().out
    assert "student alone (0.15 of 400 ep.) validation (%) 2.00" in [
        " ".join(line.split()) for line in out.splitlines()
    ]
    # the values stand in one column, however long a label
    starts = {line.rindex(" ") for line in out.splitlines() if line.rstrip().endswith("2.00")}
    assert len(starts) == 1, out


def test_none_unsets_a_recipes_baselines_from_the_command_line(tmp_path):
    """The quickstart's refilled recipe names its ce run in compare_runs: `--compare_runs none`
    read "none" as a run folder ("compare_runs: none has no results.json")."""
    path = write_recipe(tmp_path / "r.yaml", output_dir=str(tmp_path / "o"), compare_runs="runs/ce")
    (named,) = parse_config((RefilledConfig,), ["--config", path], "t")
    assert named.compare_runs == "runs/ce"
    (unset,) = parse_config((RefilledConfig,), ["--config", path, "--compare_runs", "none"], "t")
    assert unset.compare_runs is None


def test_printed_recipe_reads_back_as_the_same_configuration(tmp_path):
    config = RefilledConfig(teacher="local-dir:t", classes="5-9", seed=7, use_cpu=True, eval_strategy="no",
                            distill_weight=3.0, output_dir=str(tmp_path / "o"))  # fmt: skip
    recipe = config.to_recipe()
    assert "accelerator_config" not in recipe and "hub_token" not in recipe
    path = write_recipe(tmp_path / "r.yaml", **recipe)
    (again,) = parse_config((RefilledConfig,), ["--config", path], "t")
    assert again.to_recipe() == recipe


def test_what_this_machine_decided_stays_out_of_the_recipes_a_user_takes_elsewhere(
    data_dir, tmp_path, monkeypatch, capsys
):
    """bf16 on a machine without a GPU runs on the CPU (and transformers then pins no memory): the
    printed recipe and the model card's said `use_cpu: true`, which ran their copy on a GPU
    machine's CPU. The run's identity still records how it ran."""
    from refilled_hf.pipeline import run_teacher_training

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = RefilledConfig(bf16=True, output_dir=str(tmp_path / "o"))
    assert config.use_cpu and not config.dataloader_pin_memory  # how it runs here
    recipe = config.to_recipe()
    assert recipe["bf16"] is True and {"use_cpu", "dataloader_pin_memory"}.isdisjoint(recipe)
    assert config.to_recipe(as_run=True)["use_cpu"] is True
    assert config.with_changes(method="ce").to_recipe() == {**recipe, "method": "ce"}
    assert config.with_changes(use_cpu=True).to_recipe()["use_cpu"] is True  # given now
    assert RefilledConfig(bf16=True, use_cpu=True).to_recipe()["use_cpu"] is True  # given by the user

    out = tmp_path / "teacher"
    teacher = dict(dataset=str(data_dir), output_dir=str(out), teacher="cifar_wrn_16_1", image_size=16, classes="0-2",
                   stage2_epochs=1, per_device_train_batch_size=16, disable_tqdm=True, bf16=True)  # fmt: skip
    run_teacher_training(RefilledConfig(**teacher))
    card = (out / "model" / "README.md").read_text()
    assert "\nbf16: true\n" in card and "use_cpu" not in card and "dataloader_pin_memory" not in card
    assert json.loads((out / "run.json").read_text())["identity"]["use_cpu"] is True
    capsys.readouterr()
    main(["train-teacher", "--config", write_recipe(tmp_path / "r.yaml", **teacher), "--overwrite_output", "true"])
    printed = capsys.readouterr().out
    assert "\nbf16: true\n" in printed and "use_cpu" not in printed


def test_loader_workers_left_unset_follow_the_machine_and_recipes_leave_them_to_the_next_one(monkeypatch, tmp_path):
    """--dataloader_num_workers unset: the machine's default (config.default_loader_workers, told
    whether the run has an accelerator); recipes say null (each machine decides again), the run's
    identity says what ran. A count the user sets is kept, also in recipes."""
    import refilled_hf.config as config_module

    asked = []
    monkeypatch.setattr(config_module, "_has_accelerator", lambda: True)
    monkeypatch.setattr(
        config_module, "default_loader_workers", lambda on_accelerator: asked.append(on_accelerator) or 5
    )
    config = RefilledConfig(output_dir=str(tmp_path / "o"))
    assert config.dataloader_num_workers == 5 and asked == [True]
    assert config.to_recipe()["dataloader_num_workers"] is None
    assert config.to_recipe(as_run=True)["dataloader_num_workers"] == 5
    assert config.with_changes(seed=1).to_recipe()["dataloader_num_workers"] is None
    (again,) = parse_config((RefilledConfig,), ["--config", write_recipe(tmp_path / "r.yaml", **config.to_recipe())],
                            "t")  # fmt: skip
    assert again.dataloader_num_workers == 5 and again.to_recipe() == config.to_recipe()
    (unset,) = parse_config((RefilledConfig,), ["--config", write_recipe(tmp_path / "w.yaml", dataloader_num_workers=2),
                                                "--dataloader_num_workers", "none"], "t")  # fmt: skip
    assert unset.dataloader_num_workers == 5 and unset.to_recipe()["dataloader_num_workers"] is None
    assert RefilledConfig(use_cpu=True).dataloader_num_workers == 5 and asked[-1] is False  # training on the CPU
    mine = RefilledConfig(dataloader_num_workers=0)
    assert mine.dataloader_num_workers == 0 and mine.to_recipe()["dataloader_num_workers"] == 0


def test_a_multi_process_recipes_ddp_backend_trains_one_process_as_without_it(data_dir, tmp_path, monkeypatch):
    """--ddp_backend names a process group's backend; one process has none, and transformers asked
    Accelerate for the size of a group it never made ('Default process group has not been
    initialized'): a multi-GPU recipe run on one machine failed. It now trains as without the field,
    its recipe keeping it for the next multi-process run."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    config = RefilledConfig(ddp_backend="gloo", use_cpu=True, output_dir=str(tmp_path / "o"))
    assert config.world_size == 1 and config.ddp_backend is None
    assert config.to_recipe()["ddp_backend"] == "gloo" and "ddp_backend" not in config.to_recipe(as_run=True)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", dataset=str(data_dir), output_dir=str(out), method="ce",
                          student="cifar_wrn_16_1", image_size=16, classes="3-5", stage2_epochs=1,
                          per_device_train_batch_size=16, disable_tqdm=True, use_cpu=True,
                          ddp_backend="gloo")  # fmt: skip
    assert main(["distill", "--config", recipe]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert "\nddp_backend: gloo\n" in (out / "model" / "README.md").read_text()


def test_train_teacher_prints_the_fields_it_reads_and_they_read_back(tmp_path):
    """No student or distillation option in train-teacher's printed configuration (the student's
    default would name a model it does not train), and train-teacher takes it back unchanged."""
    from refilled_hf.cli import printed_recipe

    config = RefilledConfig(teacher="cifar_wrn_40_2", classes="0-49", stage2_epochs=30, seed=3,
                            output_dir=str(tmp_path / "t"))  # fmt: skip
    recipe = printed_recipe(config, "train-teacher")
    assert {"student", "method", "tau1", "distill_weight", "stage1_epochs", "teacher_classes"}.isdisjoint(recipe)
    assert recipe["teacher"] == "cifar_wrn_40_2" and recipe["stage2_epochs"] == 30 and recipe["seed"] == 3
    (again,) = parse_config((RefilledConfig,), ["--config", write_recipe(tmp_path / "r.yaml", **recipe)],
                            "refilled-hf train-teacher")  # fmt: skip
    assert again.to_recipe() == config.to_recipe() and again.fields_unused_by("train-teacher") == {}
    assert printed_recipe(config, "distill") == json.loads(json.dumps(config.to_recipe(), default=str))


@pytest.mark.slow
def test_probe_teacher_prints_the_ncm_accuracy_of_a_slow_reference(tmp_path, capsys):
    import numpy as np
    import pyarrow.parquet as pq
    import timm
    import torch
    import torch.nn.functional as F

    from refilled_hf.backbone import load_timm_model
    from refilled_hf.data import load_classification_data
    from refilled_hf.hub import export_model
    from refilled_hf.pipeline import data_pretrained_cfg, eval_copy, load_data
    from refilled_hf.preflight import load_teacher

    # shuffled labels: a hard task, so a probe computed on the wrong images is caught (on the
    # colour classes themselves every probe is 100 %)
    data_dir = write_image_dataset(tmp_path / "data", per_class_train=24)
    table = pq.read_table(data_dir / "train.parquet")
    labels = np.random.default_rng(0).permutation(table.column("label").to_numpy())
    table = table.set_column(table.schema.get_field_index("label"), table.schema.field("label"), [labels])
    pq.write_table(table, data_dir / "train.parquet")
    # a teacher whose record says it trained on classes 4-5 of this split, carved with another
    # seed: the student's validation images among its training images must be left out
    taught = load_classification_data(str(data_dir), classes="4-5", validation_fraction=0.25, seed=1,
                                      shots_per_class=6)  # fmt: skip
    torch.manual_seed(0)  # the teacher's weights, hence the probe, must not depend on the tests run before
    # (its head predicts its 2 classes, the student's task has 3: the probe reads only the embedding)
    teacher_folder = export_model(timm.create_model("cifar_wrn_16_1", num_classes=2), tmp_path / "teacher",
                                  label_names=taught.class_names, training_data=taught.selection_record())  # fmt: skip
    argv = ["--dataset", str(data_dir), "--teacher", f"local-dir:{teacher_folder}", "--student", "cifar_wrn_16_1",
            "--classes", "3-5", "--image_size", "16", "--validation_fraction", "0.25", "--use_cpu", "true",
            "--data_path", "workers", "--output_dir", str(tmp_path / "probe")]  # fmt: skip
    assert main(["probe-teacher", *argv]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is the JSON alone (`> probe.json`); the words go to stderr
    assert "Compare it with the student trained alone" in captured.err
    assert f"{result['left_out_teacher_training_images']} it trained on left out" in captured.err
    # the reference: one image at a time, centres = normalized sums of the teacher's embeddings
    # of each class's training images, prediction = the centre of highest cosine similarity
    (config,) = parse_config((RefilledConfig,), argv, "probe")
    student_cfg = load_timm_model(config.student).pretrained_cfg
    data = load_data(config, config.classes, student_cfg)
    teacher = load_teacher(config, data_pretrained_cfg(student_cfg, config.image_size)).eval()
    with torch.no_grad():
        train = eval_copy(data.train, data.eval_transform)
        sums = {}
        for i in range(len(train)):
            item = train[i]
            emb = teacher(item["pixel_values"][None])[0][0]
            sums[int(item["labels"])] = sums.get(int(item["labels"]), 0) + emb
        centers = F.normalize(torch.stack([sums[c] for c in sorted(sums)]), dim=1)
        hits, probed, size = {}, {}, {}
        for i in range(len(data.validation)):
            item = data.validation[i]
            c = int(item["labels"])
            size[c] = size.get(c, 0) + 1
            if data.validation.source_rows[i] in set(taught.train.source_rows.tolist()):
                continue  # an image the teacher trained on
            emb = F.normalize(teacher(item["pixel_values"][None])[0][0], dim=0)
            hits[c] = hits.get(c, 0) + int(int((centers @ emb).argmax()) == c)
            probed[c] = probed.get(c, 0) + 1
    left_out = len(data.validation) - sum(probed.values())
    assert 0 < left_out < 12 and result["left_out_teacher_training_images"] == left_out
    assert result["validation_images"] == sum(probed.values())
    assert result["train_images"] == len(data.train)
    # each class weighs as its share of the whole validation split, on the images left
    expected = sum(size[c] * hits[c] / probed[c] for c in probed) / sum(size[c] for c in probed)
    assert result["classes_probed"] == len(probed)
    assert result["probe_ncm_top1"] == pytest.approx(100.0 * expected)
    # its standard error: each class a binomial proportion over the images probed, weighted by its share,
    # at the overall rate (Laplace-smoothed: never 0 on a handful of images)
    total = sum(size[c] for c in probed)
    rate = (sum(hits.values()) + 1) / (sum(probed.values()) + 2)
    variance = sum((size[c] / total) ** 2 * rate * (1 - rate) / probed[c] for c in probed)
    assert result["probe_ncm_top1_stderr"] == pytest.approx(100.0 * variance**0.5)
    assert f"{result['probe_ncm_top1']:.1f}% (standard error {result['probe_ncm_top1_stderr']:.1f})" in captured.err
    plain = sum(hits.values()) / sum(probed.values())
    assert abs(expected - plain) > 0.01, "the data must tell the class-weighted probe from the plain one"


@pytest.mark.parametrize("encoding,expected", [("utf-8", '"Größe"'), ("ascii", '"Gr\\u00f6\\u00dfe"')])
def test_json_on_stdout_keeps_class_names_readable_where_it_can(encoding, expected, monkeypatch):
    """evaluate and probe-teacher print class names as written; escaped only for a stdout that
    cannot take them (printing them there would fail)."""
    import io

    from refilled_hf.cli import print_json

    out = io.TextIOWrapper(io.BytesIO(), encoding=encoding)
    monkeypatch.setattr(sys, "stdout", out)
    print_json({"test_per_class": {"Größe": {"top1": 50.0}}})
    out.flush()
    text = out.buffer.getvalue().decode(encoding)
    assert expected in text and json.loads(text) == {"test_per_class": {"Größe": {"top1": 50.0}}}


def test_the_probes_standard_error_never_calls_a_handful_of_images_exact():
    """One image per class is right or wrong: each class's own variance is 0. The error comes from
    the overall rate (Laplace-smoothed), and on many images it is the usual binomial one."""
    from refilled_hf.probe import class_weighted_accuracy

    ones = torch.ones(3, dtype=torch.float64)
    accuracy, stderr = class_weighted_accuracy(ones, ones, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert accuracy == pytest.approx(1 / 3) and stderr == pytest.approx((3 * (1 / 9) * 0.4 * 0.6 / 1) ** 0.5)
    assert class_weighted_accuracy(ones, ones, ones)[1] > 0.2  # all right on 3 images: far from certain
    # 2,500 images in 50 classes at 60 %: close to sqrt(p(1-p)/n), one point
    share = kept = torch.full((50,), 50.0, dtype=torch.float64)
    accuracy, stderr = class_weighted_accuracy(share, kept, torch.full((50,), 30.0, dtype=torch.float64))
    assert accuracy == pytest.approx(0.6) and stderr == pytest.approx((0.6 * 0.4 / 2500) ** 0.5, rel=1e-3)
    # a class without an image left weighs nothing
    left_out = class_weighted_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.0]), torch.tensor([2.0, 0.0]))
    assert left_out[0] == 1.0


def test_a_leading_tilde_in_a_path_is_the_home_folder_as_in_a_shell(data_dir, teacher_dir, tmp_path, monkeypatch,
                                                                     capsys):  # fmt: skip
    """A recipe's paths, and `local-dir:~/...` on a command line (which no shell expands),
    name the home folder: `--teacher local-dir:~/teacher` used to fail with 'no config.json'."""
    from refilled_hf.cli import CompareArguments, EvaluateArguments, PushArguments

    home = tmp_path / "home"
    home.mkdir()
    (home / "data").symlink_to(data_dir)
    (home / "teacher").symlink_to(teacher_dir)
    monkeypatch.setenv("HOME", str(home))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "dataset": "~/data",
                "teacher": "local-dir:~/teacher",
                "output_dir": "~/probe",
                "teacher_checkpoint": "~/w.safetensors",
                "compare_runs": "~/a, runs/b",
            }
        )
    )
    (config,) = parse_config((RefilledConfig,), ["--config", str(recipe), "--student_checkpoint", "~/s.pt"], "distill")
    assert config.dataset == f"{home}/data" and config.teacher == f"local-dir:{home}/teacher"
    assert config.output_dir == f"{home}/probe" and config.teacher_checkpoint == f"{home}/w.safetensors"
    assert config.student_checkpoint == f"{home}/s.pt" and config.compare_runs == f"{home}/a,runs/b"
    untouched = RefilledConfig(output_dir="o", dataset="uoft-cs/cifar100", teacher="hf-hub:me/t~1", student="resnet18",
                               compare_runs="a, b")  # fmt: skip
    assert (untouched.dataset, untouched.teacher, untouched.student) == ("uoft-cs/cifar100", "hf-hub:me/t~1",
                                                                         "resnet18")  # fmt: skip
    assert untouched.compare_runs == "a, b"  # written back only where a run needed expanding
    assert EvaluateArguments(model="local-dir:~/m", checkpoint="~/c.pt").model == f"local-dir:{home}/m"
    assert EvaluateArguments(model="resnet18", checkpoint="~/c.pt").checkpoint == f"{home}/c.pt"
    assert PushArguments(folder="~/run/model", repo_id="me/x").folder == f"{home}/run/model"
    assert CompareArguments(runs=["~/a", "b"]).runs == [f"{home}/a", "b"]
    # and a command runs from them: the teacher is found, the data read
    argv = ["--dataset", "~/data", "--teacher", "local-dir:~/teacher", "--student", "cifar_wrn_16_1", "--classes",
            "3-5", "--image_size", "16", "--use_cpu", "true", "--output_dir", str(tmp_path / "probe")]  # fmt: skip
    assert main(["probe-teacher", *argv]) == 0
    assert json.loads(capsys.readouterr().out)["teacher"] == f"local-dir:{home}/teacher"
