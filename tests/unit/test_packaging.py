"""The installed package: our modules (not the PyPI packages that share their names), its console script, its version."""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["cluster", "workers", "aggregator", "prompts", "bench", "report"])
def test_package_is_this_repository(name):
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == ROOT / name


def test_console_script_points_at_cli():
    [entry] = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "neuroscan"]
    assert entry.value == "cluster.cli:main"


def test_version_and_a_bare_command_are_one_line(capsys):
    from cluster.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"neuroscan {importlib.metadata.version('neuroscan')}\n"
    for argv, prog in (([], "neuroscan"), (["prompts"], "neuroscan prompts")):
        assert main(argv) == 2
        assert (
            capsys.readouterr().err
            == f"neuroscan: error: the following arguments are required: COMMAND (see `{prog} --help`)\n"
        )


def test_aggregator_does_not_need_torch():
    """The aggregator process unpickles StageRows; it should not pay for importing torch."""
    import subprocess
    import sys

    code = "import sys, aggregator.aggregator, neuroscan.messages, prompts.batching; print('torch' in sys.modules)"
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
        == "False"
    )
