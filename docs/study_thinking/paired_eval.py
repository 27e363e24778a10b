"""Paired evaluation for study 2 (docs/study_thinking.md): the warm start ("sft") and the RL
policy ("rl") of every finished run, on the first N held-out problems, each sampled with its
run's evaluation rng (the same for every policy of a seed: common random numbers). Rows go to
<run>/eval512.jsonl (the run's eval.jsonl is left as it is); finished runs already evaluated are
skipped, so it can be rerun while the sweep goes on. It is `python -m corpo_jax.evaluate
--workdir RUN --stage STAGE --num_prompts N --out RUN/eval512.jsonl` for every run and stage, in
one process (the sampler compiles once per model shape).

usage (from the repository root):
  python docs/study_thinking/paired_eval.py workdir/sweeps/study_thinking 512
"""
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from corpo_jax.train import loop  # pylint: disable=g-import-not-at-top
from corpo_jax.train.metrics import read_jsonl  # pylint: disable=g-import-not-at-top
from launch import sweep  # pylint: disable=g-import-not-at-top

root, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512
for run in sorted(glob.glob(os.path.join(root, "thinking=*"))):
  if not all(sweep.stage_done(run, stage) for stage in ("sft", "rl")):
    print(f"{os.path.basename(run)}: not finished, skipped", flush=True)
    continue
  out = os.path.join(run, "eval512.jsonl")
  done = {r["stage"] for r in read_jsonl(out)} if os.path.exists(out) else set()
  for stage in ("sft", "rl"):
    if stage not in done:
      row = loop.evaluate_workdir(run, stage=stage, num_prompts=n, out=out)[0]
      print(f"{os.path.basename(run)} {stage}: accuracy {row['accuracy']:.3f}, transparency "
            f"{row['transparency']:.3f}", flush=True)
