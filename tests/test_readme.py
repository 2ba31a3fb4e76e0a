"""The README's setup commands and CI agree: `.ci/run` installs what the README's test command
installs, in the same order (torch first), and ends with the README's test command verbatim."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _test_command() -> str:
    m = re.search(r"The \*\*test command\*\* is `([^`]+)`", (ROOT / "README.md").read_text())
    assert m, "README must name its test command"
    return m.group(1)


def _ci_commands() -> list[str]:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith(("#", "set ", "cd ", "export "))]


def test_ci_ends_with_the_readme_test_command():
    assert _ci_commands()[-1] == _test_command()


def test_readme_test_setup_matches_ci_steps():
    setup = next(b for b in _readme_bash_blocks() if b.strip().endswith(_test_command()))
    steps = [s.strip() for s in setup.strip().split("&&")]
    ci = _ci_commands()
    assert steps[0] == "pip install torch==2.13.0" and ci[0] == 'python -m pip install "torch==2.13.0"'
    # the package with its test extra and the engines, torch pinned again so nothing can upgrade it
    assert any('torch==2.13.0 -e ".[test,engines]"' in s for s in steps)
    assert any('"torch==2.13.0" -e ".[test,engines]"' in c for c in ci)
    # llama-quantize (for the type-selection tests) is built by both
    assert any("tools/build_llama_tools.sh" in s for s in steps)
    assert any("tools/build_llama_tools.sh" in c for c in ci)


def test_main_job_command_runs_quantize_and_verify_on_a_real_model():
    main = _readme_bash_blocks()[0]
    assert "lfq-export quantize" in main and "lfq-export verify" in main
    assert "../shared/assets/models/smollm2-135m-instruct-q4_1" in main


def test_every_cli_command_has_help():
    for cmd in ("quantize", "eval", "info", "export", "verify", "schemes"):
        r = subprocess.run([sys.executable, "-m", "lfq_export.cli", cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage:" in r.stdout, cmd
        description = r.stdout.split("\n\n")[1]  # the paragraph after the usage line says what it does
        assert not description.startswith(("positional", "options")) and len(description.split()) >= 6, cmd
