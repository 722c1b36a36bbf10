"""Scoring throughput of one reward in-process vs. through `reward_models.server`, side by side.

    python scripts/bench/reward_throughput.py --reward tiny_cnn --batch 16 --image-size 64 --repeats 20

`--reward` takes anything `reward_models.load` accepts, or `tiny_cnn` (a seeded 2-layer conv net
defined here). `--server process` (default) starts `python -m reward_models.server` in a subprocess,
as dependency isolation would; `--server thread` serves from this process. Exits non-zero only on a crash.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

import reward_models  # noqa: E402
from reward_models.client import RemoteReward  # noqa: E402
from reward_models.server import RewardServer  # noqa: E402


class TinyConvReward(reward_models.RewardModel):
    """A seeded 2-layer conv net + pooling: a stand-in for a small learned reward."""

    name = "tiny_cnn"

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(32, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.1

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(images * 2 - 1))))
        return self.head(h.mean((2, 3))).squeeze(1)


def resolve(spec: str) -> str:
    """The reward spec both sides load: `tiny_cnn` becomes this file's import path."""
    return "reward_throughput:TinyConvReward" if spec == "tiny_cnn" else spec


@contextmanager
def subprocess_server(spec: str, args: argparse.Namespace) -> Iterator[Tuple[str, Path]]:
    """Run `python -m reward_models.server` in a child; yield (url, token file)."""
    token_file = Path(tempfile.mkdtemp(prefix="bench-reward-")) / "token"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "reward_models.server", spec, "--port", "0", "--token-file", str(token_file),
           "--max-batch", str(args.batch), "--max-image-size", str(args.image_size)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        if " at http" not in line:
            raise RuntimeError(f"server did not start (exit code {proc.wait(timeout=30)})")
        proc.stdout.readline()
        yield line.split(" at ")[-1].strip(), token_file
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def thread_server(spec: str) -> Iterator[Tuple[str, Path]]:
    """Serve from a thread of this process; yield (url, token file)."""
    with RewardServer(spec) as srv:
        token_file = Path(tempfile.mkdtemp(prefix="bench-reward-")) / "token"
        token_file.write_text(srv.token)
        yield srv.url, token_file


def time_calls(fn: Callable[[], torch.Tensor], repeats: int) -> List[float]:
    """Seconds per call, after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def report(label: str, times: List[float], batch: int) -> float:
    """Print images/s (from the median call time) and return it."""
    median = sorted(times)[len(times) // 2]
    rate = batch / median
    print(f"{label:<11}: {rate:10.1f} images/s  ({median * 1e3:8.2f} ms/batch median, "
          f"min {min(times) * 1e3:.2f} ms)")
    return rate


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reward", default="tiny_cnn", help="tiny_cnn, a registered name, or module:Class")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--server", choices=["process", "thread"], default="process")
    p.add_argument("--wire-dtype", choices=["float32", "uint8"], default="float32")
    args = p.parse_args(list(argv) or None)
    sys.path.insert(0, str(HERE))
    spec = resolve(args.reward)
    local = reward_models.load(spec)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=g)
    prompts = [f"prompt {i}" for i in range(args.batch)]
    print(f"reward={local.name} batch={args.batch} image={args.image_size}x{args.image_size} "
          f"repeats={args.repeats} server={args.server} wire={args.wire_dtype} torch_threads={torch.get_num_threads()}")
    serving = subprocess_server(spec, args) if args.server == "process" else thread_server(spec)
    with serving as (url, token_file):
        remote = RemoteReward(url, token_file=token_file, wire_dtype=args.wire_dtype)
        local_rate = report("in-process", time_calls(lambda: local(images, prompts), args.repeats), args.batch)
        remote_rate = report("server", time_calls(lambda: remote(images, prompts), args.repeats), args.batch)
        diff = (remote(images, prompts) - local(images, prompts)).abs().max().item()
        remote.close()
    mb = images.numel() * (4 if args.wire_dtype == "float32" else 1) / 1e6
    print(f"ratio server/in-process: {remote_rate / local_rate:.3f}  "
          f"(overhead {(args.batch / remote_rate - args.batch / local_rate) * 1e3:.2f} ms/batch, "
          f"payload {mb:.2f} MB/batch)")
    print(f"max |server - in-process| score difference: {diff:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
