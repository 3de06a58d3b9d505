"""Tiny Hugging Face checkpoints made locally (nothing is downloaded): a GPT-2 and a BERT-family
encoder with random weights, saved with save_pretrained exactly as the Hub's are, with fast
tokenizers trained on the quickstart sample. `orchestrator bench finetune` and the tests start
from them; so can you, to try model.pretrained without network access:

    python -m orchestrator.bench.checkpoints runs/checkpoints   # runs/checkpoints/{gpt2,bert}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from orchestrator.bench.repository import sample_corpus
from orchestrator.models.hf import quiet_transformers


def _texts() -> list[str]:
    return [json.loads(line)["text"] for line in sample_corpus().read_text().splitlines()]


def tiny_gpt2(directory: Path, n_positions: int = 128, seed: int = 0) -> Path:
    """A 2-layer, 64-wide GPT-2 (random weights) and a byte-level BPE tokenizer, as `gpt2` is laid out."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    quiet_transformers()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(), trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=eos, eos_token_id=eos))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_encoder(directory: Path, model_type: str = "bert", seed: int = 0) -> Path:
    """A 2-layer BERT, RoBERTa or DistilBERT encoder (random weights, no task head) and a
    WordPiece tokenizer that wraps texts in [CLS] ... [SEP]."""
    import torch
    from transformers import AutoConfig, AutoModel, PreTrainedTokenizerFast

    quiet_transformers()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(_texts(), trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    encoder = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}
    sizes = {"bert": {**encoder, "max_position_embeddings": 128},
             "roberta": {**encoder, "max_position_embeddings": 130},  # 2 before padding's + 1
             "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64,
                            "max_position_embeddings": 128}}[model_type]
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer),
                                  pad_token_id=tokenizer.pad_token_id, **sizes)
    AutoModel.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="writes DIRECTORY/gpt2 and DIRECTORY/bert")
    directory = parser.parse_args().directory
    for made in (tiny_gpt2(directory / "gpt2"), tiny_encoder(directory / "bert")):
        print(f"wrote {made}")


if __name__ == "__main__":
    main()
