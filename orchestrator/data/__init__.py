"""The data stage: read the user's text, split it, train the tokenizer, tokenize and write.

Output in the run directory:
  tokenizer/tokenizer.json     the BPE tokenizer trained on the training split
  data/split=<name>/*.parquet  tokenized rows (`ids`, and `label` for the classifier)
  data/meta.json               DataInfo: vocabulary, special ids, labels, row counts
  texts/split=<name>/*.parquet the split's untokenized `text` (and `label`), for the references
"""

from orchestrator.data.sources import read_source
from orchestrator.data.stage import (
    DataInfo,
    load_data_info,
    prepare_data,
    read_split,
    read_split_texts,
    read_splits,
)

__all__ = ["DataInfo", "load_data_info", "prepare_data", "read_source", "read_split",
           "read_split_texts", "read_splits"]
