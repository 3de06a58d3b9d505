"""Train a run's `linear` classifier outside the job, in a plain PyTorch loop on one thread, on
the splits that run's data stage wrote: its test accuracy for settings the sweep did not try,
and where a step's time goes.

The model, its tokenizer vocabulary, the squared-hinge loss, the optimizer and the learning-rate
schedule are the job's own (`build_optimizer`, `build_scheduler`: warmup, then cosine over
`--steps`); the loop is a plain one with gradients clipped at 1, so a probe isolates the model
and its settings from Ray and the sweep.

    python scripts/probe_linear.py runs/debian-20261205-110840 --steps 1200 --lr 0.0137 \\
        --weight-decay 0.0158                                  # about a minute on one core
    python scripts/probe_linear.py runs/debian-20261205-110840 --profile --unfused

`--profile` times 30 steps of forward, backward and update instead of training;
`--unfused` runs torch's per-parameter update, as `build_optimizer` did on CPU before it fused it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from orchestrator.data.stage import load_data_info
from orchestrator.rundir import RunDir
from orchestrator.spec import JobSpec, parse_spec
from orchestrator.train.config import FromSpec, worker_config
from orchestrator.train.objectives import squared_hinge_loss
from orchestrator.train.optim import build_optimizer, build_scheduler
from orchestrator.train.session import read_split_tensors

def probe_spec(args: argparse.Namespace) -> JobSpec:
    """The run's spec with `model.arch: linear`, the probe's buckets and training settings."""
    raw = yaml.safe_load((Path(args.run_dir) / "spec.yaml").read_text())
    raw["model"].update(arch="linear", linear={"buckets": args.buckets})
    raw["train"].update(lr=args.lr, weight_decay=args.weight_decay, max_steps=args.steps,
                        batch_size=args.batch_size, loss="squared_hinge")
    raw["resources"]["use_gpu"] = False
    return parse_spec(raw)


def build_linear(spec: JobSpec, run_dir: str) -> torch.nn.Module:
    """The spec's linear model for the run's data, on CPU, weights fresh."""
    config = worker_config(spec, load_data_info(run_dir), RunDir.at(run_dir))
    return FromSpec().begin(config, torch.device("cpu")).model


def accuracy(model: torch.nn.Module, split: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        predicted = torch.cat([model(split["ids"][i:i + 512]).argmax(-1)
                               for i in range(0, len(split["ids"]), 512)])
    model.train()
    return (predicted == split["label"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--buckets", type=int, default=262_144)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unfused", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    spec = probe_spec(args)
    model = build_linear(spec, args.run_dir)
    optimizer = build_optimizer(model, spec.train)
    for group in optimizer.param_groups:
        group["fused"] = not args.unfused
    schedule = build_scheduler(optimizer, spec.train)
    train, val, test = (read_split_tensors(args.run_dir, split)
                        for split in ("train", "val", "test"))
    phases = {"forward": 0.0, "backward": 0.0, "clip + update": 0.0}
    steps = 30 if args.profile else args.steps
    order, cursor, started = torch.randperm(len(train["ids"])), 0, time.perf_counter()
    for _ in range(steps):
        if cursor + args.batch_size > len(order):
            order, cursor = torch.randperm(len(order)), 0
        rows = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size
        clock = time.perf_counter()
        loss = squared_hinge_loss(model, train["ids"][rows], train["label"][rows])
        phases["forward"] += time.perf_counter() - clock
        clock = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        phases["backward"] += time.perf_counter() - clock
        clock = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        phases["clip + update"] += time.perf_counter() - clock
    elapsed = time.perf_counter() - started
    if args.profile:
        print(", ".join(f"{name} {1000 * s / steps:.1f} ms" for name, s in phases.items())
              + f"; step {1000 * elapsed / steps:.1f} ms")
        return
    print(f"{vars(args)}: val {accuracy(model, val):.4f} test {accuracy(model, test):.4f} "
          f"({elapsed:.0f} s, {steps / elapsed:.1f} steps/s)")


if __name__ == "__main__":
    main()
