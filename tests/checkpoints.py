"""The tiny Hugging Face checkpoints of scripts/tiny_checkpoints.py (a GPT-2, BERT-family
encoders), for the tests that start from a pretrained model."""

from __future__ import annotations

import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location("tiny_checkpoints",
                                               REPO / "scripts" / "tiny_checkpoints.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
tiny_gpt2 = _module.tiny_gpt2
tiny_encoder = _module.tiny_encoder
