"""The bad-input matrix: each case is one line naming the problem and the fix, exit 2, no
traceback, and nothing written (all of them are caught before Ray or any actor starts)."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.cli import main
from workers.embedded import preset_config, write_checkpoint


def jsonl(tmp_path, lines: list[str]) -> str:
    path = tmp_path / f"c{len(list(tmp_path.glob('c*.jsonl')))}.jsonl"  # a new file per call
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    config = preset_config("tiny", n_layer=3, n_embd=32, n_head=2, rotary_dim=4, n_inner=64, n_positions=64)
    return write_checkpoint(config, tmp_path_factory.mktemp("m") / "model")


def case_files(tmp_path, small_model):
    """name -> (scan arguments, expected message)."""
    no_tok = tmp_path / "no_tok"
    shutil.copytree(small_model, no_tok)
    (no_tok / "tokenizer.json").unlink()
    truncated = tmp_path / "truncated"
    shutil.copytree(small_model, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) - 64])
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "c.docx").write_text("x")
    (tmp_path / "blank.txt").write_text("\n  \n")
    good = jsonl(tmp_path, ['{"text": "fine"}'])
    gpt2 = write_checkpoint(preset_config("tiny-gpt2"), tmp_path / "gpt2")
    return {
        "empty corpus": ([jsonl(tmp_path, [])], "holds no prompts: add at least one"),
        "blank-only text file": ([str(tmp_path / "blank.txt")], "holds no prompts"),
        "blank line in JSONL": (
            [jsonl(tmp_path, ['{"text": "a"}', "", '{"text": "b"}'])],
            ".jsonl:2: blank line in JSONL: remove it",
        ),
        "invalid JSON": (
            [jsonl(tmp_path, ['{"text": "a"}', '{"text": "b"', '{"text": "c"}'])],
            ".jsonl:2: invalid JSON",
        ),
        "row without text": (
            [jsonl(tmp_path, ['{"id": "q1", "prompt": "a"}'])],
            "prompt 'q1' has no \"text\" field: rename 'prompt' to \"text\"",
        ),
        "non-UTF-8": (
            [str(tmp_path / "latin1.jsonl")],
            "latin1.jsonl:2: the line is not valid UTF-8: save the file as UTF-8",
        ),
        "duplicate ids": (
            [jsonl(tmp_path, ['{"id": "a", "text": "x"}', '{"id": "a", "text": "y"}'])],
            "id 'a' appears twice: give every prompt a unique id",
        ),
        "empty prompt": ([jsonl(tmp_path, ['{"id": "e", "text": "  "}'])], "prompt 'e' is empty or whitespace only"),
        "longer than the context": (
            [jsonl(tmp_path, [json.dumps({"id": "big", "text": "x" * 100})]), "--model", str(small_model)],
            "prompt 'big' has 100 tokens (+0 answer tokens), more than the model's context of 64: shorten it or pass --truncate",
        ),
        "unknown file type": ([str(tmp_path / "c.docx")], "unknown type '.docx'"),
        "missing file": ([str(tmp_path / "nope.jsonl")], "does not exist"),
        "NaN threshold": ([good, "--high", "nan"], "--high nan is not a finite number"),
        "infinite threshold": ([good, "--low=-inf"], "--low -inf is not a finite number"),
        "high <= low": ([good, "--high", "1", "--low", "1"], "--high 1.0 must be greater than --low 1.0"),
        "red < high": ([good, "--red", "2"], "--red 2.0 must be at least --high 3.0"),
        "zero stages": ([good, "--stages", "0"], "--stages 0 must be at least 1"),
        "negative verify": ([good, "--verify", "-1"], "--verify -1 must be at least 0 (0 turns the check off)"),
        "stages not a number": ([good, "--stages", "two"], "argument --stages: invalid int value: 'two'"),
        "too many stages": (
            [good, "--model", str(small_model), "--stages", "4"],
            "--stages 4 is not possible: the model has 3 layers",
        ),
        "no tokenizer files": ([good, "--model", str(no_tok)], "has no tokenizer files"),
        "truncated safetensors": ([good, "--model", str(truncated)], "is truncated or corrupted"),
        "missing model directory": (
            [good, "--model", str(tmp_path / "nomodel")],
            "does not exist: pass a checkpoint directory",
        ),
        "unknown device": ([good, "--device", "tpu"], "--device 'tpu' is not known: use one of cpu, cuda"),
        "unknown on-error": ([good, "--on-error", "ignore"], "--on-error 'ignore' is not known"),
        "out is a file": ([good, "--out", good], "is a file: give a directory"),
        "overwrite and resume": ([good, "--overwrite", "--resume"], "--overwrite and --resume contradict"),
        "empty out": ([good, "--out", ""], "--out is empty: give an output directory"),
        "empty corpus name": (["", "--out", str(tmp_path / "o2")], "the prompt corpus is empty: give a"),
        "empty model": ([good, "--model", ""], "--model is empty: give a checkpoint directory, or leave --model out"),
        "more than a GPU per stage": (
            [good, "--gpus-per-stage", "1.5"],
            "--gpus-per-stage 1.5 must be in (0, 1]: a stage runs on one GPU",
        ),
        "zero ranks": ([good, "--tensor-parallel", "0"], "--tensor-parallel 0 must be at least 1"),
        "ranks with a direct hand-off": (
            [good, "--tensor-parallel", "2", "--handoff", "direct"],
            "--handoff direct hands the hidden state to one process, but --tensor-parallel 2 stages are several: "
            "use --handoff store",
        ),
        "ranks sharing a GPU": (
            [good, "--tensor-parallel", "2", "--device", "cuda", "--gpus-per-stage", "0.5"],
            "would put two ranks of a group on one GPU, which NCCL refuses: leave --gpus-per-stage at 1",
        ),
        "more ranks than heads": (
            [good, "--tensor-parallel", "3", "--model", str(small_model)],
            "--tensor-parallel 3 is more ranks than this model can be cut into: AutoTP gives each rank at least one of "
            "its 2 attention heads and 64 of its 64 neurons a layer; use at most --tensor-parallel 1",
        ),
        "ranks of a GPT-2": (
            [good, "--tensor-parallel", "2", "--model", str(gpt2)],
            "--tensor-parallel 2: DeepSpeed AutoTP does not shard GPT-2 models (it has no rule for their Conv1D "
            "layers): use --tensor-parallel 1 and spread the model with --stages",
        ),
    }


CASES = [
    "empty corpus",
    "blank-only text file",
    "blank line in JSONL",
    "invalid JSON",
    "row without text",
    "non-UTF-8",
    "duplicate ids",
    "empty prompt",
    "longer than the context",
    "unknown file type",
    "missing file",
    "NaN threshold",
    "infinite threshold",
    "high <= low",
    "red < high",
    "zero stages",
    "negative verify",
    "stages not a number",
    "too many stages",
    "no tokenizer files",
    "truncated safetensors",
    "missing model directory",
    "unknown device",
    "unknown on-error",
    "out is a file",
    "more than a GPU per stage",
    "zero ranks",
    "ranks with a direct hand-off",
    "ranks sharing a GPU",
    "more ranks than heads",
    "ranks of a GPT-2",
    "overwrite and resume",
    "empty out",
    "empty corpus name",
    "empty model",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, tmp_path, small_model, capsys):
    args, message = case_files(tmp_path, small_model)[case]
    out = tmp_path / "out"
    argv = ["scan", *args] if "--out" in args else ["scan", *args, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuroscan: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert not out.exists()  # nothing written


def test_truncate_accepts_the_long_prompt(tmp_path, small_model):
    from neuroscan.messages import Prompt
    from prompts.batching import tokenize
    from workers.checkpoint import load_tokenizer

    [t] = tokenize([Prompt(0, "big", "x" * 100)], load_tokenizer(small_model), 64, truncate=True)
    assert len(t.token_ids) == 64


def test_zero_token_prompt_is_named():
    from neuroscan.errors import UserError
    from neuroscan.messages import Prompt
    from prompts.batching import tokenize

    def drops_everything(texts, add_special_tokens=False, verbose=True):  # a tokenizer that keeps nothing
        return {"input_ids": [[] for _ in texts]}

    with pytest.raises(UserError, match="prompt 'z' tokenises to zero tokens"):
        tokenize([Prompt(0, "z", "\u200b")], drops_everything, 64, truncate=False)


def test_bad_input_leaves_a_finished_run_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text('{"status": "complete"}')
    assert main(["scan", jsonl(tmp_path, ['{"text": oops}']), "--out", str(out), "--overwrite"]) == 2
    assert (out / "manifest.json").read_text() == '{"status": "complete"}'


def test_a_damaged_manifest_is_named_and_only_overwrite_replaces_it(ray_session, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "prompts").mkdir(parents=True)
    (out / "prompts" / "part-00001.parquet").write_bytes(b"PAR1")
    (out / "manifest.json").write_text('{"status": ')  # edited by hand, or a disk that lost it
    for flags in ([], ["--resume"]):
        assert main(["scan", "seed", "--out", str(out), "--quiet", *flags]) == 2
        assert capsys.readouterr().err == (
            f"neuroscan: error: {out / 'manifest.json'} is not valid JSON (Expecting value): something other than "
            "neuroscan wrote it (neuroscan replaces it whole); restore it, or scan again with --overwrite\n"
        )
        assert (out / "manifest.json").read_text() == '{"status": ' and (
            out / "prompts" / "part-00001.parquet"
        ).exists()
    assert main(["scan", "seed", "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_overwrite_deletes_only_what_a_scan_wrote_and_names_what_it_keeps(ray_session, tmp_path, small_model, capsys):
    """A user's own files in the run directory (the corpus, a model, notes) outlive --overwrite;
    a corpus or model inside a directory a scan writes (``prompts/``) is refused, not deleted."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"status": "complete", "parts": []}))
    (out / "prompts").mkdir()
    inside = out / "prompts" / "mine.jsonl"
    inside.write_text('{"text": "fine"}\n')
    assert main(["scan", str(inside), "--out", str(out), "--overwrite", "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"neuroscan: error: --overwrite would delete the prompt corpus {inside}, which is inside --out {out}: "
        "move it out first, or choose another --out\n"
    )
    corpus, model, notes = out / "mine.jsonl", out / "model", out / "notes.md"
    inside.rename(corpus)
    shutil.copytree(small_model, model)
    notes.write_text("# what I saw\n")
    assert main(["scan", str(corpus), "--model", str(model), "--out", str(out), "--overwrite", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"--overwrite kept what no scan wrote in {out}: mine.jsonl, model, notes.md" in err
    assert corpus.read_text() == '{"text": "fine"}\n' and (model / "model.safetensors").exists() and notes.exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_a_checkpoint_without_safetensors_is_refused_with_the_command_that_converts_it(
    ray_session, tmp_path, small_model, capsys
):
    """Older checkpoints on the Hub carry only ``pytorch_model.bin``: the one line gives a command
    that writes ``model.safetensors``, and after it the scan gives the original model's tables."""
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file

    from tests.same_output import assert_same_output

    old = tmp_path / "old"
    shutil.copytree(small_model, old)
    torch.save(load_file(old / "model.safetensors"), old / "pytorch_model.bin")
    (old / "model.safetensors").unlink()
    corpus = jsonl(tmp_path, ['{"text": "apple, banana, cherry"}', '{"text": "2, 4, 6, 8"}'])
    scan = ["scan", corpus, "--max-per-layer", "5", "--quiet"]
    assert main([*scan, "--model", str(old), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"neuroscan: error: model directory {old} has no safetensors weights: convert them once with python -c "
    )
    assert err.count("\n") == 1 and not (tmp_path / "refused").exists()
    command = err.split(" with python -c ", 1)[1].strip()
    assert command[0] == command[-1] == '"'
    subprocess.run([sys.executable, "-c", command[1:-1]], check=True, capture_output=True, timeout=300)
    assert main([*scan, "--model", str(old), "--out", str(tmp_path / "converted")]) == 0
    assert main([*scan, "--model", str(small_model), "--out", str(tmp_path / "original")]) == 0
    assert_same_output(tmp_path / "converted", tmp_path / "original")


def test_tensor_parallel_without_deepspeed_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    good = jsonl(tmp_path, ['{"text": "fine"}'])
    out = tmp_path / "out"
    assert main(["scan", good, "--tensor-parallel", "2", "--out", str(out)]) == 2  # the embedded model: 4 heads
    err = capsys.readouterr().err
    assert err == (
        "neuroscan: error: --tensor-parallel 2 shards each stage with DeepSpeed, which is not installed: "
        "pip install 'neuroscan[deepspeed]' (or use --tensor-parallel 1)\n"
    )
    assert not out.exists()
