"""The `genft` command: a thin layer over genft.train, genft.demo, genft.eval_cli and the toy world's pretraining.

Only this module reads the environment or sets threads; the library never does.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import ConfigError


def _cmd_train(args: argparse.Namespace) -> int:
    from .loading import load_config
    from .methods import get_method

    if args.help_config:
        method = args.config_or_method or "dpok"
        print(f"Fields of {get_method(method).config_class.__name__} (method={method}):")
        print(get_method(method).config_class.field_help())
        return 0
    if not args.config_or_method:
        raise ConfigError("genft train needs a config file: genft train CONFIG.yaml [key=value ...]")
    config = load_config(args.config_or_method, args.overrides)
    from .trainer import Trainer

    trainer = Trainer(config)
    with _stop_on_signals(trainer):
        result = trainer.train()
    if result.get("interrupted"):
        print(f"\ninterrupted: checkpoint saved at {result['checkpoint']}; resume with resume_from=latest")
        return 130
    if trainer.accelerator.is_main_process:  # one summary per job, not one per process
        _print_summary(result)
    return 0


class _stop_on_signals:
    """While active, SIGINT/SIGTERM ask the trainer to checkpoint and stop; a second SIGINT aborts at once."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.previous = {}

    def _handler(self, signum, frame):
        import signal

        if self.trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print(f"\ngenft: got signal {signum}; saving a checkpoint after this round (Ctrl-C again to abort)", file=sys.stderr)
        self.trainer.request_stop()

    def __enter__(self):
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _print_summary(result: dict) -> None:
    before = result.get("before") or {}
    after = result["after"]
    print(f"\nrun folder: {result['output_dir']}")
    print(f"{'reward':28s} {'before':>16s} {'after':>16s}")
    for name, m in after["metrics"].items():
        b = before.get("metrics", {}).get(name)
        bs = f"{b['mean']:.3f} ± {b['std']:.3f}" if b else "–"
        print(f"{name:28s} {bs:>16s} {m['mean']:.3f} ± {m['std']:.3f}")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .config import parse_overrides
    from .demo import run_demo

    path = run_demo(args.output_dir, progress=not args.no_progress, **parse_overrides(args.overrides))
    print(f"\ngallery: {path.resolve()}")
    return 0


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from . import toyworld

    progress = not args.no_progress
    if args.out:
        path = toyworld.pretrain(args.out, progress=progress)
    elif args.force:
        path = toyworld.pretrain(toyworld.default_cache_dir(), progress=progress)
    else:
        path = toyworld.load_or_pretrain(progress=progress)
    print(f"toy world: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genft", description="Reward fine-tuning of generative image models.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune from a YAML config: genft train CONFIG.yaml [key=value ...]")
    t.add_argument("config_or_method", nargs="?", help="YAML config (or, with --help-config, a method name)")
    t.add_argument("overrides", nargs="*", help="field overrides, key=value")
    t.add_argument("--help-config", action="store_true", help="list every config field with its type, default and help")
    t.set_defaults(func=_cmd_train)

    d = sub.add_parser("demo", help="pretrain/load the toy world, fine-tune it with DPOK and write an HTML gallery")
    d.add_argument("--output-dir", default="genft_runs/demo")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("overrides", nargs="*", help="DPOK config overrides, key=value")
    d.set_defaults(func=_cmd_demo)

    w = sub.add_parser("toyworld", help="the embedded toy text-to-image world")
    wsub = w.add_subparsers(dest="toy_command", required=True)
    pt = wsub.add_parser("pretrain", help="pretrain the toy world's base generator into the cache (or --out DIR)")
    pt.add_argument("--out", default=None, help="write here instead of the cache")
    pt.add_argument("--force", action="store_true", help="rebuild the cache even if it is complete")
    pt.add_argument("--no-progress", action="store_true")
    pt.set_defaults(func=_cmd_pretrain)

    from .eval_cli import add_parser as _add_eval_parser

    _add_eval_parser(sub)
    return p


def _quiet_library_progress_bars() -> None:
    """--no-progress also silences transformers'/diffusers' own loading bars (global switches: CLI only)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    try:
        from diffusers.utils import logging as df_logging

        df_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    if getattr(args, "no_progress", False):
        _quiet_library_progress_bars()
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        import os

        if os.environ.get("GENFT_DEBUG"):
            raise
        print(f"genft: error: {e}  (set GENFT_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
