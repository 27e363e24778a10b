"""First-order check of the RL update (docs/study_thinking.md): from a run's warm start, take
RL steps exactly as the trainer does (plans.rl_plan: rollout, exact-match reward, GRPO update)
and measure, on each step's own batch, how the update changed every completion's log-prob:
sum_i A_i * dlogp_i > 0 and dlogp(correct) > dlogp(wrong) mean the update moves the policy
the way the advantages say. Warmup is set to 0 so the first step already has the full lr.

usage (from the repository root):
  python docs/study_thinking/direction_check.py workdir/sweeps/study_thinking/thinking=tokens,seed=0 2e-4 6
"""
import json
import os
import sys
import tempfile
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from corpo_jax.train import plans
from corpo_jax.train import setup as setup_lib
from corpo_jax.train.checkpoint import Checkpointer
from corpo_jax.rl import step as rl_step
from corpo_jax.train import logprobs
from corpo_jax.train import state as state_lib

src, lr, nsteps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
config = ml_collections.ConfigDict(json.load(open(os.path.join(src, "config.json"))))
config.workdir = tempfile.mkdtemp(); config.rl.learning_rate = lr; config.rl.warmup_steps = 0
config.log.progress = False
run = setup_lib.setup(config)
ckpt = Checkpointer(os.path.join(src, "checkpoints", "sft"))
_, opt0 = setup_lib.stage_optimizer(run, "sft")
st, _ = ckpt.restore(ckpt.latest_step(), state_lib.abstract_state(run.cfg, opt0, run.mesh)); ckpt.close()
params = st.params
rl_cfg, optimizer = setup_lib.stage_optimizer(run, "rl")
state = state_lib.init_state(run.cfg, optimizer, params, run.mesh)
plan = plans.rl_plan(run, "rl", config.rl, 1, setup_lib.StartParams(lambda: params))
it = iter(plan.loader)
captured = []
orig = rl_step.make_batch
def cap(*a, **k):
  b = orig(*a, **k); captured.append(b); return b
seqlp = lambda p, b: np.asarray(jnp.sum(jnp.where(b.loss_mask, logprobs.token_logprobs(p, run.cfg, b.tokens, b.token_mask, temperature=rl_cfg.temperature)[0], 0.0), axis=1))
with mock.patch.object(rl_step, "make_batch", cap):
  for k in range(nsteps):
    before = jax.tree.map(jnp.copy, state.params)
    state, metrics, host = plan.step(state, it, k)
    b = captured[-1]
    d = seqlp(state.params, b) - seqlp(before, b)
    r = np.asarray(b.rewards)
    A = ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + 1e-6)).ravel()
    good, bad = d[r.ravel() > 0.5], d[r.ravel() < 0.5]
    print(f"step {k}: reward {r.mean():.3f} sum(A*dlogp) {np.sum(A * d):+.4f}  dlogp correct {good.mean() if len(good) else float('nan'):+.4f} wrong {bad.mean() if len(bad) else float('nan'):+.4f}  mean|d| {np.abs(d).mean():.4f}", flush=True)
