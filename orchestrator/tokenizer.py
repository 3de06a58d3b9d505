"""A byte-level BPE tokenizer trained on the training split and saved with the run."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS, PAD = "<|endoftext|>", "<pad>"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int) -> Tokenizer:
    """Train byte-level BPE: every byte is in the alphabet, so no text is ever out of vocabulary.

    `texts` yields texts or lists of texts (batches are faster: fewer calls into Rust)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
