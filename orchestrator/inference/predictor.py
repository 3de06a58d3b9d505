"""What a Serve replica and batch inference compute, without Ray: classification, and batched
incremental generation on the serving engine (inference/engine.py), so that a batch
prediction and an online answer come from the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from orchestrator.data.datasets import pad_or_truncate
from orchestrator.inference.engine import INCOMPLETE, ChoiceUpdate, Engine
from orchestrator.inference.sampling import SamplingParams, request_generator, sampling_probs
from orchestrator.models import GPT
from orchestrator.spec import Task
from orchestrator.weights.model import Bundle

__all__ = ["INCOMPLETE", "ChoiceUpdate", "Completion", "Decoding", "Predictor", "SamplingParams",
           "request_generator", "sampling_probs"]


@dataclass
class Completion:
    text: str
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "error"


class Decoding:
    """Rows decoded together on an engine of their own, each row its own request (a row that
    fails ends alone, with finish_reason "error"). `step()` gives every row's update, None for
    rows that had finished before."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, eos_id: int, prompts: list[list[int]],
                 params: list[SamplingParams]):
        self._engine = Engine(model, tokenizer, eos_id, max_batch_size=max(1, len(prompts)))
        self._engine.check(prompts, params)
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            self._engine.add(index, [prompt], [p])
        self._rows = len(prompts)
        self._tokens = [0] * len(prompts)

    @property
    def finished(self) -> bool:
        return not self._engine.has_work

    def step(self) -> list[ChoiceUpdate | None]:
        updates: list[ChoiceUpdate | None] = [None] * self._rows
        for output in self._engine.step():
            row = output.request_id
            for _, update in output.updates:
                self._tokens[row] = update.completion_tokens
                updates[row] = update
            if output.error is not None:
                updates[row] = ChoiceUpdate("", "error", self._tokens[row])
        return updates

class Predictor:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info

    @property
    def context_length(self) -> int:
        """The tokens the model reads: a language model's block_size (a prompt and its
        max_tokens must fit in it together), a classifier's max_length (a text is cut to it;
        a classifier has no block_size, and asking it was a 500 on /v1/models)."""
        if self.info.task == Task.LANGUAGE_MODEL:
            return self.model.block_size
        return self.info.context_length

    def encode(self, prompt: str) -> list[int]:
        """Token ids of the prompt; an empty prompt becomes EOS, the start of any document."""
        return self.tokenizer.encode(prompt).ids or [self.info.eos_id]

    def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> Decoding:
        return Decoding(self.model, self.tokenizer, self.info.eos_id, prompts, params)

    def complete(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Decode every row to its end: the same texts a stream of `start(...).step()` gives."""
        decoding = self.start(prompts, params)
        texts = [""] * len(prompts)
        last: list[ChoiceUpdate | None] = [None] * len(prompts)
        while not decoding.finished:
            for index, update in enumerate(decoding.step()):
                if update is not None:
                    texts[index] += update.text
                    last[index] = update
        return [Completion(text, update.completion_tokens, update.finish_reason)
                for text, update in zip(texts, last)]

    def classify(self, texts: list[str]) -> list[dict]:
        """Label and score for each text, plus every class's probability."""
        ids = pad_or_truncate([e.ids for e in self.tokenizer.encode_batch(texts)],
                              self.info.pad_id, self.info.context_length)
        with torch.inference_mode():
            logits = self.model(torch.as_tensor(ids).long().to(next(self.model.parameters()).device))
            probs = F.softmax(logits.float(), dim=-1).cpu()
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": self.info.labels[best], "score": float(row[best]),
                            "scores": dict(zip(self.info.labels, map(float, row)))})
        return results
