"""Benchmark entry point: `python -m corpo_jax.bench SUBCOMMAND [flags]`.

Each subcommand module exposes `add_args(parser)` and `main(args)`; register it in `_COMMANDS`.
"""

import argparse
import importlib

_COMMANDS = {
    "rollout": ("corpo_jax.bench.rollout", "generated tokens/s of sampling.generate"),
    "update": ("corpo_jax.bench.update", "time, FLOP/s, MFU and memory of the RL update"),
    "step": ("corpo_jax.bench.step", "one GRPO step: rollout, reward, reference forward, update"),
    "scale": ("corpo_jax.bench.scale", "per-device memory of the RL update on a big fake mesh"),
}


def main() -> None:
  parser = argparse.ArgumentParser(prog="python -m corpo_jax.bench")
  sub = parser.add_subparsers(dest="command", required=True)
  modules = {}
  for name, (module_name, help_text) in _COMMANDS.items():
    modules[name] = importlib.import_module(module_name)
    modules[name].add_args(sub.add_parser(name, help=help_text))
  args = parser.parse_args()
  modules[args.command].main(args)


if __name__ == "__main__":
  main()
