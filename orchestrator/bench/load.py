"""HTTP load, run as its own process so it does not share the server's interpreter.

Closed loop:

    python -m orchestrator.bench.load URL CONCURRENCY SECONDS BODY_JSON [WARMUP_SECONDS]

Each of CONCURRENCY clients posts BODY_JSON, waits for the answer and posts again, for SECONDS
after a warm-up. Prints one JSON line: requests/s, p50 and p99 latency in ms, and errors.

Open loop (Poisson arrivals, streamed answers):

    python -m orchestrator.bench.load open URL RATE SECONDS BODY_JSON [SEED]

Requests arrive at RATE per second on average (exponential gaps) for SECONDS, whatever the
server's speed, each streaming its answer. Prints one JSON line: offered and achieved requests/s,
time to first token and inter-token latency (p50, p99, ms), and errors.

With ORCHESTRATOR_BENCH_API_KEY set, every request carries it as `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp
import numpy as np

API_KEY_ENV = "ORCHESTRATOR_BENCH_API_KEY"


def _headers() -> dict[str, str]:
    key = os.environ.get(API_KEY_ENV)
    return {"Authorization": f"Bearer {key}"} if key else {}


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
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=_headers()) as session:
        warm_until = time.perf_counter() + warmup_s
        stop_at = warm_until + seconds
        await asyncio.gather(*(_client(session, url, body, warm_until, stop_at, latencies, errors)
                               for _ in range(concurrency)))
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {"requests_per_s": len(latencies) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "errors": len(errors)}


async def _streamed(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                    ttfts: list[float], gaps: list[float], done: list[float],
                    errors: list[int]) -> None:
    started = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                await response.read()
                errors.append(1)
                return
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    errors.append(1)
                    return
                if not any(choice.get("text") for choice in event.get("choices", [])):
                    continue
                now = time.perf_counter()
                if last is None:
                    ttfts.append(now - started)
                else:
                    gaps.append(now - last)
                last = now
    except aiohttp.ClientError:
        errors.append(1)
        return
    done.append(time.perf_counter())


async def open_loop(url: str, rate: float, seconds: float, body: dict[str, Any],
                    seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    ttfts: list[float] = []
    gaps: list[float] = []
    done: list[float] = []
    errors: list[int] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    body = {**body, "stream": True}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     headers=_headers()) as session:
        start = time.perf_counter()
        tasks, at = [], 0.0
        while (at := at + rng.exponential(1 / rate)) < seconds:
            await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
            tasks.append(asyncio.create_task(_streamed(session, url, body, ttfts, gaps, done,
                                                       errors)))
        await asyncio.gather(*tasks)
    sent = len(tasks)
    span = (max(done) - start) if done else float("nan")

    def ms(values: list[float], q: float) -> float:
        return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")

    return {"offered_per_s": sent / seconds, "achieved_per_s": len(done) / span if done else 0.0,
            "ttft_p50_ms": ms(ttfts, 50), "ttft_p99_ms": ms(ttfts, 99),
            "itl_p50_ms": ms(gaps, 50), "itl_p99_ms": ms(gaps, 99),
            "requests": sent, "errors": len(errors)}


def main(argv: list[str]) -> None:
    if argv[0] == "open":
        url, rate, seconds, body = argv[1], float(argv[2]), float(argv[3]), json.loads(argv[4])
        seed = int(argv[5]) if len(argv) > 5 else 0
        print(json.dumps(asyncio.run(open_loop(url, rate, seconds, body, seed))))
        return
    url, concurrency, seconds, body = argv[0], int(argv[1]), float(argv[2]), json.loads(argv[3])
    warmup_s = float(argv[4]) if len(argv) > 4 else 1.0
    print(json.dumps(asyncio.run(closed_loop(url, concurrency, seconds, body, warmup_s))))


if __name__ == "__main__":
    main(sys.argv[1:])
