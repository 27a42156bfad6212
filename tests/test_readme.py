"""The README's two commands, its example, and CI running the README's test command."""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"
SHELL_LANGUAGES = {"sh", "bash", "shell", "console"}


def _fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block."""
    return re.findall(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.S | re.M)


def _command_lines(body: str) -> list[str]:
    lines = [line.strip() for line in body.splitlines()]
    return [line.removeprefix("$ ") for line in lines if line and not line.startswith("#")]


def readme_commands() -> list[str]:
    blocks = _fenced_blocks(README.read_text(encoding="utf-8"))
    return [
        line for lang, body in blocks if lang in SHELL_LANGUAGES for line in _command_lines(body)
    ]


def ci_command() -> str:
    """The one command of ``.ci/run`` besides shell set-up (``set``, ``cd``)."""
    lines = _command_lines(CI.read_text(encoding="utf-8"))
    commands = [line for line in lines if not line.startswith(("set ", "cd "))]
    assert len(commands) == 1, f".ci/run should run exactly one command, found {commands}"
    return commands[0]


def _demo_and_test_commands() -> tuple[str, str]:
    commands = readme_commands()
    assert len(commands) == 2, f"the README gives exactly two commands, found {commands}"
    demo = [c for c in commands if "batchplate demo" in c]
    tests = [c for c in commands if "pytest" in c]
    assert len(demo) == 1 and len(tests) == 1, commands
    return demo[0], tests[0]


def test_readme_has_exactly_two_commands():
    _demo_and_test_commands()


def test_ci_runs_the_readme_test_command():
    _, tests = _demo_and_test_commands()
    assert shlex.split(tests) == shlex.split(ci_command())
    # Same text too, so a reader can copy either one.
    assert tests == ci_command()


@pytest.mark.parametrize("which", ["demo", "tests"])
def test_commands_set_up_from_scratch_with_constraints(which):
    command = dict(zip(("demo", "tests"), _demo_and_test_commands(), strict=True))[which]
    steps = [shlex.split(step) for step in command.split("&&")]
    assert steps[0][:3] == ["python3", "-m", "venv"], "the command creates its own venv"
    pip = next(step for step in steps if "pip" in Path(step[0]).name and "install" in step)
    assert "-c" in pip and pip[pip.index("-c") + 1] == "constraints.txt", (
        "install with -c constraints.txt, or pip may pull an unpinned (CUDA) torch"
    )


def test_constraints_pin_torch_and_pyro():
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    assert pins["torch"] == "2.13.0"
    assert "pyro-ppl" in pins


def test_readme_example_runs():
    """The before/after example is a working batchplate program."""
    blocks = [
        body
        for lang, body in _fenced_blocks(README.read_text(encoding="utf-8"))
        if lang == "python" and "batch_plate" in body
    ]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert math.isfinite(namespace["loss"])
    # A VAE on 784 binary pixels: the per-datum loss is hundreds of nats, not a batch sum.
    assert 100 < namespace["loss"] < 2000
