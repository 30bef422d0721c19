"""The README's examples run as written, and CI runs the README's own test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})


def test_quick_start_has_exactly_two_commands_and_ci_runs_the_second():
    section = README.split("## Quick start", 1)[1]
    commands = [ln for ln in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines() if ln.strip()]
    assert len(commands) == 2
    assert "quantize-jax demo" in commands[0] and "pytest" in commands[1]
    assert "sed -n 2p" in (ROOT / ".ci" / "run").read_text()
