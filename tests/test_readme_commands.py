"""Every shell command in README.md's fenced ``bash``/``sh``/``shell`` blocks runs as written.

The commands are read from README.md itself, so a command added to any section is run here
(or accounted for) without touching this file. Each command runs in ``bash`` in a scratch
copy of the repository (one per block, the block's commands in order, as a reader would type
them), with ``TCOD_FAST_TINY=1``: every ``tcod-fast`` command and benchmark script honours it
by running on tiny settings (``tcod_fast/tiny_settings.py``), so nothing is rewritten.

What does not run here, and why (each is a test that reports its reason):

* install steps (``python3 -m venv``, ``. .venv/bin/activate``, ``pip install ...``) of a
  chained command run in CI: ``.ci/run`` performs README's fresh-machine install; the test
  checks that each such step appears in ``.ci/run`` verbatim and runs the rest of the chain;
* ``python -m pytest -q`` is CI's own test command (``.ci/run``); run from inside the suite
  it would run the suite again;
* commands that need what this machine lacks (a CUDA GPU, an optional engine such as vLLM)
  are skipped with a reason naming it, and run where it is present (:data:`NEEDS`); a line
  that only installs such an engine is not run (the suite installs nothing).

``test_readme_commands_are_accounted_for`` prints the list of commands and what happened to
each (``pytest -s``); the ids of ``test_readme_command`` name them too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_SCRIPT = REPO / ".ci" / "run"
FENCE = re.compile(r"^```(\w*)\s*$")
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}

#: Steps of a command that set up an environment; CI's .ci/run performs them.
INSTALL_STEP = re.compile(r"^(python3? -m venv\b|\. \S*activate$|source \S*activate$|pip3? install\b)")
#: Commands CI runs itself and that cannot run inside the test suite.
CI_ONLY = {"python -m pytest -q": "CI's own test command (.ci/run); run from inside the suite it would run the suite again"}


def _cuda() -> bool:
    return torch.cuda.is_available()


def _module(name: str):
    return lambda: importlib.util.find_spec(name) is not None


#: What a command needs beyond the CPU install: (pattern in the command, check, what it is).
#: A command matching a pattern runs only where the check passes, else it is skipped naming
#: the need. Add a line here when README gains a command for another engine or device.
NEEDS = [
    (re.compile(r"--device[ =]cuda|gpu_session\.sh|trainer\.device=cuda|\bnvidia-smi\b"), _cuda, "a CUDA GPU"),
    (re.compile(r"(?<![a-z])vllm(?![a-z])", re.I), _module("vllm"), "vLLM"),
    (re.compile(r"(?<![a-z])trl(?![a-z])", re.I), _module("trl"), "TRL"),
    (re.compile(r"(?<![a-z])verl(?![a-z])", re.I), _module("verl"), "verl"),
    (re.compile(r"env\.name=(scienceworld|alfworld)|make-alfworld-tasks"), _module("alfworld"), "the [envs] extra (real environment engines)"),
]
#: Commands that use environments with real engines also carry the ``envs`` marker.
ENVS_COMMAND = re.compile(r"env\.name=(scienceworld|alfworld|twx-)|make-alfworld-tasks")

#: ``section.key=value``: not a shell word (bash has no dotted variables); such lines list
#: overrides for another tool's command line (verl's Hydra config).
HYDRA_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=\S*$")

#: Seconds one command may take (tiny settings; a torchrun or demo start-up on 2 shared cores).
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Command:
    """One command of a fenced shell block: its text as written and where it is."""

    text: str
    line: int  # README.md line number
    block: int  # index of its block among README's shell blocks

    @property
    def id(self) -> str:
        shown = self.text if len(self.text) <= 70 else self.text[:67] + "..."
        return f"L{self.line}: {shown}"


def _split_top_level(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside quotes; a ``#`` comment ends the text."""
    parts, current, quote, index = [], [], None, 0
    while index < len(text):
        char = text[index]
        if quote:
            current.append(char)
            if char == quote:
                quote = None
        elif char in "'\"":
            quote = char
            current.append(char)
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            break
        elif text.startswith(separator, index):
            parts.append("".join(current))
            current = []
            index += len(separator)
            continue
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def readme_commands(text: str) -> list[Command]:
    """Every command of the fenced shell blocks of ``text``: lines joined at a trailing
    backslash, comments dropped, ``;`` separating commands (``&&`` chains stay one command)."""
    commands: list[Command] = []
    language, block, pending, pending_line = None, -1, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = FENCE.match(line.strip())
        if fence:
            if language is None:
                language = fence.group(1).lower()
                block += 1
            else:
                language = None
            continue
        if language not in SHELL_LANGUAGES:
            continue
        stripped = line.strip()
        if language == "console":
            if not stripped.startswith("$ "):
                continue  # console output
            stripped = stripped[2:]
        if not pending:
            pending_line = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        for part in _split_top_level(pending + stripped, ";"):
            commands.append(Command(part, pending_line, block))
        pending = ""
    return commands


COMMANDS = readme_commands(README.read_text())


def _treatment(command: Command) -> tuple[str, str]:
    """``("run", steps to run)``, ``("ci", reason)`` or ``("skip", reason)``."""
    if command.text in CI_ONLY:
        return "ci", CI_ONLY[command.text]
    if all(HYDRA_OVERRIDE.match(word) for word in command.text.split()):
        return "skip", "a list of dotted key=value overrides (a config fragment for another tool), not a shell command"
    needs = [(available, what) for pattern, available, what in NEEDS if pattern.search(command.text)]
    for available, what in needs:
        if not available():
            return "skip", f"needs {what}, which this machine lacks"
    steps = _split_top_level(command.text, "&&")
    rest = [step for step in steps if not INSTALL_STEP.match(step)]
    if not rest and needs:
        return "skip", f"installs {', '.join(what for _, what in needs)}; the test suite installs nothing"
    if not rest:
        return "ci", ".ci/run performs these install steps (README's fresh-machine install)"
    return "run", " && ".join(rest)


def _needs_something(command: Command) -> bool:
    return any(pattern.search(command.text) for pattern, _, _ in NEEDS)


def _scratch_copy(root: Path) -> Path:
    """The repository's files without the package and the kernel sources (imported from the
    checkout through PYTHONPATH, so the native kernel's build cache is reused) and without
    anything a run or an install leaves behind."""
    ignored = shutil.ignore_patterns(".git", ".venv*", "runs", "tcod-demo", "__pycache__", ".pytest_cache",
                                     ".benchmarks", "*.egg-info", "build", "dist")
    target = root / "repo"
    shutil.copytree(REPO, target, ignore=lambda folder, names: set(ignored(folder, names))
                    | ({"tcod_fast", "csrc"} if Path(folder) == REPO else set()))
    return target


class _BlockSessions:
    """One scratch copy per README block; the block's commands run in README order."""

    def __init__(self, root: Path):
        self.root = root
        self.folders: dict[int, Path] = {}
        self.done: dict[Command, subprocess.CompletedProcess] = {}

    def run(self, command: Command, steps: str) -> subprocess.CompletedProcess:
        for earlier in COMMANDS[: COMMANDS.index(command)]:  # what they made (a run to resume...)
            if earlier.block == command.block:
                kind, earlier_steps = _treatment(earlier)
                if kind == "run" and earlier not in self.done:
                    self._run(earlier, earlier_steps)
        return self.done.get(command) or self._run(command, steps)

    def _run(self, command: Command, steps: str) -> subprocess.CompletedProcess:
        folder = self.folders.get(command.block)
        if folder is None:
            folder = self.folders[command.block] = _scratch_copy(self.root / f"block{command.block}")
        env = {
            **os.environ,
            "TCOD_FAST_TINY": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            # The interpreter running the tests provides python, tcod-fast, torchrun and pytest.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "OMP_NUM_THREADS": "1",
        }
        env.pop("TCOD_FAST_DEBUG", None)
        started = time.perf_counter()
        out = subprocess.run(["bash", "-eo", "pipefail", "-c", steps], cwd=folder, env=env,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
        out.seconds = time.perf_counter() - started
        self.done[command] = out
        return out


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    return _BlockSessions(tmp_path_factory.mktemp("readme"))


def _param(command: Command):
    marks = [pytest.mark.slow]
    if ENVS_COMMAND.search(command.text):
        marks.append(pytest.mark.envs)
    return pytest.param(command, id=command.id, marks=marks)


@pytest.mark.parametrize("command", [_param(c) for c in COMMANDS])
def test_readme_command(command, sessions):
    kind, detail = _treatment(command)
    ci_script = CI_SCRIPT.read_text()
    for step in _split_top_level(command.text, "&&"):
        if not _needs_something(command) and (INSTALL_STEP.match(step) or command.text in CI_ONLY):
            assert step in ci_script, f"README line {command.line}: {step!r} is not in .ci/run, which runs it for README"
    if kind == "ci":
        pytest.skip(f"run by CI, not here: {detail}")
    if kind == "skip":
        pytest.skip(detail)
    out = sessions.run(command, detail)
    assert out.returncode == 0, (
        f"README line {command.line}: {detail!r} exited with {out.returncode}\n"
        f"--- stdout (end)\n{out.stdout[-3000:]}\n--- stderr (end)\n{out.stderr[-3000:]}"
    )
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    print(f"ran README line {command.line} in {out.seconds:.0f} s: {detail}")


def test_readme_commands_are_accounted_for(capsys):
    """The extractor finds README's commands (the known ones at least), and this lists what
    happens to each."""
    texts = [c.text for c in COMMANDS]
    for known in ("python -m pytest -q", "tcod-fast train --output-dir runs/f2b --resume", "tcod-fast demo --quick"):
        assert known in texts, (known, texts)
    assert any(t.startswith("python3 -m venv .venv && ") for t in texts), texts
    with capsys.disabled():
        print(f"\nREADME.md: {len(COMMANDS)} commands")
        for command in COMMANDS:
            kind, detail = _treatment(command)
            what = {"run": "runs here (TCOD_FAST_TINY=1): " + detail, "ci": "CI: " + detail, "skip": "skipped: " + detail}[kind]
            print(f"  line {command.line:>4}  {command.text}\n             -> {what}")


def test_the_extractor_reads_blocks_continuations_and_chains():
    text = "\n".join([
        "prose `tcod-fast not-a-command`",
        "```bash",
        "# a comment",
        "tcod-fast train \\",
        "   --steps 3   # trailing comment",
        "a --x 'q;r' ; b \"#not a comment\"",
        "```",
        "```python",
        "print('not shell')",
        "```",
        "```console",
        "$ tcod-fast bench",
        "output line",
        "```",
    ])
    commands = readme_commands(text)
    assert [(c.text, c.line, c.block) for c in commands] == [
        ("tcod-fast train --steps 3", 4, 0),
        ("a --x 'q;r'", 6, 0),
        ("b \"#not a comment\"", 6, 0),
        ("tcod-fast bench", 12, 2),
    ]
    assert _split_top_level("python3 -m venv .venv && . .venv/bin/activate && tcod-fast demo --out d", "&&") == [
        "python3 -m venv .venv", ". .venv/bin/activate", "tcod-fast demo --out d"]
