"""The world's word-level tokenizer, built offline with ``tokenizers`` and saved as a Hugging Face
``PreTrainedTokenizerFast`` (placeholders ``<image>``, ``<audio>``, ``<video>``, ``<point>`` are
special tokens, never split)."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .concepts import PLACEHOLDERS, vocabulary


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :func:`vocabulary`; prepends ``<s>``; splits on whitespace and
    punctuation; decodes by joining words with spaces."""
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=list(PLACEHOLDERS.values()))
    fast.padding_side = "right"
    return fast


def save_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    tok = build_tokenizer()
    tok.save_pretrained(str(folder))
    return tok


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    folder = Path(folder)
    if not (folder / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return PreTrainedTokenizerFast.from_pretrained(str(folder))
