"""neuroscan.config: one declaration per flag, one validation path, the CLI built from it."""

from __future__ import annotations

import dataclasses
import math

import pytest

from cluster.cli import build_parser, config_from
from neuroscan import config
from neuroscan.config import BenchConfig, ReportConfig, ScanConfig, Selection, resolve_dtype
from neuroscan.errors import UserError
from prompts.generate import GenerateConfig


@pytest.mark.parametrize(
    "selection, match",
    [
        (Selection(high=0.0, low=0.0), "--high 0.0 must be greater than --low 0.0"),
        (Selection(high=1.0, low=2.0), "must be greater"),
        (Selection(red=2.0), "--red 2.0 must be at least --high"),
        (Selection(high=math.nan), "not a finite number"),
        (Selection(low=-math.inf), "not a finite number"),
        (Selection(max_per_layer=-1), r"--max-per-layer -1 must be at least 0 \(0 keeps all\)"),
    ],
)
def test_selection_validation(selection, match):
    with pytest.raises(UserError, match=match):
        selection.validate()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"device": "tpu"}, "--device 'tpu'"),
        ({"dtype": "int8"}, "--dtype"),
        ({"stages": 0}, "--stages"),
        ({"replicas": 0}, "--replicas"),
        ({"format": "csv"}, "--format"),
        ({"batch_tokens": 0}, "--batch-tokens"),
        ({"handoff": "nccl"}, "--handoff 'nccl' is not known: use one of store, direct"),
        ({"verify": -1}, r"^--verify -1 must be at least 0 \(0 turns the check off\)$"),
    ],
)
def test_scan_config_validation(kwargs, match):
    with pytest.raises(UserError, match=match):
        ScanConfig(prompts="seed", out="x", **kwargs).validate()


@pytest.mark.parametrize(
    "cls, argv",
    [
        (ScanConfig, ["scan", "seed", "--out", "o"]),
        (BenchConfig, ["bench"]),
        (ReportConfig, ["report", "d"]),
        (config.CompareConfig, ["compare", "d", "--by", "family", "--out", "c.parquet"]),
        (config.MakeModelConfig, ["make-model", "--out", "m"]),
        (GenerateConfig, ["prompts", "generate", "--n", "3", "--out", "p.jsonl"]),
    ],
)
def test_every_flag_is_declared_once_and_parsed_into_its_field(cls, argv):
    """The parser's defaults are the fields' defaults, so a config from a bare command equals
    the class's own defaults (with the required values given)."""
    args = build_parser().parse_args(argv)
    built = config_from(cls, args)
    for f, _, _ in config.options(cls):
        if f.default is not dataclasses.MISSING:
            owner = (
                built.selection
                if f.name in {x.name for x in dataclasses.fields(Selection)} and cls is ScanConfig
                else built
            )
            assert getattr(owner, f.name) == f.default, f.name


def test_help_lists_choices_and_defaults(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["scan", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device {cpu,cuda}" in text and "--on-error {stop,skip}" in text and "--handoff {store,direct}" in text
    assert "--dtype {auto,float32,float16,bfloat16}" in text and "(default 3.0)" in text
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    assert "scan_2stage_direct" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["prompts", "generate", "--help"])
    assert "countdown" in capsys.readouterr().out


def test_a_list_flag_checks_each_item():
    args = build_parser().parse_args(["bench", "--modes", "bare,scan"])
    assert config_from(BenchConfig, args).modes == ("bare", "scan")
    with pytest.raises(UserError, match="--modes 'fast' is not known: use one of bare, "):
        config_from(BenchConfig, build_parser().parse_args(["bench", "--modes", "bare,fast"]))


def test_dtype_auto_means_the_same_for_scan_and_bench():
    assert resolve_dtype("auto", "cpu", "float16") == "float32"
    assert resolve_dtype("auto", "cuda", "bfloat16") == "bfloat16"
    assert resolve_dtype("auto", "cuda", "torch.float16") == "float16"
    assert resolve_dtype("auto", "cuda", None) == "float16"
    assert resolve_dtype("float32", "cuda", "float16") == "float32"


def test_the_cache_directory_is_neuroscan_cache_everywhere(monkeypatch, tmp_path):
    from workers.embedded import embedded_model_path

    monkeypatch.setenv("NEUROSCAN_CACHE", str(tmp_path))
    assert BenchConfig().cache_path == tmp_path / "bench"
    assert embedded_model_path().parent == tmp_path / "models"
    assert BenchConfig(cache="/elsewhere").cache_path.as_posix() == "/elsewhere"


def test_report_flags_are_checked_by_the_same_path():
    with pytest.raises(UserError, match=r"^--strips -1 must be at least 0 \(0: every kept neuron\)$"):
        ReportConfig(dir="d", strips=-1).validate()
    with pytest.raises(UserError, match="--port 70000 is not a port number"):
        ReportConfig(dir="d", port=70000).validate()
    assert math.isfinite(Selection().high)
