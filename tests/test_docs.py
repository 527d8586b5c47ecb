"""Every command the docs give runs as written, once `make demo` has run (issue #26).

The commands are the lines of the ```sh blocks of README.md and docs/*.md: one command a line, a
line ending in a backslash continued on the next. A line that starts with `#` is a comment, and a
command whose comment says `# needs ` (Meta's weights, Ollama, a terminal, a second machine, ...)
is left out: it cannot run here. Each of the others runs as its own test, with `bash -c` in the
repository root and the caller's HOME (where `make demo` put SmolLM2), as a reader would paste it.
"""

import subprocess

import pytest

from helpers import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NEEDS = "# needs "


def sh_commands(text: str) -> list[tuple[int, str]]:
    """[(line number, command)] of the ```sh blocks of a markdown text, continuation lines joined."""
    commands, fence, pending, first = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None  # opening: its language; closing
            continue
        if fence != "sh":
            continue
        # Kept with its backslash and newline: bash joins them, inside quotes too, as it would pasted.
        pending, first = (pending + "\n" + line, first) if pending else (line, number)
        if line.endswith("\\"):
            continue
        command, pending = pending.strip(), ""
        if command and not command.startswith("#") and NEEDS not in command:
            commands.append((first, command))
    return commands


COMMANDS = [(f"{path.relative_to(REPO)}:{number}", command)
            for path in DOCS for number, command in sh_commands(path.read_text())]


def test_the_extractor():
    text = "\n".join([
        "```sh",
        "# a comment",
        "make demo",
        ".venv/bin/python run_inference.py --model-dir DIR \\",
        "  --max-new-tokens 8   # short",
        "make chat   # needs a terminal",
        "",
        "```",
        "```",
        "not a command: a plain block",
        "```",
        "```python",
        "import explore",
        "```",
        "```sh",
        "echo 'in a second sh block'",
        "```",
    ])
    assert sh_commands(text) == [(3, "make demo"),
                                 (4, ".venv/bin/python run_inference.py --model-dir DIR \\\n  --max-new-tokens 8   # short"),
                                 (16, "echo 'in a second sh block'")]


def test_the_docs_give_commands():
    # A broken extractor would find nothing, and zero parametrized tests pass silently.
    assert len(COMMANDS) >= 10, COMMANDS
    assert any(command == "make demo" for _, command in COMMANDS)


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_command_runs_as_written(command):
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL)  # never waits for a person
    assert result.returncode == 0, f"exit status {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stdout.strip() or result.stderr.strip(), "printed nothing"
