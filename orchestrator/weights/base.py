"""A pretrained checkpoint's weights into a model we built: the staged base/ copy that
pretrained.py checked and wrote, loaded by every worker and by the bundle's assembly."""

from __future__ import annotations

from torch import nn

from orchestrator.models import GPT, EncoderClassifier
from orchestrator.models.hf import gpt_state_from_hf, quiet_transformers
from orchestrator.storage import Location, resolve


def load_base_weights(model: nn.Module, base: str | Location, labels: list[str]) -> None:
    """Fill a freshly built model (build_model with the checkpoint's architecture) with the
    staged checkpoint's weights. A classifier keeps the checkpoint's head only when it was
    trained for the same labels (a fine-tuned run of ours); otherwise its head stays fresh."""
    from transformers import AutoModelForSequenceClassification, GPT2LMHeadModel

    quiet_transformers()
    with resolve(base).local_copy() as folder:
        if isinstance(model, GPT):
            state = GPT2LMHeadModel.from_pretrained(folder).state_dict()
            model.load_state_dict(gpt_state_from_hf(state))
            return
        if not isinstance(model, EncoderClassifier):
            raise TypeError(f"{type(model).__name__} is not built from a pretrained checkpoint")
        source = AutoModelForSequenceClassification.from_pretrained(folder)
    state = source.state_dict()
    if list(source.config.id2label.values()) != labels:
        prefix = f"{source.base_model_prefix}."
        state = {key: value for key, value in state.items() if key.startswith(prefix)}
    missing, unexpected = model.hf.load_state_dict(state, strict=False)
    if unexpected or any(key.startswith(f"{source.base_model_prefix}.") for key in missing):
        raise ValueError(f"the staged checkpoint does not fit the model: missing {missing}, "
                         f"unexpected {unexpected}")
