"""The documentation's command lines are ones refilled-hf accepts: every `refilled-hf ...`
(or `accelerate launch ... -m refilled_hf.cli ...`) command in a shell block of the
READMEs parses with the command's own parser, recipes and fields included, and every
benchmark call the READMEs and ``benchmarks/gpu_session.sh`` show parses with its script's
parser. A renamed or removed field or flag then fails here instead of in a user's terminal
(or in a lent GPU's few minutes)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from refilled_hf.cli import COMMANDS, parse_command

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "recipes" / "cifar100" / "README.md"]


def shell_lines(text: str) -> list[str]:
    """The command lines of the ```bash blocks: continuations joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def documented_commands(path: Path) -> list[tuple[str, list[str]]]:
    """``(command, argv)`` of each refilled-hf call in ``path``'s shell blocks; a call
    elided with ``...`` is left out (it is not meant to run as written)."""
    found = []
    for words in shell_lines(path.read_text()):
        segments, current = [], []
        for word in words:  # `a && b`: each part on its own
            if word == "&&":
                segments.append(current)
                current = []
            else:
                current.append(word)
        segments.append(current)
        for seg in segments:
            if seg and seg[0].endswith("refilled-hf"):
                call = seg[1:]
            elif "refilled_hf.cli" in seg:
                call = seg[seg.index("refilled_hf.cli") + 1 :]
            else:
                continue
            if "..." not in call:
                found.append((call[0], call[1:]))
    return found


CALLS = [(path, command, argv) for path in DOCS for command, argv in documented_commands(path)]


def test_the_docs_show_every_command_that_trains_or_measures():
    shown = {command for _, command, _ in CALLS}
    assert {"train-teacher", "distill", "evaluate", "probe-teacher", "quickstart", "push", "compare"} <= shown
    assert any(path.name == "README.md" and "accelerate" not in argv for path, _, argv in CALLS)


@pytest.mark.parametrize(
    "path,command,argv", CALLS, ids=[f"{p.relative_to(ROOT)}:{c}:{i}" for i, (p, c, _) in enumerate(CALLS)]
)
def test_documented_command_parses(path, command, argv, monkeypatch):
    assert command in COMMANDS, f"{path.name} shows an unknown command {command!r}"
    monkeypatch.chdir(ROOT)  # recipe paths are relative to the repository
    parsed = parse_command(command, argv)
    # every flag the docs pass reached a field (none was swallowed as another's value)
    given = {word[2:].split("=")[0].replace("-", "_") for word in argv if word.startswith("--")} - {"config"}
    fields = {name for args in parsed for name in vars(args)}
    assert given <= fields, given - fields


def test_losses_demo_refuses_arguments_it_has_no_use_for(capsys):
    from refilled_hf.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse's exit, as for any command's bad flag
        main(["losses-demo", "--batch", "3"])  # it ran, ignoring them, before
    assert exit_.value.code == 2
    assert "unrecognized arguments: --batch 3" in capsys.readouterr().err


BENCHMARKS = ROOT / "benchmarks"


def documented_benchmark_calls() -> list[tuple[str, list[str]]]:
    """``(script, argv)`` of every ``python benchmarks/<script>.py ...`` the READMEs show in
    inline code, and every script call of ``benchmarks/gpu_session.sh`` (its arguments as
    written there; a shell variable stands for a value)."""
    calls = []
    for path in (ROOT / "README.md", BENCHMARKS / "README.md"):
        for code in re.findall(r"`(python3? benchmarks/[^`]+)`", path.read_text()):
            for part in " ".join(code.split()).split("&&"):
                words = shlex.split(part)
                calls.append((Path(words[1]).name, words[2:]))
    session = (BENCHMARKS / "gpu_session.sh").read_text().replace("\\\n", " ")
    for line in session.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] in (["step"], ["micro"]):
            script = "throughput.py" if words[0] == "step" else words[3]
            args = words[3:] if words[0] == "step" else words[4:]
            # $BF16 / $SMALL_RUN stand for a flag; "$@" for the caller's own
            args = [{"$BF16": "--bf16", "$SMALL_RUN": "--small_run"}.get(a, a) for a in args if a != "$@"]
            calls.append((script, args))
    return calls


class _Parsed(Exception):
    """Raised instead of running the benchmark, once its arguments parsed."""


BENCHMARK_CALLS = documented_benchmark_calls()


def test_the_benchmark_docs_show_their_scripts():
    scripts = {script for script, _ in BENCHMARK_CALLS}
    assert {"throughput.py", "cifar100.py", "losses.py", "teacher_forward.py"} <= scripts


@pytest.mark.parametrize("script,argv", BENCHMARK_CALLS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(BENCHMARK_CALLS)])
def test_documented_benchmark_call_parses(script, argv, monkeypatch):
    """The script's own argparse parser accepts the documented arguments (the run itself is
    stopped right after parsing)."""
    import argparse
    import runpy

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)  # exits 2 on an unknown or malformed argument
        raise _Parsed

    assert (BENCHMARKS / script).is_file(), f"documented script benchmarks/{script} does not exist"
    if "argparse" not in (BENCHMARKS / script).read_text():  # it takes no arguments (and is not run here)
        assert argv == [], f"benchmarks/{script} takes no arguments"
        return
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr("sys.argv", [script, *argv])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(_Parsed):
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")


def python_block(path: Path, containing: str) -> str:
    """The one ```python block of ``path`` that contains ``containing``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S) if containing in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks of {path.name} contain {containing!r}"
    return blocks[0]


def test_the_readme_trainer_example_runs_both_stages_each_in_its_own_folder(tmp_path, monkeypatch, capsys):
    """The README's stage-by-stage `RefilledTrainer` example, as written but for its epochs,
    on a generated image folder and an exported random teacher on other classes."""
    import torch
    from helpers import write_image_dataset, write_random_teacher
    from safetensors.torch import load_file

    write_image_dataset(tmp_path / "my_images", size=32)
    write_random_teacher(tmp_path / "runs" / "teacher" / "model", label_names=["a", "b", "c", "d", "e"])
    monkeypatch.chdir(tmp_path)
    code = python_block(ROOT / "README.md", "RefilledTrainer(")
    short = code.replace(
        "stage1_epochs=200, stage2_epochs=200",
        "stage1_epochs=2, stage2_epochs=2, per_device_train_batch_size=16, use_cpu=True, disable_tqdm=True",
    )
    assert short != code, "the README example no longer sets stage1_epochs=200, stage2_epochs=200"
    namespace: dict = {}
    exec(compile(short, "README.md", "exec"), namespace)
    printed = float(capsys.readouterr().out.strip().splitlines()[-1])

    runs = tmp_path / "runs" / "mine"
    assert sorted(p.name for p in runs.iterdir()) == ["model", "stage1", "stage2"]
    for stage, metric in (("stage1", "eval_ncm_top1"), ("stage2", "eval_top1")):
        checkpoints = sorted((runs / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        assert checkpoints, f"{stage} wrote no checkpoint"
        state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
        assert state["epoch"] == 2 and any(metric in entry for entry in state["log_history"])
    # the printed test top-1 is the student's accuracy on every test image, counted here by hand
    student, test = namespace["student"], namespace["test"]
    student.eval()
    rows = [test[i] for i in range(len(test))]
    with torch.no_grad():
        logits = student(torch.stack([row["pixel_values"] for row in rows]))
    labels = torch.tensor([row["labels"] for row in rows])
    assert len(rows) == 36
    assert printed == pytest.approx(100.0 * (logits.argmax(1) == labels).float().mean().item())
    # the teacher is the exported one, weights and all (timm loads them only with pretrained=True)
    exported = load_file(str(tmp_path / "runs" / "teacher" / "model" / "model.safetensors"))
    teacher_state = namespace["teacher"].state_dict()
    assert all(torch.equal(teacher_state[name], value) for name, value in exported.items())
    # the saved student loads in timm with the data set's class names and the same outputs
    import timm

    saved = timm.create_model("local-dir:runs/mine/model", pretrained=True).eval()
    assert saved.pretrained_cfg["label_names"] == ["red", "green", "blue", "yellow", "cyan", "magenta"]
    with torch.no_grad():
        assert torch.equal(saved(rows[0]["pixel_values"][None]), student(rows[0]["pixel_values"][None]))


def test_the_readme_run_distillation_example_runs_and_prints_what_it_names(tmp_path, monkeypatch, capsys):
    """The README's `run_distillation` example, on generated data: its config as written,
    but for the data (CIFAR-100 from the Hub, here a generated parquet folder), its class
    selection and a short schedule; the results keys it prints exist."""
    from helpers import tiny_recipe, write_image_dataset, write_random_teacher

    import refilled_hf

    data = write_image_dataset(tmp_path / "data")
    write_random_teacher(tmp_path / "runs" / "teacher" / "model")
    monkeypatch.chdir(tmp_path)
    code = python_block(ROOT / "README.md", "run_distillation(config)")
    overrides = tiny_recipe(data, tmp_path / "runs" / "refilled", method="refilled", shots_per_class=6)
    overrides = {k: v for k, v in overrides.items() if k not in ("student", "output_dir", "teacher_classes")}
    written = {}

    def config(**fields):
        written.update(fields)
        return refilled_hf.RefilledConfig(**{**fields, **overrides})

    namespace = {"__builtins__": __builtins__}
    exec(compile(code.replace("from refilled_hf import RefilledConfig, run_distillation\n", ""), "README.md", "exec"),
         {**namespace, "RefilledConfig": config, "run_distillation": refilled_hf.run_distillation})  # fmt: skip
    assert written["teacher"] == "local-dir:runs/teacher/model" and written["output_dir"] == "runs/refilled"
    top1, ncm = (float(v) for v in capsys.readouterr().out.strip().splitlines()[-1].split())
    results = json.loads((tmp_path / "runs" / "refilled" / "results.json").read_text())
    assert (top1, ncm) == (results["final"]["test_top1"], results["stage1"]["test_ncm_top1"])
