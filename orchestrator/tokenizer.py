"""A byte-level BPE tokenizer trained on the training split (or a bounded sample of it) and saved
with the run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<pad>"
TOKENIZER_FILE = "tokenizer.json"

# The longest run of one kind of character (letters, digits, other symbols, whitespace) that BPE
# sees as one word. The trainer's cost grows with the square of a word's length (a 1 MB line
# without spaces did not finish in 500 s); prose has no runs this long, so its split is GPT-2's.
MAX_RUN = 64
# GPT-2's split, as tokenizers' ByteLevel pre-tokenizer spells it.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """GPT-2's byte-level split with every run cut at MAX_RUN characters: one regex pass, as
    fast as ByteLevel's own.

    Saved in tokenizer.json, so a text is encoded in the pieces it was trained on (tokenizers
    saved before the cut keep their own pre-tokenizer and load unchanged)."""
    bounded = GPT2_SPLIT.replace("+", f"{{1,{MAX_RUN}}}")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(bounded), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE: every byte is in the alphabet, so no text is ever out of vocabulary.

    `texts` yields texts or lists of texts (batches are faster: fewer calls into Rust)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> Path:
    path = Path(directory) / TOKENIZER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return path


def load_tokenizer(directory: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(Path(directory) / TOKENIZER_FILE))
