"""cluster.cli: what the command prints when an actor raises."""

from __future__ import annotations

from neuroscan.errors import UserError


def test_cli_prints_only_the_cause_of_an_error_raised_in_an_actor(capsys, monkeypatch):
    import ray.exceptions

    import cluster.cli as cli

    def fail(args):
        raise ray.exceptions.RayTaskError(
            "add", "Traceback (most recent call last):\n  ...", UserError("writing part 2 failed: rerun with --resume")
        ).as_instanceof_cause()

    monkeypatch.setitem(cli.COMMANDS, "scan", fail)
    assert cli.main(["scan", "seed", "--out", "x"]) == 2
    assert capsys.readouterr().err == "neuroscan: error: writing part 2 failed: rerun with --resume\n"
