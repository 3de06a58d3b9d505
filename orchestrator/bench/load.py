"""Closed-loop HTTP load, run as its own process so it does not share the server's interpreter:

    python -m orchestrator.bench.load URL CONCURRENCY SECONDS BODY_JSON [WARMUP_SECONDS]

Each of CONCURRENCY clients posts BODY_JSON, waits for the answer and posts again, for SECONDS
after a warm-up. Prints one JSON line: requests/s, p50 and p99 latency in ms, and errors.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import numpy as np


async def _client(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                  warm_until: float, stop_at: float, latencies: list[float],
                  errors: list[int]) -> None:
    while (started := time.perf_counter()) < stop_at:
        try:
            async with session.post(url, json=body) as response:
                await response.read()
                ok = response.status == 200
        except aiohttp.ClientError:
            ok = False
        if started < warm_until:
            continue
        if ok:
            latencies.append(time.perf_counter() - started)
        else:
            errors.append(1)


async def closed_loop(url: str, concurrency: int, seconds: float, body: dict[str, Any],
                      warmup_s: float = 1.0) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[int] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_until = time.perf_counter() + warmup_s
        stop_at = warm_until + seconds
        await asyncio.gather(*(_client(session, url, body, warm_until, stop_at, latencies, errors)
                               for _ in range(concurrency)))
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors)}


def main(argv: list[str]) -> None:
    url, concurrency, seconds, body = argv[0], int(argv[1]), float(argv[2]), json.loads(argv[3])
    warmup_s = float(argv[4]) if len(argv) > 4 else 1.0
    print(json.dumps(asyncio.run(closed_loop(url, concurrency, seconds, body, warmup_s))))


if __name__ == "__main__":
    main(sys.argv[1:])
