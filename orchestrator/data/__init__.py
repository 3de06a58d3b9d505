"""The data stage: read the user's text, split it, train the tokenizer, tokenize and write.

  sources.py      readers for parquet, JSONL, CSV and text (a file or a folder of many, gzip
                  or zstd compressed by suffix), local or in object storage
  line_ranges.py  JSONL and text read in byte ranges of whole lines: a large file by several
                  tasks at once
  datasets.py     plain per-batch functions: split assignment, tokenizing, packing, padding
  stage.py        the stage on Ray Data (prepare_data) and the readers of what it wrote

Output in the run directory:
  tokenizer/tokenizer.json     the BPE tokenizer trained on the training split (a seeded sample
                               of data.tokenizer_sample_mb when it is larger)
  data/split=<name>/*.parquet  tokenized rows (`ids`, and `label` for the classifier)
  data/meta.json               DataInfo: vocabulary, special ids, labels, row counts
  texts/split=<name>/*.parquet the split's untokenized `text` (and `label`), for the references

Nothing is imported here: `data.datasets` stays free of Ray Data.
"""
