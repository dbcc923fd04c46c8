"""The demo model: a GPT-J with GPT-J's 28 blocks at a small width, trained on the in-context families.

The embedded model's random weights light up every band but answer nothing, so the
accuracy columns of a scan and the differences between variants mean little with it. This
module trains ``transformers``' own ``GPTJForCausalLM`` on the generator's prompts
(`prompts.generate`, passed in as ``generate``: the two packages do not import each other)
and writes it in the standard layout with fp16 weights; the committed copy in
``workers/demo/`` is ``--model demo``, loaded by the ordinary checkpoint code.

Training is deterministic from the recipe's seed on one CPU thread: the weights' start, the
prompts and their order all come from it. The loss is next-token cross-entropy over every
token of the prompt and its expected answer, the answer's tokens weighted ``answer_weight``
times. The held-out prompts (`held_out`) come from another generator seed and are removed
from the training prompts by text.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import GPTJForCausalLM

from workers.embedded import preset_config
from workers.tokenizer import byte_tokenizer

HELD_OUT_SEED = 1_000_003
"""The generator seed of the held-out prompts; training prompts use the recipe's seed."""
VARIANTS = ("icl", "zero_shot", "shuffled")


@dataclass(frozen=True)
class Recipe:
    """Everything the demo model's weights depend on."""

    n_embd: int = 64
    n_inner: int = 256
    n_head: int = 4
    rotary_dim: int = 16
    n_layer: int = 28
    steps: int = 5000
    batch_tokens: int = 1024
    """Tokens a step (rows x longest row, padding included): one to a dozen prompts. Small
    steps learn more from each token than large ones here."""
    lr: float = 5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    clip: float = 1.0
    answer_weight: float = 8.0
    prompts: int = 30_000
    """Training prompts generated (fewer remain once duplicates and held-out texts are dropped)."""
    shots: tuple[int, ...] = (1, 2, 3)
    """In-context examples: the training prompts are split evenly over these."""
    variants: tuple[str, ...] = ("icl", "icl", "icl", "zero_shot", "shuffled")
    """Dealt round-robin, so a name given twice gets twice the prompts."""
    seed: int = 0


def held_out(generate: Callable[..., list[dict]]) -> list[dict]:
    """The fixed evaluation prompts: 78 a variant (about 6 a family) in the generator's usual
    3-shot format, from ``HELD_OUT_SEED``."""
    return [row for v in VARIANTS for row in generate(78, shots=3, seed=HELD_OUT_SEED, variants=[v])]


def training_prompts(recipe: Recipe, generate: Callable[..., list[dict]]) -> list[dict]:
    """The recipe's prompts, none with the text of a held-out prompt, in a seeded order."""
    banned = {row["text"] for row in held_out(generate)}
    rows = []
    for i, shots in enumerate(recipe.shots):
        variants = [v for v in recipe.variants if shots == recipe.shots[-1] or v != "zero_shot"]
        rows += generate(
            recipe.prompts // len(recipe.shots), shots=shots, seed=recipe.seed * 100 + i, variants=variants
        )
    unique = {row["text"]: row for row in rows if row["text"] not in banned}
    rows = sorted(unique.values(), key=lambda row: row["text"])
    random.Random(recipe.seed).shuffle(rows)
    return rows


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per row, tokenised as a scan tokenises them (no BOS)."""
    out = []
    for start in range(0, len(rows), 1024):  # in chunks: a batch encoding of every row would hold gigabytes
        chunk = rows[start : start + 1024]
        texts = tokenizer([r["text"] for r in chunk], add_special_tokens=False)["input_ids"]
        answers = tokenizer([r["expected"] for r in chunk], add_special_tokens=False)["input_ids"]
        out += zip(texts, answers)
    return out


def batches(items: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices of ``items`` grouped by length so that rows x longest row <= batch_tokens, in a seeded order."""
    length = [len(prompt) + len(answer) for prompt, answer in items]
    groups: list[list[int]] = []
    for start in range(0, len(items), 4096):  # sorted within windows: similar lengths, families still mixed
        window = sorted(range(start, min(start + 4096, len(items))), key=lambda i: -length[i])
        groups.append([window[0]])
        for i in window[1:]:
            if (len(groups[-1]) + 1) * length[groups[-1][0]] <= batch_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
    rng.shuffle(groups)
    return groups


def collate(items: list[tuple[list[int], list[int]]], answer_weight: float):
    """Right-padded ids, attention mask and per-target loss weights ([batch, pos - 1])."""
    width = max(len(p) + len(a) for p, a in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)  # [batch, pos]
    mask = torch.zeros(len(items), width, dtype=torch.long)
    weight = torch.zeros(len(items), width - 1)  # weight of predicting token t + 1 at t
    for row, (prompt, answer) in enumerate(items):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1
        weight[row, : len(prompt) - 1] = 1.0
        weight[row, len(prompt) - 1 : n - 1] = answer_weight
    return ids, mask, weight


def build(recipe: Recipe) -> GPTJForCausalLM:
    """A fresh model from the recipe's seed; residual projections start small for the depth."""
    config = preset_config(
        "tiny",
        n_embd=recipe.n_embd,
        n_inner=recipe.n_inner,
        n_head=recipe.n_head,
        rotary_dim=recipe.rotary_dim,
        n_layer=recipe.n_layer,
    )
    torch.manual_seed(recipe.seed)
    model = GPTJForCausalLM(config)
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.attn.out_proj, block.mlp.fc_out):
                linear.weight.mul_(1 / math.sqrt(2 * recipe.n_layer))
    return model


def train(
    recipe: Recipe,
    generate: Callable[..., list[dict]],
    log: Callable[[str], None] = print,
    every: int = 50,
) -> GPTJForCausalLM:
    """Train a model by ``recipe`` on prompts from ``generate`` (`prompts.generate.generate`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit for bit the same weights from the same seed (on the same CPU and torch)
    try:
        return _train(recipe, generate, log, every)
    finally:
        torch.set_num_threads(threads)


def _train(recipe: Recipe, generate: Callable[..., list[dict]], log: Callable[[str], None], every: int):
    tokenizer = byte_tokenizer()
    items = encode(tokenizer, training_prompts(recipe, generate))
    model = build(recipe).train()
    decay = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(recipe.seed)
    order: list[list[int]] = []
    started, total, answers = time.perf_counter(), 0.0, 0.0
    for step in range(recipe.steps):
        if not order:
            order = batches(items, recipe.batch_tokens, rng)
        ids, mask, weight = collate([items[i] for i in order.pop()], recipe.answer_weight)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * schedule(step, recipe.steps, recipe.warmup)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [batch, pos - 1, vocab]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        loss = (losses * weight).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        total += loss.item()
        answers += losses[weight == recipe.answer_weight].mean().item()  # for the log only
        if every and (step + 1) % every == 0:
            log(
                f"step {step + 1}/{recipe.steps}: loss {total / every:.4f}, on answers {answers / every:.4f} "
                f"({time.perf_counter() - started:.0f} s)"
            )
            total = answers = 0.0
    return model.eval()


def schedule(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def save(model: GPTJForCausalLM, out: Path) -> Path:
    """The ordinary checkpoint layout: config.json, fp16 model.safetensors, tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.dtype = "float16"
    config.save_pretrained(out)
    byte_tokenizer().save_pretrained(out)
    return out


def correct(logits: Callable[[list[int]], torch.Tensor], items: list[tuple[list[int], list[int]]]) -> list[bool]:
    """Whether each answer is the greedy continuation at every one of its tokens, as a scan scores it.

    ``logits`` maps prompt + answer ids to [pos, vocab] logits (teacher forcing): position
    len(prompt) - 1 + k must predict answer token k.
    """
    out = []
    for prompt, answer in items:
        scores = logits(prompt + answer)  # [pos, vocab]
        picked = scores[len(prompt) - 1 : len(prompt) - 1 + len(answer)].argmax(-1)
        out.append(picked.tolist() == answer)
    return out


def accuracy(rows: list[dict], hits: list[bool]) -> dict[str, float]:
    """Share correct per ``family/variant``, per variant (``*/variant``) and overall (``all``)."""
    groups: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits):
        for key in (f"{row['family']}/{row['variant']}", f"*/{row['variant']}", "all"):
            groups[key].append(hit)
    return {key: sum(v) / len(v) for key, v in sorted(groups.items())}


def hf_logits(model: GPTJForCausalLM) -> Callable[[list[int]], torch.Tensor]:
    """The ``logits`` of `correct` from a whole ``GPTJForCausalLM``, one prompt at a time."""

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0].float()

    return run


def make(out: Path, generate: Callable[..., list[dict]], recipe: Recipe = Recipe(), log=print) -> dict[str, float]:
    """Train by ``recipe``, write the model to ``out`` and return the held-out accuracy
    (`accuracy`) of what was written: the fp16 weights, read back."""
    started = time.perf_counter()
    save(train(recipe, generate, log, every=250), out)
    written = GPTJForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rows = held_out(generate)
    hits = correct(hf_logits(written), encode(byte_tokenizer(), rows))
    log(f"trained and written to {out} in {time.perf_counter() - started:.0f} s")
    return accuracy(rows, hits)
