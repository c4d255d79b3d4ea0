"""A character-level tokenizer built in code (no downloads), as a transformers fast tokenizer so that it
works everywhere an HF tokenizer does: ``generate``, ``save_pretrained``, chat-free prompting; and
``load_tokenizer`` for a directory or a Hub id."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3, in this order
DEFAULT_CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-=*/.,:;?!()"


def build_char_tokenizer(chars: str = DEFAULT_CHARS, *, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """One token per character of ``chars`` after the four special tokens (pad=0, bos=1, eos=2, unk=3).

    Text is split into single characters; unknown characters map to ``<unk>``. ``add_special_tokens``
    prepends nothing: prompts start with whatever the caller puts there (``tok.bos_token`` if wanted)."""
    if len(set(chars)) != len(chars):
        raise ValueError(f"chars must not repeat characters, got {chars!r}")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        padding_side="left",
    )


def load_tokenizer(name: str, what: str = "tokenizer"):
    """``AutoTokenizer.from_pretrained(name)`` for a local directory or a Hub id (cache and ``HF_HUB_OFFLINE``
    honoured), with one clear line when it cannot be found. A tokenizer without a pad token pads with EOS
    (generation batches need one)."""
    from transformers import AutoTokenizer

    from .models import load_pretrained

    tok = load_pretrained(AutoTokenizer.from_pretrained, name, what)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
