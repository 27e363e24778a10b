"""`python -m corpo_jax.evaluate --workdir W [--stage S] [--num_prompts N] [--out FILE]`:
evaluates a run's newest checkpoint (or stage S's) with the run's evaluation settings and rng
(corpo_jax/evaluate/__init__.py)."""

from absl import app, flags

from corpo_jax.train import loop


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  for row in loop.evaluate_workdir(f.workdir, stage=f.stage, num_prompts=f.num_prompts, out=f.out):
    ks = ", ".join(f"pass@{k} {v:.3f}" for k, v in row["pass_at_k"].items())
    split = ", ".join(f"{k.split('_')[1]} {v:.3f}" for k in ("accuracy_thinking", "accuracy_direct")
                      if (v := row[k]) is not None)
    print(f"{row['stage']} step {row['step']} {row['task']}: accuracy {row['accuracy']:.3f}, {ks}, "
          f"transparency {row['transparency']:.3f} (accuracy when {split})")


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The --config.workdir of a run.", required=True)
  flags.DEFINE_string("stage", None, "Evaluate this stage's newest checkpoint (default: the "
                      "newest checkpoint of the last stage that has one).")
  flags.DEFINE_integer("num_prompts", None, "Problems per task (default: config.eval.num_prompts).")
  flags.DEFINE_string("out", None, "Append the rows to this file (default: <workdir>/eval.jsonl).")
  app.run(main)
