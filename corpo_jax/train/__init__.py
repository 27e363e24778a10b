"""Training: stages (sft, rl, specialize), checkpoints, metrics."""
