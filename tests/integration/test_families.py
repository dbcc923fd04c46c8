"""Every model family a scan takes, proven against transformers' own model of that family.

For each family's tiny random checkpoint (`neuroscan.config.MODEL_PRESETS` "tiny-*", written
with the family's own transformers classes): each stage reads only its own tensors, stages
chained give the plain model's activations and logits, the fused reduction equals the eager one
on the family's activations, and whole scans with 1-3 stages and 2 replicas give the rows of a
plain per-prompt forward pass (tests/reference.py), bands and the gated MLP's up values included.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from cluster.cli import main
from cluster.driver import run_scan
from neuroscan.config import MODEL_PRESETS, ScanConfig, Selection
from tests.conftest import CORPUS
from tests.reference import assert_scan_matches, reference_scan
from tests.triton_cpu import needs_triton
from workers.checkpoint import check_checkpoint, load_config, tensor_files
from workers.embedded import preset_config, write_checkpoint
from workers.families import FAMILIES, d_mlp, family, tensor_shapes
from workers.reduce import reduce_layer
from workers.shard import ShardSpec, load_stage

PRESETS = ("tiny-neox", "tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gpt2")
TEXTS = [row["text"] for row in CORPUS]


@pytest.fixture(scope="module", params=PRESETS)
def family_model(request, tmp_path_factory):
    """The family's tiny checkpoint, in several safetensors shards with an index."""
    out = tmp_path_factory.mktemp(request.param) / "model"
    return write_checkpoint(preset_config(request.param), out, seed=3, shard_bytes=60_000)


@pytest.fixture(scope="module")
def family_reference(family_model):
    return reference_scan(family_model, TEXTS)


def _plain(path, ids: torch.Tensor):
    """transformers' own causal LM of the checkpoint: each block's neuron activations (what
    enters its MLP output projection), the gated MLP's up outputs, and the logits."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fam = family(model.config)
    acts, ups = [], []
    blocks = model.get_submodule(fam.prefix + fam.blocks)
    for block in blocks:
        block.get_submodule(fam.down).register_forward_pre_hook(lambda m, i: acts.append(i[0]))
        if fam.up:
            block.get_submodule(fam.up).register_forward_hook(lambda m, i, o: ups.append(o))
    with torch.no_grad():
        logits = model(ids).logits
    return acts, ups, logits


def test_the_checkpoint_is_its_family_and_lights_every_band(family_model):
    check_checkpoint(family_model)
    config = load_config(family_model)
    assert type(config).__name__ == FAMILIES[config.model_type].config_class
    assert json.loads((family_model / "model.safetensors.index.json").read_text())["weight_map"]
    acts, _, _ = _plain(family_model, torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0)))
    a = torch.cat(acts)
    shares = [(a > 3.5).float().mean(), ((a > 3) & (a <= 3.5)).float().mean(), (a < 0).float().mean()]
    assert all(s > 0.002 for s in shares), shares  # red, orange and blue all occur


def test_each_stage_reads_only_its_own_tensors(family_model, read_log):
    config = load_config(family_model)
    fam = family(config)
    n = config.num_hidden_layers
    stored = set(tensor_files(family_model))
    seen = []
    for start, stop in [(0, 2), (2, 3), (3, n)]:
        read_log.clear()
        load_stage(str(family_model), config, ShardSpec(start, stop, n), "cpu", torch.float32)
        assert len(read_log) == len(set(read_log))  # nothing read twice
        block = f"{fam.prefix}{fam.blocks}."
        layers = {int(name.removeprefix(block).split(".")[0]) for name in read_log if name.startswith(block)}
        assert layers == set(range(start, stop))
        assert (f"{fam.prefix}{fam.embed}.weight" in read_log) == (
            start == 0 or (stop == n and config.tie_word_embeddings)
        )
        seen += read_log
    assert set(seen) == stored  # together the stages read the whole checkpoint
    tied = [name for name in set(seen) if seen.count(name) > 1]
    assert tied == ([f"{fam.prefix}{fam.embed}.weight"] if config.tie_word_embeddings else [])


def test_stages_chained_give_the_plain_models_activations_and_logits(family_model):
    config = load_config(family_model)
    n = config.num_hidden_layers
    ids = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    acts, ups, logits = _plain(family_model, ids)
    for bounds in ([(0, n)], [(0, 1), (1, 4), (4, n)]):
        mine, my_ups, x = [], [], ids
        for start, stop in bounds:
            stage = load_stage(str(family_model), config, ShardSpec(start, stop, n), "cpu", torch.float32)
            for block in stage.blocks:
                stage.neurons(block).register_forward_pre_hook(lambda m, i, mine=mine: mine.append(i[0]))
                if stage.family.up:
                    block.get_submodule(stage.family.up).register_forward_hook(
                        lambda m, i, o, ups=my_ups: ups.append(o)
                    )
            with torch.no_grad():
                x = stage(x, None, torch.arange(33)[None].expand(2, 33))
        with torch.no_grad():
            my_logits = stage.lm_head(x)
        assert len(mine) == n and mine[0].shape[-1] == d_mlp(config)
        for theirs, ours in zip(acts + ups, mine + my_ups):  # GPT-2's GELU is one kernel here: rounding only
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(my_logits, logits, rtol=1e-4, atol=1e-4)


@needs_triton
def test_the_fused_reduction_equals_the_eager_one_on_the_familys_activations(family_model):
    acts, ups, _ = _plain(family_model, torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(2)))
    n_tokens = torch.tensor([40, 17, 1])
    for layer in (0, len(acts) - 1):
        up = ups[layer] if ups else None
        for sel in (Selection(), Selection(high=1.0, low=-0.5, red=2.0, max_per_layer=9)):
            eager = reduce_layer(acts[layer], n_tokens, sel, up=up)
            fused = reduce_layer(acts[layer], n_tokens, sel, fused=True, up=up)
            assert eager.keys() == fused.keys() and ("up_at_max" in eager) == (up is not None)
            for name in eager:
                assert torch.equal(eager[name], fused[name]), name


@pytest.mark.parametrize("stages, replicas, batch_tokens", [(1, 1, 8192), (3, 1, 300), (2, 2, 700)])
def test_scans_match_per_prompt_forward(
    ray_session, tmp_path, corpus, family_model, family_reference, stages, replicas, batch_tokens
):
    cfg = ScanConfig(
        prompts=str(corpus),
        out=str(tmp_path / "out"),
        model=str(family_model),
        stages=stages,
        replicas=replicas,
        batch_tokens=batch_tokens,
        quiet=True,
    )
    manifest = run_scan(cfg)
    assert manifest.status == "complete" and manifest.model.architecture == load_config(family_model).model_type
    checked = assert_scan_matches(tmp_path / "out", family_reference, Selection())
    assert checked == manifest.totals.activation_rows > 0


def test_an_unsupported_family_is_one_line_naming_the_supported_ones(tmp_path, family_model, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in family_model.iterdir():
        (model / f.name).symlink_to(f)
    (model / "config.json").unlink()
    config = json.loads((family_model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    assert main(["scan", "seed", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a 'falcon' model, which neuroscan does not scan" in err
    assert all(model_type in err for model_type in FAMILIES)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "preset, billions, layers, neurons",
    [
        ("gptj-6b", 6.05, 28, 16384),
        ("pythia-6.9b", 6.86, 32, 16384),
        ("llama-3-8b", 8.03, 32, 14336),
        ("gpt2-xl", 1.56, 48, 6400),
    ],
)
def test_the_benchmark_presets_have_the_real_models_shapes(preset, billions, layers, neurons):
    config = preset_config(preset)
    assert config.model_type == MODEL_PRESETS[preset]["model_type"]
    shapes = tensor_shapes(config, head=not config.tie_word_embeddings)
    assert math.isclose(sum(math.prod(s) for s in shapes.values()) / 1e9, billions, abs_tol=0.01)
    assert (config.num_hidden_layers, d_mlp(config)) == (layers, neurons)


def test_the_memory_check_counts_what_a_stage_holds(family_model):
    """The footprint's weights are the bytes of the parameters a loaded stage holds, a tied
    head's copy of the embedding included, for every stage of a split."""
    from workers.footprint import footprint

    config = load_config(family_model)
    n = config.num_hidden_layers
    for start, stop in [(0, 2), (2, n), (0, n)]:
        shard = ShardSpec(start, stop, n)
        need = footprint(str(family_model), config, shard, torch.float16, "cpu")
        stage = load_stage(str(family_model), config, shard, "cpu", torch.float16)
        assert need.weights == sum(p.numel() * p.element_size() for p in stage.parameters())
        params = dict(stage.named_parameters())
        read = stage.checkpoint_names(set(tensor_files(family_model)))  # a tied tensor is read once
        assert need.reading == sum(params[names[0]].numel() * 4 for names in read.values())  # float32, held at load
        assert need.tokens == 2048


def test_a_gpt2_checkpoint_of_the_first_releases_loads_as_a_current_one(tmp_path):
    """openai-community/gpt2 stores its tensors without ``transformer.`` and no head (tied to
    ``wte``): each stage reads the same weights from it as from a current checkpoint."""
    from safetensors.torch import load_file, save_file

    current = write_checkpoint(preset_config("tiny-gpt2"), tmp_path / "current")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in current.iterdir():
        if f.suffix != ".safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    tensors = load_file(current / "model.safetensors")
    assert "lm_head.weight" not in tensors
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, legacy / "model.safetensors")
    check_checkpoint(legacy)
    config = load_config(legacy)
    n = config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(4))
    outs = []
    for path in (current, legacy):
        x = ids
        for start, stop in [(0, 2), (2, n)]:
            stage = load_stage(str(path), config, ShardSpec(start, stop, n), "cpu", torch.float32)
            with torch.no_grad():
                x = stage(x, None, torch.arange(20)[None])
        with torch.no_grad():
            outs.append(stage.lm_head(x))
    assert torch.equal(outs[0], outs[1])


def test_key_value_heads_that_do_not_divide_the_heads_are_one_line(tmp_path, capsys):
    model = write_checkpoint(preset_config("tiny-llama"), tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    assert main(["scan", "seed", "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_attention_heads 4 is not a multiple of num_key_value_heads 3" in err


@pytest.mark.parametrize("preset", PRESETS)
def test_a_checkpoint_saved_by_transformers_loads_stage_by_stage(preset, tmp_path):
    """What ``save_pretrained`` writes (transformers' own tensor names, Pythia's head as it
    names it) passes the checks, and its stages chained give its model's logits."""
    from workers.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(preset_config(preset)).eval()
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    check_checkpoint(tmp_path / "m")
    config = load_config(tmp_path / "m")
    n = config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(5))
    x = ids
    for start, stop in [(0, 3), (3, n)]:
        stage = load_stage(str(tmp_path / "m"), config, ShardSpec(start, stop, n), "cpu", torch.float32)
        with torch.no_grad():
            x = stage(x, None, torch.arange(24)[None])
    with torch.no_grad():
        torch.testing.assert_close(stage.lm_head(x), model(ids).logits, rtol=1e-4, atol=1e-4)
