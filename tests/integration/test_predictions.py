"""``correct`` (teacher forcing inside the scan) against a plain per-prompt greedy loop."""

from __future__ import annotations

import json
import shutil

import pyarrow.dataset as ds
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPTJForCausalLM

from cluster.driver import run_scan
from neuroscan.config import ScanConfig

LETTERS = "abcde"


@pytest.fixture(scope="module")
def letter_model(other_model, tmp_path_factory):
    """The second tiny model with lm_head biased towards a few ASCII letters, so greedy
    continuations are context-dependent text that round-trips through the tokenizer."""
    path = tmp_path_factory.mktemp("letters") / "model"
    shutil.copytree(other_model, path)
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    file = path / index["lm_head.bias"]
    tensors = load_file(file)
    for c in LETTERS:
        tensors["lm_head.bias"][ord(c)] += 30.0
    save_file(tensors, file, metadata={"format": "pt"})
    return path


def greedy(model, tokenizer, text: str, steps: int) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
    return out


def test_correct_matches_greedy_loop(ray_session, tmp_path, letter_model):
    model = GPTJForCausalLM.from_pretrained(letter_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(letter_model)
    texts = [f"Sequence {i}: " + "xyz" * i for i in range(1, 13)]
    rows = []
    for i, text in enumerate(texts):
        cont = tokenizer.decode(greedy(model, tokenizer, text, 3))
        assert set(cont) <= set(LETTERS)
        wrong = next(c for c in LETTERS if c != cont[1])
        expected = [cont, cont[:1], cont[0] + wrong + cont[2], wrong + cont[1:]][
            i % 4
        ]  # right, right (1 token), 2nd wrong, 1st wrong
        rows.append(
            {"id": f"p{i}", "text": text, "expected": expected, "family": "letters", "variant": ["a", "b"][i % 2]}
        )
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = run_scan(
        ScanConfig(
            prompts=str(corpus),
            out=str(tmp_path / "o"),
            model=str(letter_model),
            stages=2,
            batch_tokens=120,
            quiet=True,
        )
    ).to_dict()
    got = {r["id"]: r for r in ds.dataset(tmp_path / "o" / "prompts").to_table().to_pylist()}
    n_correct = 0
    for row, text in zip(rows, texts):
        answer = tokenizer(row["expected"], add_special_tokens=False)["input_ids"]
        want = greedy(model, tokenizer, text, len(answer)) == answer
        assert got[row["id"]]["correct"] is want, row
        n_correct += want
        probs = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1].softmax(-1)
        top = probs.topk(5)
        assert got[row["id"]]["top_tokens"][0] == tokenizer.decode([int(top.indices[0])])
        assert got[row["id"]]["top_probs"] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert 0 < n_correct < len(rows)
    acc = manifest["summary"]["accuracy"]
    assert acc["family"]["letters"] == {"correct": n_correct, "total": 12, "accuracy": n_correct / 12}
    assert acc["variant"]["a"]["total"] == acc["variant"]["b"]["total"] == 6
