"""The documentation's command lines are ones refilled-hf accepts: every `refilled-hf ...`
(or `accelerate launch ... -m refilled_hf.cli ...`) command in a shell block of the
READMEs parses with the command's own parser, recipes and fields included. A renamed or
removed field then fails here instead of in a user's terminal."""

from __future__ import annotations

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
    assert {"train-teacher", "distill", "evaluate", "probe-teacher", "quickstart", "push"} <= shown
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
