"""What a replica computes, without Ray: batched classification and batched generation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orchestrator.bundle import Bundle
from orchestrator.data.datasets import pad_or_truncate


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float
    top_k: int
    seed: int | None = None


def request_generator(seed: int | None) -> torch.Generator:
    """One request's random stream: its seed alone decides its samples, whatever shares its
    batch; without a seed, fresh entropy (a new Generator's default seed is a constant)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class Predictor:
    def __init__(self, bundle: Bundle):
        self.bundle = bundle
        self.model = bundle.model
        self.tokenizer = bundle.tokenizer
        self.info = bundle.info

    @torch.no_grad()
    def classify(self, texts: list[str]) -> list[dict]:
        """Label and score for each text, plus every class's probability."""
        ids = pad_or_truncate([e.ids for e in self.tokenizer.encode_batch(texts)],
                              self.info.pad_id, self.info.seq_len)
        probs = F.softmax(self.model(torch.as_tensor(ids).long()).float(), dim=-1)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": self.info.labels[best], "score": float(row[best]),
                            "scores": dict(zip(self.info.labels, map(float, row)))})
        return results

    def prompt_tokens(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids or [self.info.eos_id]

    @torch.no_grad()
    def generate(self, requests: list[GenerationRequest]) -> list[dict]:
        """Requests whose prompts have the same token length decode together in one batch."""
        results: list[dict | None] = [None] * len(requests)
        groups: dict[int, list[int]] = {}
        prompts = [self.prompt_tokens(r.prompt) for r in requests]
        for index, tokens in enumerate(prompts):
            groups.setdefault(len(tokens), []).append(index)
        for indices in groups.values():
            batch = [requests[i] for i in indices]
            outputs = self._decode(torch.tensor([prompts[i] for i in indices]), batch)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    def _decode(self, ids: torch.Tensor, batch: list[GenerationRequest]) -> list[dict]:
        block = self.info.seq_len - 1
        generators = [request_generator(r.seed) for r in batch]
        temperature = torch.tensor([[max(r.temperature, 1e-6)] for r in batch])
        prompt_len, steps = ids.shape[1], max(r.max_tokens for r in batch)
        for _ in range(steps):
            logits = self.model(ids[:, -block:])[:, -1, :].float() / temperature
            for row, request in enumerate(batch):
                if request.top_k:
                    kth = torch.topk(logits[row], min(request.top_k, logits.shape[-1])).values[-1]
                    logits[row] = logits[row].masked_fill(logits[row] < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            next_ids = torch.stack([
                logits[row].argmax(-1, keepdim=True) if request.temperature == 0
                else torch.multinomial(probs[row], 1, generator=generators[row])
                for row, request in enumerate(batch)])
            ids = torch.cat([ids, next_ids], dim=1)
        outputs = []
        for row, request in enumerate(batch):
            new = ids[row, prompt_len: prompt_len + request.max_tokens].tolist()
            finish = "length"
            if self.info.eos_id in new:
                new, finish = new[: new.index(self.info.eos_id)], "stop"
            outputs.append({"text": self.tokenizer.decode(new), "tokens": len(new),
                            "finish_reason": finish})
        return outputs
