"""The requests a run sends to its freshly deployed service, to show it answering."""

from __future__ import annotations

from typing import Any

import requests

from orchestrator.serve.auth import load_keys
from orchestrator.spec import JobSpec, Task


def send_sample_requests(spec: JobSpec, url: str, task: Task) -> list[dict[str, Any]]:
    """The requests the quickstart sends to show the service answering."""
    keys = load_keys(spec.serve)
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    if task == Task.CLASSIFIER:
        calls = [("/v1/classify", {"model": spec.name, "input": spec.serve.sample_requests})]
    else:
        calls = [("/v1/completions", {
            "model": spec.name, "prompt": prompt, "max_tokens": min(24, spec.serve.max_new_tokens),
            "temperature": 0.8, "top_k": 40, "seed": 0}) for prompt in spec.serve.sample_requests]
    answers = []
    for route, body in calls:
        response = requests.post(f"{url}{route}", json=body, headers=headers, timeout=60)
        answers.append({"request": body, "status": response.status_code,
                        "response": response.json()})
    return answers
