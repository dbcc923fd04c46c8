"""A byte-level tokenizer built in code: 256 byte tokens and ``<|endoftext|>``.

It uses GPT-2's byte-to-unicode alphabet with no merges, so every byte is one token and any
text round-trips. Saved with ``save_pretrained`` it loads through ``AutoTokenizer`` exactly
like GPT-J's own tokenizer, which is the point: the embedded model exercises the real path.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
N_BYTE_TOKENS = 256


def byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """Token id b is byte b (0..255); id 256 is ``<|endoftext|>``. ``bos``: put it before every
    text too, as Llama's and Mistral's tokenizers put their BOS token."""
    alphabet = {b: ch for b, ch in enumerate(_bytes_to_unicode())}
    vocab = {alphabet[b]: b for b in range(N_BYTE_TOKENS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([EOS])
    if bos:
        core.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", pair=f"{EOS} $A $B", special_tokens=[(EOS, N_BYTE_TOKENS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=EOS, eos_token=EOS, unk_token=EOS, model_max_length=2048
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars
