"""The ``refilled-hf`` command line.

Every training command takes ``--config recipe.yaml`` plus command-line overrides of any
:class:`~refilled_hf.config.RefilledConfig` field, and works the same under
``accelerate launch --config_file recipes/accelerate/... -m refilled_hf.cli distill ...``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .config import (
    DEFAULT_DATASET,
    FIELD_USERS,
    INFORMATIONAL_FIELDS,
    INHERITED_FIELDS,
    NONE_WORDS,
    ConfigError,
    RefilledConfig,
    expand_home,
    field_users_text,
    inherited_field_help,
)

COMMANDS = {
    "train-teacher": "train a teacher (any timm model) with cross-entropy on a class selection",
    "distill": "distill a teacher into a student (refilled, or the ce/kd/rkd baselines)",
    "evaluate": "top-1/top-5 and per-class accuracy of a trained model on a split and class selection",
    "probe-teacher": "NCM accuracy of the teacher's embedding on the student's task, before distilling",
    "quickstart": "offline miniature: digits teacher on 0-4, ce vs refilled students on 5-9",
    "push": "push an exported model folder to the Hugging Face Hub",
    "compare": "finished runs side by side: each run, mean ± std over seeds, differences on the same images",
    "losses-demo": "run every loss once on random tensors",
}


@dataclass
class EvaluateArguments:
    """Arguments of ``refilled-hf evaluate`` besides the data fields of RefilledConfig."""

    model: str = field(
        metadata={
            "help": "Model to evaluate: local-dir:<folder>, hf-hub:<repo>, or a timm name with its weights in "
            "--checkpoint (without one, timm's pretrained weights; refused where timm has none)."
        }
    )
    checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Weights for a model given by timm name: a state dict (.safetensors, or .pt loadable with "
            "weights_only), a stage's Trainer checkpoint (<run>/stage2/checkpoint-N/model.safetensors) included. "
            "Stage 1's checkpoints are refused: stage 1 trains the embedding only, its classifier is untrained."
        },
    )
    split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate: test, or validation (carved from the training split, or --validation_split; "
            "for a model exported by refilled-hf, the one it was selected on: its --validation_split, or its "
            "--validation_fraction and data seed, are read from its config.json unless given, and values that give "
            "another split are refused)."
        },
    )

    def __post_init__(self):
        self.model, self.checkpoint = expand_home(self.model), expand_home(self.checkpoint)


@dataclass
class PushArguments:
    """Arguments of ``refilled-hf push <folder> --repo_id <user/name>``."""

    folder: str = field(metadata={"help": "Exported model folder (output_dir/model)."})
    # (the aliases are distill's names for the same settings, so that a user may use either)
    repo_id: str = field(
        metadata={
            "help": "Hub repo to create (if needed) and upload to; the model card uploaded names it in its title "
            "and usage (the folder's own card is not changed).",
            "aliases": ["--hub_model_id", "--hub-model-id"],
        }
    )
    private: bool = field(
        default=False,
        metadata={"help": "Create the repo as private.", "aliases": ["--hub_private_repo", "--hub-private-repo"]},
    )
    token: str | None = field(
        default=None,
        metadata={"help": "Hub token (default: your login / HF_TOKEN).", "aliases": ["--hub_token", "--hub-token"]},
    )

    def __post_init__(self):
        self.folder = expand_home(self.folder)


@dataclass
class CompareArguments:
    """Arguments of ``refilled-hf compare <run> [<run> ...]``."""

    runs: list[str] = field(
        metadata={
            "help": "output_dirs of finished runs (an export's model/ folder stands for its run). Runs that differ "
            "only by their seed (and data placement) form one setting, pooled as mean ± standard deviation; each "
            "setting after the first is also compared with it run by run, on the same images."
        }
    )
    json: bool = field(default=False, metadata={"help": "Print the comparison as JSON (on stdout) instead of tables."})

    def __post_init__(self):
        self.runs = [expand_home(run) for run in self.runs]


@dataclass
class QuickstartArguments:
    """Arguments of ``refilled-hf quickstart``."""

    output_dir: str = field(default="quickstart_outputs", metadata={"help": "Where everything is written."})
    shots_per_class: int = field(default=10, metadata={"help": "Student training images per class."})
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata={"help": "Seeds: one ce and one refilled student each (their training images and training)."},
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an earlier quickstart's outputs."})

    def __post_init__(self):
        self.output_dir = expand_home(self.output_dir)


class CliError(ValueError):
    """A command line or recipe that cannot be parsed (the message says how to fix it)."""


def read_recipe(path: str | Path, dataclass_types: tuple[type, ...]) -> dict[str, Any]:
    """Read a YAML recipe; every key must be a field of one of ``dataclass_types``."""
    path = Path(path)
    if not path.is_file():
        raise CliError(f"Recipe {str(path)!r} not found.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CliError(f"Recipe {str(path)!r} is not readable YAML: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise CliError(f"Recipe {str(path)!r} must be a mapping of field: value.")
    by_name = {f.name: f for cls in dataclass_types for f in fields(cls) if f.init}
    annotations = {name: _annotation(dataclass_types, name) for name in by_name}
    known = set(by_name)
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise CliError(
            f"Recipe {str(path)!r} has keys that are not configuration fields: {', '.join(hints)}. "
            "See `refilled-hf <command> --help` for the fields."
        )
    return {key: _recipe_value(path, key, by_name[key].default, annotations[key], value) for key, value in data.items()}


def _annotation(dataclass_types: tuple[type, ...], name: str) -> str:
    """The field's declared type as written (HfArgumentParser rewrites ``Field.type``)."""
    for cls in dataclass_types:
        for klass in cls.__mro__:
            if name in getattr(klass, "__annotations__", {}):
                return str(klass.__annotations__[name]).lower()
    return ""


#: string fields the command line takes comma-separated, which a recipe may also give as a YAML list
COMMA_LIST_FIELDS = frozenset(
    {"classes", "teacher_classes", "stage2_milestones", "distill_weight_search", "compare_runs"}
)


def _recipe_value(path: Path, name: str, default: Any, type_text: str, value: Any) -> Any:
    """A recipe value as the command line would give it: scalars become strings, so that
    argparse converts and checks them with the field's own type (``stage1_epochs: abc``
    fails as ``--stage1_epochs abc`` would); lists and mappings only where the field takes
    them; null only where the field may be unset."""
    if value is None:
        if default is not None and "none" not in type_text and "optional" not in type_text:
            raise CliError(f"Recipe {str(path)!r}: `{name}` cannot be null; give a value or remove the key.")
        return None
    if isinstance(value, list) and name in COMMA_LIST_FIELDS:
        # YAML's own list spelling (`classes: [apple, bear]`) of a field the command line takes comma-separated
        if any(not isinstance(v, (int, float, str)) or isinstance(v, bool) or "," in str(v) for v in value):
            raise CliError(
                f"Recipe {str(path)!r}: `{name}` lists {str(value)[:80]}: each item must be one number or name "
                "without a comma (a class whose name holds a comma is selected by its id)."
            )
        return ",".join(str(v) for v in value)
    if isinstance(value, (list, dict)):
        kind = "list" if isinstance(value, list) else "dict"
        if kind not in type_text:
            raise CliError(f"Recipe {str(path)!r}: `{name}` takes a single value, got a {kind} ({str(value)[:60]}).")
        return value
    if isinstance(value, (bool, int, float, str)):
        return str(value)
    raise CliError(f"Recipe {str(path)!r}: `{name}` has a value of type {type(value).__name__}: {value!r}.")


#: the commands whose first words are values (see parse_command), as their usage line shows them
POSITIONAL_USAGE = {
    "push": "FOLDER --repo_id REPO_ID [--private true] [--token TOKEN]   (or --folder FOLDER)",
    "compare": "RUN [RUN ...] [--json true]   (or --runs RUN [RUN ...])",
}


#: fields whose default is refilled-hf's None (unset; --dataloader_num_workers: this machine's
#: default): a none word sets them back to it; and --save_total_limit, whose None (keep every
#: checkpoint) a recipe gives as null
UNSETTABLE_FIELDS = frozenset(f.name for f in fields(RefilledConfig) if f.default is None) - {
    f.name for f in fields(TrainingArguments) if f.default is None
} | {"save_total_limit"}


def _or_none(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    """``convert``, except that a none word gives None."""

    def parse(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its errors
    return parse


def parse_config(dataclass_types: tuple[type, ...], argv: list[str], prog: str) -> tuple[Any, ...]:
    """Parse ``--config recipe.yaml`` (defaults) and command-line overrides."""
    parser = HfArgumentParser(dataclass_types, prog=prog)
    if RefilledConfig in dataclass_types:
        command = prog.split()[-1]
        for action in parser._actions:  # argparse keeps its actions there; the help is all this changes
            if _hidden_from_help(action.dest, command):
                action.help = argparse.SUPPRESS
                continue
            action.help = inherited_field_help(action.dest) or action.help
            note = field_users_text(action.dest)
            if note and action.help and note not in action.help:
                action.help = f"{action.help} {note}"
        if command in ("evaluate", "probe-teacher"):
            parser.epilog = (
                "It also accepts the training options of `refilled-hf distill --help`, so that one recipe serves "
                "every command, and warns that it ignores them (the ones refused there are refused here too)."
            )
        elif command == "train-teacher":
            parser.epilog = "The distillation options (`refilled-hf distill --help`) are refused here."
            parser.set_defaults(output_dir="outputs/teacher")  # (distill's default folder is its method's)
        if command == "evaluate":  # a model's own data set, as its own classes, unless told otherwise
            parser.set_defaults(dataset=None)
            action = next(a for a in parser._actions if a.dest == "dataset")
            action.help = (
                f"{action.help} Default: the data set the model records it was trained on (a refilled-hf export's "
                f"config.json; with its columns and splits), else {DEFAULT_DATASET}."
            )
        unset = "`none` unsets an optional field (default: None) that a recipe sets, e.g. `--shots_per_class none`."
        parser.epilog = f"{parser.epilog} {unset}" if parser.epilog else unset
        for action in parser._actions:  # `--shots_per_class none` unsets what a recipe sets (YAML has null)
            if action.dest in UNSETTABLE_FIELDS and action.type is not None:
                action.type = _or_none(action.type)
    usage = POSITIONAL_USAGE.get(prog.split()[-1])
    if usage:  # the words parse_command turns into flags, shown as a user types them
        parser.usage = f"{prog} {usage}"
    parser.add_argument("--config", type=str, default=None, help="YAML recipe; command-line flags override it.")
    if RefilledConfig in dataclass_types:
        _sort_help(parser, prog)
    config_path = _flag_value(argv, "--config")
    if config_path is not None:
        parser.set_defaults(**read_recipe(config_path, dataclass_types))
    # Unknown words first: argparse names a missing required option before them, which hides
    # the mistake (`push --model_dir X` said `--folder` is required, not that --model_dir is unknown).
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        _, rest = parser.parse_known_args(argv)
    finally:
        for action in required:
            action.required = True
    if not rest:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        hints = _close_options(parser, rest)
        raise CliError(f"Unknown arguments: {rest}.{hints} See `{prog} --help`.")
    return tuple(p for p in parsed if isinstance(p, dataclass_types))  # drop the --config namespace


def _close_options(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`` --stage1_milestones: did you mean --stage2_milestones?`` for each unknown flag in
    ``unknown`` that is close to one of the parser's, or nothing."""

    def spelled(option: str) -> str:  # --stage2-milestones and --stage2_milestones are one option
        return "--" + option[2:].replace("-", "_")

    known = sorted({spelled(o) for a in parser._actions for o in a.option_strings if o.startswith("--")})
    hints = []
    for word in unknown:
        flag = word.split("=", 1)[0]
        if not flag.startswith("--"):
            continue
        close = difflib.get_close_matches(spelled(flag), known, n=2, cutoff=0.8)
        if close:
            hints.append(f"{flag}: did you mean {' or '.join(close)}?")
    return "".join(f" {hint}" for hint in hints)


#: the sections of a training command's ``--help``, in order, and which fields each holds
HELP_SECTIONS = {
    "own": "refilled-hf options",
    "honoured": "training options inherited from transformers.TrainingArguments (as refilled-hf reads them)",
    "refused": "inherited options refilled-hf refuses (unless left at their default) or does not read",
}


def _sort_help(parser: argparse.ArgumentParser, prog: str) -> None:
    """Put refilled-hf's own fields (and ``--config``) first in ``--help``, then the inherited
    TrainingArguments fields it honours, then those it refuses or never reads. argparse lists
    a parser's options in the order they were added, which would bury ``--method`` and
    ``--teacher`` under some 100 Trainer options; the usage line names the syntax instead of
    every flag. Parsing is unchanged: only the help's groups are rearranged."""
    required = "".join(
        f"{action.option_strings[0]} {action.metavar or action.dest.upper()} "
        for action in parser._actions
        if action.required
    )
    parser.usage = f"{prog} {required}[--config recipe.yaml] [--field value ...]"
    inherited = {f.name for f in fields(TrainingArguments)}
    sections = {key: parser.add_argument_group(title) for key, title in HELP_SECTIONS.items()}
    options = parser._optionals  # argparse's default group, which HfArgumentParser fills
    for action in list(options._group_actions):
        if action.dest == "help":
            continue
        if action.dest not in inherited:
            key = "own"
        elif INHERITED_FIELDS.get(action.dest) == "honoured" and action.dest not in INFORMATIONAL_FIELDS:
            key = "honoured"
        else:
            key = "refused"
        options._group_actions.remove(action)
        sections[key]._group_actions.append(action)
    own = sections["own"]._group_actions
    own.sort(key=lambda action: action.dest != "config")  # stable: --config first, then the declared order


def _hidden_from_help(name: str, command: str) -> bool:
    """Whether ``refilled-hf <command> --help`` leaves out the field ``name``: a field the
    command never reads (see :data:`~refilled_hf.config.FIELD_USERS`) and, for the commands
    that train nothing, the inherited fields refilled-hf replaces or refuses."""
    if command == "distill":
        return False
    users = FIELD_USERS.get(name)
    if users is not None and command not in users:
        return True
    return command in ("evaluate", "probe-teacher") and (
        INHERITED_FIELDS.get(name, "honoured") != "honoured" or name in INFORMATIONAL_FIELDS
    )


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def resolved_config(config: RefilledConfig) -> dict[str, Any]:
    """See :meth:`RefilledConfig.to_recipe`."""
    return config.to_recipe()


def _stdout_takes_utf8() -> bool:
    return (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"


def print_json(value: Any) -> None:
    """``value`` as JSON on stdout, class names in their own letters (escaped as ``\\u00f6``
    only where stdout cannot take UTF-8)."""
    print(json.dumps(value, indent=2, ensure_ascii=not _stdout_takes_utf8()))


def printed_recipe(config: RefilledConfig, command: str) -> dict[str, Any]:
    """The resolved configuration ``refilled-hf <command>`` prints, a recipe its ``--config``
    reads back: every field for distill (one recipe serves every method), and for
    train-teacher the fields it reads (it refuses the distillation options, and the
    student's would name a model it does not train)."""
    recipe = json.loads(json.dumps(resolved_config(config), default=str))
    if command == "train-teacher":
        recipe = {k: v for k, v in recipe.items() if command in FIELD_USERS.get(k, (command,))}
    return recipe


def _print_config(config: RefilledConfig, command: str) -> None:
    if config.process_index == 0:
        print("Resolved configuration:")
        print(yaml.safe_dump(printed_recipe(config, command), sort_keys=True, allow_unicode=_stdout_takes_utf8()))


def _print_results(results: dict[str, Any]) -> None:
    final = results.get("final", {})
    stage1 = results.get("stage1", {})
    rows = [("method", results["method"]), ("test top-1 (%)", final.get("test_top1"))]
    rows.append(("validation top-1 (%)", final.get("validation_top1")))
    if stage1:
        rows.append(("stage-1 NCM test top-1 (%)", stage1.get("test_ncm_top1")))
    search = results.get("distill_weight_search")
    if search:
        for c in search["candidates"]:
            value = "diverged" if "diverged" in c else c["validation_top1"]
            rows.append((f"  lambda {c['distill_weight']:g} validation (%)", value))
        alone = results.get("student_alone")
        if alone:
            value = "diverged" if "diverged" in alone else alone["validation_top1"]
            trained = (alone.get("train_metrics") or {}).get("epoch")
            cut = trained is not None and trained < alone["epochs"]  # --max_steps stopped it early
            epochs = f"{trained:g} of {alone['epochs']:g}" if cut else f"{alone['epochs']:g}"
            rows.append((f"  student alone ({epochs} ep.) validation (%)", value))
        if search["selected"] is not None:
            rows.append(("lambda (chosen on validation)", f"{search['selected']:g}"))
        if alone:
            exported = "the student alone (cross-entropy)" if alone["exported"] else "REFILLED's pick"
            rows.append(("exported model", exported))
    elif "distill_weight" in results:
        rows.append(("lambda", f"{results['distill_weight']:g}"))
    width = max(30, *(len(name) for name, _ in rows))  # one column of values, however long a label
    for name, value in rows:
        text = f"{value:.2f}" if isinstance(value, float) else "- (not measured)" if value is None else str(value)
        print(f"{name:{width}s} {text}")


# --------------------------------------------------------------------------- commands


#: The argument dataclasses each command parses (losses-demo takes none).
COMMAND_ARGUMENTS: dict[str, tuple[type, ...]] = {
    "train-teacher": (RefilledConfig,),
    "distill": (RefilledConfig,),
    "evaluate": (EvaluateArguments, RefilledConfig),
    "probe-teacher": (RefilledConfig,),
    "quickstart": (QuickstartArguments,),
    "push": (PushArguments,),
    "compare": (CompareArguments,),
    "losses-demo": (),
}


def parse_command(command: str, argv: list[str]) -> tuple[Any, ...]:
    """The arguments ``refilled-hf <command> <argv>`` runs with (one dataclass per entry of
    :data:`COMMAND_ARGUMENTS`); a command line that cannot run is refused here, before any
    work (``push`` also takes the folder as its first word, ``compare`` the runs as its first words)."""
    if command == "push" and argv and not argv[0].startswith("-"):
        argv = ["--folder", argv[0], *argv[1:]]
    if command == "compare" and argv and not argv[0].startswith("-"):
        argv = ["--runs", *argv]
    types = COMMAND_ARGUMENTS[command]
    if not types:  # nothing to parse but --help, and nothing else is accepted
        parser = argparse.ArgumentParser(prog=f"refilled-hf {command}", description=COMMANDS[command])
        parser.parse_args(argv)
        return ()
    return parse_config(types, argv, f"refilled-hf {command}")


def _follow_disable_tqdm(disabled: bool | None) -> None:
    """``--disable_tqdm true`` turns off every progress bar of the command, not only the
    Trainer's: datasets' (reading a data set's files, generating its splits) and
    huggingface_hub's (fetching a model) too, which a job's log would otherwise collect."""
    if disabled:
        import datasets
        from huggingface_hub.utils import disable_progress_bars

        datasets.disable_progress_bars()
        disable_progress_bars()


def cmd_train(argv: list[str], command: str) -> int:
    from .pipeline import run_distillation, run_teacher_training

    (config,) = parse_command(command, argv)
    _follow_disable_tqdm(config.disable_tqdm)
    _print_config(config, command)
    results = (run_teacher_training if command == "train-teacher" else run_distillation)(config)
    if config.process_index == 0:
        _print_results(results)
        print(f"Exported model: {Path(config.output_dir) / 'model'}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    from .evaluation import evaluate_model

    eval_args, config = parse_command("evaluate", argv)
    _follow_disable_tqdm(config.disable_tqdm)
    metrics = evaluate_model(eval_args.model, config, checkpoint=eval_args.checkpoint, split=eval_args.split)
    if config.process_index == 0:
        print_json(metrics)
    return 0


def cmd_probe(argv: list[str]) -> int:
    from .probe import probe_teacher

    (config,) = parse_command("probe-teacher", argv)
    _follow_disable_tqdm(config.disable_tqdm)
    result = probe_teacher(config)
    if config.process_index == 0:
        print(
            f"Teacher {result['teacher']}: nearest-class-mean accuracy {result['probe_ncm_top1']:.1f}% "
            f"(standard error {result['probe_ncm_top1_stderr']:.1f}) on the "
            f"student's validation split ({result['validation_split']}: {result['validation_images']} images"
            + (
                f"; {result['left_out_teacher_training_images']} it trained on left out"
                if result["left_out_teacher_training_images"]
                else ""
            )
            + f"), centres from its "
            f"{result['train_images']} training images ({result['classes']} classes, "
            f"{result['shots_per_class'] or 'all'} per class).",
            file=sys.stderr,  # the words for the reader; stdout holds the JSON alone, as for evaluate
        )
        # what the CIFAR-100 benchmark found (README, "Does it help, and when?")
        print(
            "Compare it with the student trained alone (--method ce, as many epochs as both stages): REFILLED "
            "gained where this probe was above that accuracy and lost where it was far below (on CIFAR-100 at "
            "lambda 10: +2.7 to +4.5 points at 8-14 above, -3.2 at 15-20 below; the default, lambda chosen on "
            "validation between 1 and 10, kept those gains and was -0.2 there).",
            file=sys.stderr,
        )
        print_json(result)
    return 0


def cmd_push(argv: list[str]) -> int:
    from .hub import push_folder

    (args,) = parse_command("push", argv)
    url = push_folder(args.folder, args.repo_id, private=args.private, token=args.token)
    print(f"Pushed {args.folder} to {url}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    from .compare import compare_runs, format_comparison

    (args,) = parse_command("compare", argv)
    comparison = compare_runs(args.runs)
    if args.json:
        print_json(comparison)
    else:
        print(format_comparison(comparison))
    return 0


def cmd_quickstart(argv: list[str]) -> int:
    from .quickstart import QUICKSTART_RECIPES, run_quickstart

    (args,) = parse_command("quickstart", argv)
    _follow_disable_tqdm(QUICKSTART_RECIPES["teacher"]["disable_tqdm"])  # as its runs' recipes say
    run_quickstart(args.output_dir, shots_per_class=args.shots_per_class, seeds=tuple(args.seeds),
                   overwrite=args.overwrite)  # fmt: skip
    return 0


def cmd_losses_demo(argv: list[str]) -> int:
    from .losses import kd_loss, local_classifier_loss, relationship_loss_with_stats, rkd_loss

    parse_command("losses-demo", argv)
    torch.manual_seed(0)
    batch, classes = 128, 10
    student_emb = torch.randn(batch, 64, requires_grad=True)
    teacher_emb = torch.randn(batch, 128)
    labels = torch.randint(0, classes, (batch,))
    for variant in ("tuple", "triplet"):
        loss, stats = relationship_loss_with_stats(student_emb, teacher_emb, labels, variant=variant)
        loss.backward()
        print(
            f"stage 1 ({variant:7s})    {loss.item():10.4f}  {int(stats['tuples'])} tuples, "
            f"{int(stats['triplets'])} triplets"
        )
    centers = torch.nn.functional.normalize(torch.randn(classes, 128), dim=1)
    logits = torch.randn(batch, classes)
    print(f"stage 2 local KL     {local_classifier_loss(logits, teacher_emb, centers, labels).item():10.4f}")
    print(f"KD                   {kd_loss(logits, torch.randn(batch, classes)).item():10.4f}")
    print(f"RKD                  {rkd_loss(student_emb, teacher_emb).item():10.4f}")
    return 0


def version_text() -> str:
    """``refilled-hf 0.1.0 (torch ..., timm ..., transformers ..., ...)``: what a bug report needs."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    libraries = ("torchvision", "timm", "transformers", "accelerate", "datasets", "huggingface_hub")
    versions = ", ".join([f"torch {torch.__version__}"] + [installed(name) for name in libraries])  # torch's build too
    return f"refilled-hf {__version__} ({versions}; Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--version":
        print(version_text())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            close = difflib.get_close_matches(argv[0], list(COMMANDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            print(f"refilled-hf: error: unknown command {argv[0]!r}{hint}", file=sys.stderr)
        print("usage: refilled-hf {" + ",".join(COMMANDS) + "} [--config recipe.yaml] [--field value ...]\n")
        for name, text in COMMANDS.items():
            print(f"  {name:14s} {text}")
        print("\n`refilled-hf <command> --help` lists every field; `refilled-hf --version` the versions.")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for library in ("huggingface_hub", "datasets"):  # they print with their own handlers: not twice
        logging.getLogger(library).propagate = False
    from .backbone import ModelLoadError
    from .data import DataError
    from .hub import HubPushError
    from .pipeline import RunError, RunInterrupted
    from .rundir import DiskFullError, RunDirError

    try:
        if command in ("train-teacher", "distill"):
            return cmd_train(rest, command)
        if command == "evaluate":
            return cmd_evaluate(rest)
        if command == "quickstart":
            return cmd_quickstart(rest)
        if command == "probe-teacher":
            return cmd_probe(rest)
        if command == "push":
            return cmd_push(rest)
        if command == "compare":
            return cmd_compare(rest)
        return cmd_losses_demo(rest)
    except RunInterrupted as err:  # a notice before a kill, or a Ctrl-C: 128 + the signal, as a kill would exit
        if int(os.environ.get("RANK", "0")) == 0:  # every process stopped alike: said once
            print(f"refilled-hf {command}: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except (CliError, ConfigError, DataError, HubPushError, ModelLoadError, RunError, RunDirError) as err:
        print(f"refilled-hf {command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as err:  # e.g. transformers' own checks of TrainingArguments
        if _raised_by_a_tracker(err):
            return _tracker_failed(command, err)
        print(f"refilled-hf {command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"refilled-hf {command}: interrupted.", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError) as err:  # the host's or an accelerator's memory
        where = "on the GPU" if isinstance(err, torch.OutOfMemoryError) else "on the host"
        print(
            f"refilled-hf {command}: error: out of memory {where}; lower --per_device_train_batch_size, "
            "--per_device_eval_batch_size or --image_size.",
            file=sys.stderr,
        )
        return 1
    except DiskFullError as err:  # its message says how to continue
        print(f"refilled-hf {command}: error: {err.strerror}", file=sys.stderr)
        return 1
    except OSError as err:
        print(f"refilled-hf {command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - a bug: one line, the traceback on request
        if os.environ.get("REFILLED_HF_TRACEBACK"):
            raise
        if _raised_by_a_tracker(err):
            return _tracker_failed(command, err)
        print(
            f"refilled-hf {command}: internal error: {_one_line(err)} (set REFILLED_HF_TRACEBACK=1 for the "
            "traceback, and please report it with the output of `refilled-hf --version`).",
            file=sys.stderr,
        )
        return 1
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """Under ``accelerate launch``, tear the process group down before the process exits:
    one that leaves with gloo's or NCCL's threads still alive can abort (SIGABRT) after a
    successful run, and the launcher then reports the whole run as failed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _tracker_failed(command: str, err: BaseException) -> int:
    """The tracker's setup failed (a store, a login, a server), not refilled-hf: say so, and how to go on."""
    print(
        f"refilled-hf {command}: error: the experiment tracker (--report_to) failed: {_one_line(err)}. Fix its "
        "setup as its message says, or pass --report_to none; --resume_from_checkpoint true then continues the run "
        "from its last checkpoint.",
        file=sys.stderr,
    )
    return 1


def _raised_by_a_tracker(err: BaseException) -> bool:
    """Whether ``err`` came through one of transformers' tracker callbacks (W&B, MLflow, ...)."""
    import transformers.integrations

    package = Path(transformers.integrations.__file__).resolve().parent
    frame = err.__traceback__
    while frame is not None:
        if Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(package):
            return True
        frame = frame.tb_next
    return False


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:400]}" if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
