"""The RL update: exact accumulation, sharded == single device, freezing, skipping, one compile."""

import dataclasses
import functools
import types
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from corpo_jax import model, sharding
from corpo_jax.rl import step
from corpo_jax.rl.config import RLConfig
from corpo_jax.train import logprobs, optim
from corpo_jax.train import state as state_lib

# Smaller than "tiny": compile time dominates these tests. MoE aux weights are 0 so that
# accumulation is exact (aux losses are per-micro-batch means; see step.py).
CFG = model.ModelConfig.preset("tiny", vocab_size=64, d_model=32, d_ff=32, num_layers=1,
                               num_heads=4, num_kv_heads=2, thinking_layers=0,
                               load_balance_weight=0.0, z_loss_weight=0.0)
# token_mean with rows of different lengths: a mean of micro-batch means would differ.
RL = RLConfig(advantage="grpo", scale="group", aggregation="token_mean", learning_rate=1e-3,
              logprob_chunk=3, max_completion_len=5)
# Equivalence tests compare params after one step of SGD with momentum (params - lr * grads):
# Adam's first step, lr * g / (|g| + eps), turns float noise in near-zero gradients into
# differences far above rtol 1e-5.
SGD = optax.sgd(0.1, momentum=0.9)
B, G, P, TC = 2, 4, 3, 5


def _batch(seed=0, rewards=None):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(6, CFG.vocab_size, (B * G, P + TC)).astype(np.int32)
  token_mask = np.ones_like(tokens, bool)
  token_mask[:3, 0] = False  # left padding
  tokens[:3, 0] = 0
  lengths = np.array([5, 1, 3, 2, 2, 4, 5, 5])
  loss_mask = np.zeros_like(token_mask)
  for i, n in enumerate(lengths):
    loss_mask[i, P:P + n] = True
    token_mask[i, P + n:] = False
    tokens[i, P + n:] = 0
  if rewards is None:
    rewards = rng.normal(size=(B, G))
  return step.Batch(tokens=tokens, token_mask=token_mask, loss_mask=loss_mask,
                    rewards=np.asarray(rewards, np.float32), truncated=lengths == TC)


@pytest.fixture(scope="module")
def params():
  return model.init_params(CFG, jax.random.key(0))


def _numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _run(params, rl_cfg, mesh=None, opt=SGD):
  state = state_lib.init_state(CFG, opt, params, mesh)
  ref = params if mesh is None else jax.device_put(params, model.param_shardings(CFG, mesh))
  new_state, metrics = step.make_update(CFG, rl_cfg, mesh, opt)(state, _batch(), ref)
  return _numpy(new_state), _numpy(metrics)


@pytest.fixture(scope="module")
def reference(params):
  """One full-batch update on one device; the update function traces at most once."""
  with mock.patch.object(step, "_train_step", chex.assert_max_traces(step._train_step, n=1)):
    update = step.make_update(CFG, RL, None, SGD)
  state = state_lib.init_state(CFG, SGD, params)
  new_state, metrics = update(state, _batch())
  return types.SimpleNamespace(update=update, opt=SGD, state=_numpy(new_state),
                               metrics=_numpy(metrics))


def _assert_same_step(got_state, got_metrics, want):
  for k in ("loss", "pg_loss", "entropy", "clip_frac", "grad_norm", "adv/std"):
    np.testing.assert_allclose(got_metrics[k], want.metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  chex.assert_trees_all_close(got_state.params, want.state.params, rtol=1e-5, atol=1e-6)


def test_reference_step_moves_params_and_logs(params, reference):
  m = reference.metrics
  assert m["applied"] == 1.0 and m["skipped"] == 0 and reference.state.step == 1
  assert m["grad_norm"] > 1e-3 and m["ratio_mean"] == pytest.approx(1.0)
  assert m["completion/length_mean"] == pytest.approx(27 / 8)
  assert m["completion/truncated_frac"] == pytest.approx(3 / 8)
  assert m["expert_load"].shape == (CFG.num_layers, CFG.num_experts)
  assert 0 < m["entropy"] <= np.log(CFG.vocab_size) + 1e-5
  grad_norm = np.sqrt(sum(np.sum((a - np.asarray(b)) ** 2) for a, b in zip(
      jax.tree.leaves(reference.state.params), jax.tree.leaves(params)))) / 0.1
  assert grad_norm == pytest.approx(m["grad_norm"], rel=1e-4)  # SGD: params - 0.1 * grads


def test_micro_batches_equal_full_batch(params, reference):
  state, metrics = _run(params, dataclasses.replace(RL, num_micro_batches=2))
  _assert_same_step(state, metrics, reference)


def test_mean_of_micro_batch_means_would_differ():
  """Guards the test above: the batch makes token_mean differ from a mean of means."""
  b = _batch()
  halves = [b.loss_mask[m::2].sum() for m in (0, 1)]
  assert halves[0] != halves[1]


@pytest.mark.parametrize("shape, overrides", [
    ((8, 1, 1, 1), {}),
    ((2, 2, 2, 1), {"num_micro_batches": 2}),
    # With the reference = the params, k3's value and gradient are 0: same step as beta = 0.
    ((1, 2, 2, 2), {"beta": 0.05}),
])
def test_sharded_equals_single_device(params, reference, shape, overrides):
  mesh = sharding.make_mesh(shape)
  state, metrics = _run(params, dataclasses.replace(RL, **overrides), mesh)
  _assert_same_step(state, metrics, reference)
  assert metrics.get("kl", 0.0) == 0.0


def test_frozen_params_bit_identical(params):
  rl_cfg = dataclasses.replace(RL, freeze=("embed", "layers/attn"))
  state, metrics = _run(params, rl_cfg, opt=optim.make_optimizer(rl_cfg, params))
  assert metrics["applied"] == 1.0
  flat_new = dict(jax.tree_util.tree_leaves_with_path(state.params))
  for path, old in jax.tree_util.tree_leaves_with_path(_numpy(params)):
    name = "/".join(k.key for k in path)
    frozen = name == "embed" or name.startswith("layers/attn/")  # not layers/attn_norm
    assert np.array_equal(flat_new[path], old) == frozen, name


def test_nan_rewards_are_skipped_and_counted(params, reference):
  state = state_lib.init_state(CFG, reference.opt, params)
  before = _numpy(state)
  bad = _batch(seed=1, rewards=np.where(np.eye(B, G, dtype=bool), np.nan, 1.0))
  state, metrics = reference.update(state, bad)
  assert metrics["applied"] == 0.0 and int(metrics["skipped"]) == 1
  assert int(state.step) == 1 and int(state.skipped) == 1
  chex.assert_trees_all_equal(_numpy(state.params), before.params)
  chex.assert_trees_all_equal(_numpy(state.opt_state), before.opt_state)
  state, metrics = reference.update(state, _batch(seed=2))  # next good batch applies
  assert metrics["applied"] == 1.0 and int(state.skipped) == 1 and int(state.step) == 2


@pytest.mark.parametrize("bad", [np.inf, np.nan, 1e30])
def test_a_non_finite_or_overflowing_gradient_is_skipped(params, bad):
  """apply_if_finite skips on the gradient's global norm: an inf or nan element, or finite
  elements whose norm overflows float32 (1e30 ** 2), leave params and optimizer state as they
  were; the same gradient with that element set to 1.0 applies."""
  opt = optax.adam(1e-3)
  state = state_lib.init_state(CFG, opt, params)
  hp = optim.hyperparams(RL)
  grads = jax.tree.map(jnp.zeros_like, state.params)
  for value, applied in ((bad, 0.0), (1.0, 1.0)):
    g = {**grads, "lm_head": grads["lm_head"].at[0, 0].set(value)}
    new, m = jax.jit(optim.apply_if_finite, static_argnums=4)(
        state, g, jax.tree.map(lambda _: None, g), jnp.float32(0.5), opt, hp)
    assert float(m["applied"]) == applied and int(new.skipped) == 1 - applied
    changed = not np.array_equal(np.asarray(new.params["lm_head"]),
                                 np.asarray(state.params["lm_head"]))
    assert changed == bool(applied)


@pytest.mark.parametrize("freeze", [(), ("embed",)])
def test_adamw_skips_by_itself_like_the_select_of_any_optimizer(params, freeze):
  """make_optimizer's AdamW keeps its own state on a bad step (no select of old against new):
  params and optimizer state come out bit-identical to the generic path's select, for a nan
  gradient (count and moments unchanged) and then for clipped good ones (norm > 1)."""
  rl_cfg = dataclasses.replace(RL, learning_rate=1e-2, weight_decay=0.1, freeze=freeze)
  ours = optim.make_optimizer(rl_cfg, params)
  generic = optax.GradientTransformationExtraArgs(*ours)  # the same transforms, unmarked
  assert isinstance(ours, optim.SkippingOptimizer)
  assert not isinstance(generic, optim.SkippingOptimizer)
  hp = optim.hyperparams(rl_cfg)
  trainable = state_lib.trainable_mask(freeze, params)
  apply = jax.jit(optim.apply_if_finite, static_argnums=4)
  states = [state_lib.init_state(CFG, opt, params) for opt in (ours, generic)]
  start = _numpy(states[0])
  for k, bad in enumerate((np.nan, None, None)):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3 * (k + 1)), states[0].params)
    if bad is not None:
      grads = {**grads, "lm_head": grads["lm_head"].at[0, 0].set(bad)}
    train, frozen = state_lib.split_trainable(grads, trainable)
    for i, opt in enumerate((ours, generic)):
      states[i], m = apply(states[i], train, frozen, jnp.float32(0.5), opt, hp)
      assert float(m["applied"]) == (bad is None)
      assert bad is not None or float(m["grad_norm"]) > 1.0  # clipped
    chex.assert_trees_all_equal(*map(_numpy, states))
    if k == 0:  # skipped
      chex.assert_trees_all_equal(_numpy(states[0].params), start.params)
      chex.assert_trees_all_equal(_numpy(states[0].opt_state), start.opt_state)
  assert int(states[0].skipped) == 1
  adam = jax.tree.leaves(states[0].opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  assert [int(a.count) for a in adam if isinstance(a, optax.ScaleByAdamState)] == [2]
  moved = not np.array_equal(np.asarray(states[0].params["embed"]), start.params["embed"])
  assert moved == (not freeze)


def test_clip_by_global_norm_equals_optax():
  grads = {"a": jnp.linspace(-3.0, 2.0, 12).reshape(3, 4), "b": jnp.arange(5.0)}
  for max_norm in (0.5, 100.0):
    ours, _ = optim.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=0)
  assert float(optax.tree.norm(ours)) == float(optax.tree.norm(grads))  # 100: unclipped
  clipped, _ = optim.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
  assert float(optax.tree.norm(clipped)) == pytest.approx(0.5, rel=1e-6)


def test_update_compiles_once_across_steps(params, reference):
  """`reference.update` wraps _train_step in chex.assert_max_traces(n=1): a retrace raises."""
  state = state_lib.init_state(CFG, reference.opt, params)
  losses = []
  for seed in range(3):
    state, metrics = reference.update(state, _batch(seed=seed + 10))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 3 and len(set(losses)) == 3


def test_num_iterations_reuses_old_logprobs_with_kl(params):
  rl_cfg = dataclasses.replace(RL, num_iterations=2, beta=0.05, learning_rate=1e-2)
  opt = optim.make_optimizer(rl_cfg, params)
  state, metrics = _run(params, rl_cfg, opt=opt)
  # The second optimizer step sees ratios != 1 against the log-probs computed before the first,
  # and a KL > 0 against the reference (= the starting params).
  assert metrics["applied"] == 1.0 and abs(metrics["ratio_mean"] - 1.0) > 1e-4
  assert metrics["kl"] > 0.0
  assert metrics["loss"] == pytest.approx(metrics["pg_loss"] + 0.05 * metrics["kl"], rel=1e-5)
  delta = jax.tree.map(lambda a, b: np.abs(a - np.asarray(b)).max(), state.params, params)
  assert max(jax.tree.leaves(delta)) == pytest.approx(2e-2, rel=0.01)  # two Adam steps of lr


def test_token_logprobs_chunked_equal_full_logits(params):
  b = _batch()
  tokens, mask = jnp.asarray(b.tokens), jnp.asarray(b.token_mask)
  logp, entropy, _ = jax.jit(lambda p: logprobs.token_logprobs(p, CFG, tokens, mask,
                                                               temperature=2.0, chunk=3))(params)
  logp_BTV = jax.nn.log_softmax(model.forward(params, CFG, tokens, mask) / 2.0, axis=-1)
  want = jnp.take_along_axis(logp_BTV[:, :-1], tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(logp[:, 1:], want, rtol=1e-5, atol=1e-6)
  assert np.all(logp[:, 0] == 0)
  want_entropy = -jnp.sum(jnp.exp(logp_BTV) * logp_BTV, -1)[:, :-1]
  np.testing.assert_allclose(entropy[:, 1:], want_entropy, rtol=1e-5)


def test_make_batch_follows_the_contract():
  L, A = CFG.num_layers, CFG.top_k
  prompts = np.array([[0, 7, 8], [9, 10, 11]], np.int32)
  prompt_mask = prompts != 0
  rollout = types.SimpleNamespace(
      tokens=np.array([[12, 3, 0], [13, 14, 15]] * 2, np.int32),
      mask=np.array([[True, True, False], [True, True, True]] * 2),
      logprobs=np.zeros((4, 3), np.float32), lengths=np.array([2, 3] * 2),
      truncated=np.array([False, True] * 2), experts=np.zeros((L, 4, 6, A), np.int32),
      forced=np.array([[False, True, False], [False, False, False]] * 2))
  b = step.make_batch(prompts, prompt_mask, rollout, np.ones((2, 2), np.float32))
  np.testing.assert_array_equal(b.tokens[1], [0, 7, 8, 13, 14, 15])
  np.testing.assert_array_equal(b.tokens[2], [9, 10, 11, 12, 3, 0])
  np.testing.assert_array_equal(b.token_mask[0], [False, True, True, True, True, False])
  np.testing.assert_array_equal(b.loss_mask[3], [False, False, False, True, True, True])
  np.testing.assert_array_equal(b.truncated, [False, True, False, True])
  assert b.experts.shape == (L, 4, 6, A)
  np.testing.assert_array_equal(b.forced[2], [False, False, False, False, True, False])
  assert not b.forced[1].any()
  from_lengths = step.make_batch(prompts, np.array([2, 3]), rollout, np.ones((2, 2), np.float32))
  np.testing.assert_array_equal(from_lengths.token_mask, b.token_mask)
  with pytest.raises(ValueError, match="B \\* G rows"):
    step.make_batch(prompts, prompt_mask, rollout, np.ones((2, 3), np.float32))


def test_freeze_base_and_optimizer_memory():
  cfg = model.ModelConfig.preset("tiny")
  abstract = model.abstract_params(cfg)
  mask = state_lib.trainable_mask(("base",), abstract)
  assert not any(jax.tree.leaves({k: v for k, v in mask.items() if k != "thinking"}))
  assert all(jax.tree.leaves(mask["thinking"]))
  unboxed = nn.unbox(abstract)
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  thinking = size(unboxed["thinking"])
  opt = optim.make_optimizer(RLConfig(freeze=("base",)), abstract)
  opt_state = jax.eval_shape(opt.init, unboxed)
  assert size(opt_state) <= 2 * thinking + 4  # Adam moments of the thinking head + counters
  with pytest.raises(ValueError, match="matches no parameter"):
    state_lib.trainable_mask(("encoder/",), abstract)


def test_schedule_warmup_then_cosine():
  s = optim.schedule(RLConfig(learning_rate=1.0, warmup_steps=10, decay_steps=90))
  assert [float(s(i)) for i in (0, 5, 10, 55, 100)] == pytest.approx([0, 0.5, 1, 0.5, 0], abs=1e-6)
  s = optim.schedule(RLConfig(learning_rate=2.0, warmup_steps=4))
  assert [float(s(i)) for i in (2, 4, 1000)] == pytest.approx([1.0, 2.0, 2.0])
  assert float(optim.schedule(RLConfig(learning_rate=3.0))(7)) == 3.0


@pytest.mark.parametrize("warmup, decay", [(10, 90), (4, 0), (0, 50), (0, 0)])
def test_optimizer_equals_optax_adamw_with_its_schedule(warmup, decay):
  cfg = RLConfig(learning_rate=0.1, warmup_steps=warmup, decay_steps=decay, weight_decay=0.01,
                 grad_clip_norm=0.0)
  if decay:
    optax_schedule = optax.warmup_cosine_decay_schedule(0.0, 0.1, warmup, warmup + decay)
  elif warmup:
    optax_schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, 0.1, warmup), optax.constant_schedule(0.1)], [warmup])
  else:
    optax_schedule = optax.constant_schedule(0.1)
  counts = jnp.arange(120)
  traced = jax.jit(jax.vmap(lambda c, hp: optim.learning_rate_at(
      c, hp["learning_rate"], hp["warmup_steps"], hp["decay_steps"]), in_axes=(0, None)))
  want = jax.jit(jax.vmap(optax_schedule))(counts)
  np.testing.assert_array_equal(traced(counts, optim.hyperparams(cfg)), want)  # bit-identical
  np.testing.assert_allclose(jax.vmap(optim.schedule(cfg))(counts), want, rtol=1e-5, atol=1e-9)
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  ours, theirs = optim.make_optimizer(cfg, params), optax.adamw(optax_schedule, weight_decay=0.01)
  # optax.adamw's state layout (behind the identity "clip"): earlier checkpoints restore.
  assert (jax.tree.structure(ours.init(params))
          == jax.tree.structure(optax.chain(optax.identity(), theirs).init(params)))
  a, b = (params, ours.init(params)), (params, theirs.init(params))
  for k in range(12):
    grads = {"w": jnp.sin(params["w"] * (k + 1))}
    u, state = ours.update(grads, a[1], a[0])
    a = (optax.apply_updates(a[0], u), state)
    u, state = theirs.update(grads, b[1], b[0])
    b = (optax.apply_updates(b[0], u), state)
  np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
  assert not np.allclose(a[0]["w"], params["w"])


def test_runtime_fields_share_one_program_and_take_effect(params):
  """Configs that differ only in optim.RUNTIME_FIELDS lower to the same program (one compile for
  rl and specialize), and each field's value still acts: lr 0 leaves the params, tau moves the
  CoRPO baseline."""
  base = dataclasses.replace(RL, advantage="corpo", scale="none", learning_rate=0.0, tau=0.0,
                             warmup_steps=3)
  other = dataclasses.replace(base, learning_rate=1e-2, tau=0.5, warmup_steps=0, decay_steps=7,
                              weight_decay=0.1)
  batch = _batch(rewards=[[0.1, 0.2, 0.6, 0.9], [0.3, 0.3, 0.4, 0.7]])
  runs = []
  for cfg in (base, other):
    opt = optim.make_optimizer(cfg, params)
    update = step.make_update(CFG, cfg, None, opt)
    state = state_lib.init_state(CFG, opt, params)
    runs.append((update.lower(state, batch).as_text(), *_numpy(update(state, batch))))
  (text_a, state_a, metrics_a), (text_b, state_b, metrics_b) = runs
  assert text_a == text_b
  chex.assert_trees_all_equal(state_a.params, _numpy(params))  # lr 0
  assert not np.allclose(state_b.params["embed"], _numpy(params)["embed"])
  # R = [0.1, 0.2, 0.6, 0.9], [0.3, 0.3, 0.4, 0.7]: group means 0.45 and 0.425; with tau 0.5 the
  # baseline is 0.5 in both groups (both in correctness mode) and the mean advantage moves.
  np.testing.assert_allclose(metrics_a["adv/mean"], 0.0, atol=1e-6)
  np.testing.assert_allclose(metrics_b["adv/mean"], (3.5 - 4.0) / 8, rtol=1e-5)
  assert (metrics_a["adv/frac_correctness_mode"], metrics_b["adv/frac_correctness_mode"]) == (0, 1)


def test_updates_differing_in_runtime_fields_share_one_jitted_step(params):
  """With the default optimizer (None: make_optimizer's AdamW), configs that differ only in
  RUNTIME_FIELDS get one jitted step, traced once for both (the trainer's rl and specialize
  stages), and each gives the same state and metrics as an update with its own optimizer."""
  base = dataclasses.replace(RL, learning_rate=1e-3, tau=0.0)
  other = dataclasses.replace(RL, learning_rate=1e-2, tau=0.5, warmup_steps=2, weight_decay=0.1)
  batch = _batch(rewards=[[0.1, 0.2, 0.6, 0.9], [0.3, 0.3, 0.4, 0.7]])
  opts = [optim.make_optimizer(cfg, params) for cfg in (base, other)]
  want = [_numpy(step.make_update(CFG, cfg, None, opt)(state_lib.init_state(CFG, opt, params),
                                                      batch))
          for cfg, opt in zip((base, other), opts)]
  with mock.patch.object(step, "_train_step", chex.assert_max_traces(step._train_step, n=1)):
    updates = [step.make_update(CFG, cfg, None) for cfg in (base, other)]
    got = [_numpy(update(state_lib.init_state(CFG, opt, params), batch))
           for update, opt in zip(updates, opts)]
  assert updates[0].jitted(batch.prompt_len) is updates[1].jitted(batch.prompt_len)
  for (got_state, got_metrics), (want_state, want_metrics) in zip(got, want):
    chex.assert_trees_all_close(got_state.params, want_state.params, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_metrics["loss"], want_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(got_metrics["adv/mean"], want_metrics["adv/mean"], rtol=1e-6)
  assert not np.allclose(got[0][0].params["embed"], got[1][0].params["embed"])


def test_update_rejects_bad_batches(params, reference):
  state = state_lib.init_state(CFG, reference.opt, params)
  with_kl = step.make_update(CFG, dataclasses.replace(RL, beta=0.1), None, reference.opt)
  with pytest.raises(ValueError, match="ref_params"):
    with_kl(state, _batch())
  replay = step.make_update(CFG, dataclasses.replace(RL, router_replay=True), None, reference.opt)
  with pytest.raises(ValueError, match="Batch.experts"):
    replay(state, _batch())
  sharded = step.make_update(CFG, RL, sharding.make_mesh((8, 1, 1, 1)), reference.opt)
  bad = _batch()
  bad = dataclasses.replace(bad, **{k: getattr(bad, k)[:6] for k in
                                    ("tokens", "token_mask", "loss_mask", "truncated")},
                            rewards=bad.rewards[:, :3])
  with pytest.raises(ValueError, match="divisible"):
    sharded(state, bad)


def test_mask_truncated_and_overlong_penalty_equal_their_batch_edits(params, reference):
  rl_cfg = dataclasses.replace(RL, mask_truncated=True, overlong_penalty=True, overlong_buffer=2,
                               overlong_factor=0.5)
  state, metrics = _run(params, rl_cfg)
  b = _batch()
  lengths = b.loss_mask.sum(1)  # [5, 1, 3, 2, 2, 4, 5, 5], max_completion_len 5
  penalty = -0.5 * np.clip((lengths - 3) / 2, 0, 1)  # 0 up to 3 tokens, -0.5 at 5
  np.testing.assert_allclose(penalty, [-0.5, 0, 0, 0, 0, -0.25, -0.5, -0.5])
  penalty[b.truncated] = 0.0  # rows 0, 6, 7: out of the loss, their raw reward in the baseline
  edited = dataclasses.replace(b, loss_mask=b.loss_mask & ~b.truncated[:, None],
                               rewards=(b.rewards + penalty.reshape(B, G)).astype(np.float32))
  want_state, want_metrics = reference.update(state_lib.init_state(CFG, SGD, params), edited)
  want = types.SimpleNamespace(state=_numpy(want_state), metrics=_numpy(want_metrics))
  _assert_same_step(state, metrics, want)
  assert metrics["reward/overlong_penalty"] == pytest.approx(penalty.mean())


def test_diagnostics_use_the_penalised_rewards(params):
  """Hand-computed: the overlong penalty moves group 0 into correctness mode and a completion
  under tau, and the diagnostics count what the advantages saw; reward/mean stays raw."""
  rl_cfg = dataclasses.replace(RL, advantage="grpo", scale="none", tau=0.55,
                               overlong_penalty=True, overlong_buffer=2, overlong_factor=0.5)
  raw = np.array([[1.0, 0.2, 0.6, 0.6], [0.6, 0.9, 1.0, 1.0]], np.float32)
  # lengths [5, 1, 3, 2 | 2, 4, 5, 5] -> penalties [-.5, 0, 0, 0 | 0, -.25, -.5, -.5]
  # used rewards [.5, .2, .6, .6 | .6, .65, .5, .5]: group means .475 (< tau) and .5625;
  # A = [.025, -.275, .125, .125 | .0375, .0875, -.0625, -.0625]; failures (R < .55):
  # rows 0, 1, 6, 7, of which row 0 has A > 0. On the raw rewards: only row 1 fails (A < 0),
  # no group is in correctness mode.
  state = state_lib.init_state(CFG, SGD, params)
  _, m = step.make_update(CFG, rl_cfg, None, SGD)(state, _batch(rewards=raw))
  m = _numpy(m)
  assert m["adv/frac_failed_positive"] == pytest.approx(1 / 4)
  assert m["adv/frac_correctness_mode"] == pytest.approx(1 / 2)
  assert m["adv/pos_neg_ratio"] == pytest.approx(5 / 3)
  assert m["reward/frac_zero_std"] == 0.0
  assert m["reward/mean"] == pytest.approx(5.9 / 8)
  assert m["reward/overlong_penalty"] == pytest.approx(-1.75 / 8)
  np.testing.assert_allclose(m["adv/std"], np.std([.025, -.275, .125, .125, .0375, .0875,
                                                   -.0625, -.0625]), rtol=1e-5)


# TRL's GRPOTrainer loss on this file's batch, one value per (loss_type, scale_rewards,
# mask_truncated_completions), printed by docs/trl_check.py on 2026-12-03 with TRL 1.16.0
# (accelerate 1.16.0, transformers 5.24.0, torch 2.13.0+cpu), installed beside the venv:
#   .venv/bin/pip install --no-deps --target /tmp/trlpkgs trl==1.16.0 accelerate==1.16.0 \
#       datasets==5.2.0 pandas==3.1.1 pyarrow==24.0.0 multiprocess==0.70.19 dill==0.3.8 \
#       xxhash==4.1.0
#   PYTHONPATH=/tmp/trlpkgs:. .venv/bin/python docs/trl_check.py
# The script runs TRL's own GRPOTrainer._generate_and_score_completions (masks,
# mask_truncated_completions, grouped advantages) and _compute_loss (beta 0.05, epsilon 0.2,
# token-level ratios, use_bias_correction_kl) on this batch, fed through a rollout_func, with
# _get_per_token_logps_and_entropies returning corpo_jax's log-probs of `params` and of
# `params * 0.9` (token_logprobs, chunk 3), as below. Regenerate (and paste the printed lines)
# when _batch, CFG, the `params` fixture, token_logprobs' numerics or these cases change, or to
# check a newer TRL.
TRL_LOSSES = {
    ("grpo", "group", False): 0.0027065554886417376,
    ("bnpo", "batch", True): 0.4587618838042787,
    ("dr_grpo", "none", True): 0.09090949163707407,
}


@pytest.mark.parametrize("advantage, scale, aggregation, loss_type, mask_truncated", [
    ("grpo", "group", "seq_mean_token_mean", "grpo", False),
    ("grpo", "batch", "token_mean", "bnpo", True),
    # Rows 0, 6 and 7 are truncated: no loss tokens, still in the Dr. GRPO normaliser.
    ("dr_grpo", "none", "seq_mean_token_sum_norm", "dr_grpo", True),
])
def test_loss_equals_trls_formula(params, advantage, scale, aggregation, loss_type,
                                  mask_truncated):
  """The TRL-equivalent settings (docs/algorithms.md) give TRL's loss: TRL_LOSSES, numbers TRL
  computed on this batch (default kl_estimator k3_ratio = TRL's use_bias_correction_kl)."""
  rl_cfg = dataclasses.replace(RL, advantage=advantage, scale=scale, aggregation=aggregation,
                               beta=0.05, mask_truncated=mask_truncated)
  ref_params = jax.tree.map(lambda x: x * 0.9, params)
  state = state_lib.init_state(CFG, SGD, params)
  _, m = step.make_update(CFG, rl_cfg, None, SGD)(state, _batch(), ref_params)
  assert float(m["kl"]) > 1e-3
  want = TRL_LOSSES[loss_type, scale, mask_truncated]
  assert float(m["loss"]) == pytest.approx(want, rel=1e-5)  # float32 here: rel 1.4e-6 at most


def test_forced_tokens_carry_no_loss(params):
  """Tokens the sampler forced (Batch.forced; the thinking budget's </think>, marked by
  sampling.generate, tests/test_sampling.py) are counted and carry no loss and no KL: the update
  equals one on the same batch with them taken out of loss_mask by hand. With
  rl.loss_on_forced they count again."""
  b = _batch()
  forced = np.zeros_like(b.loss_mask)
  forced[[0, 2, 5], [P + 1, P, P + 3]] = True
  assert (b.loss_mask[forced]).all()
  b = b.replace(forced=forced)
  by_hand = b.replace(forced=None, loss_mask=b.loss_mask & ~forced)
  ref = jax.tree.map(lambda x: x * 0.9, params)
  rl_cfg = dataclasses.replace(RL, beta=0.05)
  results = {}
  for name, cfg_, batch in (("default", rl_cfg, b), ("by_hand", rl_cfg, by_hand),
                            ("loss_on_forced", dataclasses.replace(rl_cfg, loss_on_forced=True),
                             b)):
    update = step.make_update(CFG, cfg_, None, SGD)
    state, m = update(state_lib.init_state(CFG, SGD, params), batch, ref)
    results[name] = types.SimpleNamespace(state=_numpy(state), metrics=_numpy(m))
  got, want = results["default"], results["by_hand"]
  assert got.metrics["completion/forced_frac"] == pytest.approx(3 / (B * G))
  assert "completion/forced_frac" not in want.metrics
  _assert_same_step(got.state, got.metrics, want)
  np.testing.assert_allclose(got.metrics["kl"], want.metrics["kl"], rtol=1e-5)
  assert abs(results["loss_on_forced"].metrics["loss"] - got.metrics["loss"]) > 1e-4


def test_router_replay_uses_the_given_experts(params, reference):
  rl_cfg = dataclasses.replace(RL, router_replay=True)
  update = step.make_update(CFG, rl_cfg, None, SGD)
  b = _batch()
  own = model.run(params, CFG, jnp.asarray(b.tokens), jnp.asarray(b.token_mask)).experts_LBTA
  state, metrics = update(state_lib.init_state(CFG, SGD, params),
                          dataclasses.replace(b, experts=own))
  _assert_same_step(_numpy(state), _numpy(metrics), reference)  # replaying its own choices
  other = (own + 1) % CFG.num_experts
  _, metrics = update(state_lib.init_state(CFG, SGD, params), dataclasses.replace(b, experts=other))
  assert abs(float(metrics["entropy"]) - reference.metrics["entropy"]) > 1e-4


# ----------------------------------------------------------------------------- shared prompts

# The tiny preset with its thinking head and both MoE aux losses on: the shared pass must give
# the whole batch's aux losses, think spans and expert choices, not only the log-probs.
THINK_CFG = model.ModelConfig.preset("tiny", vocab_size=64, d_model=32, d_ff=32, num_layers=1,
                                     num_heads=4, num_kv_heads=2, thinking_layers=1)


def _shared_batch(cfg, B=2, G=4, P=4, TC=5, seed=0, experts=False):
  """make_batch of B left-padded prompts (different padding) and G completions each, some
  ending early, some opening (and one closing) a think span; experts from a full pass."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(6, cfg.vocab_size, (B, P)).astype(np.int32)
  prompts[0, :2] = cfg.pad_id
  completions = rng.integers(6, cfg.vocab_size, (B * G, TC)).astype(np.int32)
  completions[::2, 0] = cfg.think_start_id
  completions[2, 3] = cfg.think_end_id
  lengths = rng.integers(1, TC + 1, B * G)
  mask = np.arange(TC) < lengths[:, None]
  completions[~mask] = cfg.pad_id
  rollout = types.SimpleNamespace(tokens=completions, mask=mask, truncated=lengths == TC,
                                  experts=None, forced=None)
  batch = step.make_batch(prompts, prompts != cfg.pad_id, rollout,
                          rng.normal(size=(B, G)).astype(np.float32))
  if experts:
    out = model.run(_think_params(), cfg, batch.tokens, batch.token_mask)
    batch = batch.replace(experts=out.experts_LBTA)
  return batch


@functools.cache
def _think_params():
  return model.init_params(THINK_CFG, jax.random.key(3))


@pytest.mark.parametrize("replay", [False, True])
def test_shared_prompt_logprobs_equal_the_full_pass(replay):
  """Each prompt run once into a KV cache for its 4 rows gives the full pass's completion
  log-probs and entropies, the whole batch's MoE aux losses (prompt tokens counted per row) and
  its gradients, with a thinking head, left padding, early ends and router replay."""
  params = _think_params()
  b = _shared_batch(THINK_CFG, experts=replay)
  assert b.prompt_len == 4 and step.prompt_sharing(RLConfig(), b) == (4, 4)
  kw = dict(temperature=0.7, chunk=3, experts_LBTA=b.experts)
  full = lambda p: logprobs.token_logprobs(p, THINK_CFG, b.tokens, b.token_mask, **kw)
  shared = lambda p: logprobs.shared_prompt_logprobs(p, THINK_CFG, b.tokens, b.token_mask,
                                                     group=4, prompt_len=4, **kw)
  m = np.asarray(b.loss_mask)

  def grad_and_outputs(fn, aux_of):  # one program per pass: its outputs and a loss's gradient
    def loss(p):
      logp, entropy, out = fn(p)
      aux = aux_of(out)
      return (jnp.sum(jnp.where(m, logp, 0.0) * jnp.arange(9.0)) + aux["load_balance_loss"]
              + aux["z_loss"]), (logp, entropy, aux)
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g_full, (logp, entropy, aux) = grad_and_outputs(full, lambda o: o.aux)
  g_shared, (s_logp, s_entropy, s_aux) = grad_and_outputs(shared, lambda a: a)
  np.testing.assert_allclose(s_logp[m], logp[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s_entropy[m], entropy[m], rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(s_logp)[:, :4] == 0)
  for k in ("load_balance_loss", "z_loss", "expert_load"):
    np.testing.assert_allclose(s_aux[k], aux[k], rtol=1e-5, err_msg=k)
  assert aux["load_balance_loss"] > 1.0  # not a trivially balanced value
  chex.assert_trees_all_close(g_shared, g_full, rtol=1e-4, atol=1e-5)  # |g| up to ~3


def test_merge_aux_counts_each_part_by_its_weight():
  """Two parts with 3 and 1 real tokens in one layer, the second counted twice: every statistic
  is the token mean over 3 + 2 tokens and the load-balance loss comes from the merged ones."""
  stats = lambda load, prob, z, n: {"stats": {"expert_load": jnp.array([load]),
                                              "router_prob": jnp.array([prob]),
                                              "z_loss": jnp.array([z]), "tokens": jnp.array([n])}}
  a = stats([0.5, 0.5], [0.6, 0.4], 2.0, 3.0)
  b = stats([1.0, 0.0], [0.9, 0.1], 7.0, 1.0)
  merged = model.merge_aux([(a, 1), (b, 2)])
  np.testing.assert_allclose(merged["expert_load"], [[0.7, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(merged["stats"]["router_prob"], [[0.72, 0.28]], rtol=1e-6)
  np.testing.assert_allclose(merged["z_loss"], (3 * 2.0 + 2 * 7.0) / 5, rtol=1e-6)
  np.testing.assert_allclose(merged["load_balance_loss"], 2 * (0.7 * 0.72 + 0.3 * 0.28), rtol=1e-6)


@pytest.mark.parametrize("shape, micro, prompts", [(None, 1, 2), ((2, 2, 2, 1), 2, 4)])
def test_update_with_shared_prompts_equals_the_full_update(shape, micro, prompts):
  """rl.share_prompt (the default) against False on the same make_batch batch: the same step
  (SGD), on one device, and sharded on 8 devices over 2 micro-batches (each runs its 4 prompts
  for 2 of their 4 rows); and the shared program really is smaller (XLA's FLOP count)."""
  params = _think_params()
  b = _shared_batch(THINK_CFG, B=prompts)
  mesh = None if shape is None else sharding.make_mesh(shape)
  rl_cfg = dataclasses.replace(RL, num_micro_batches=micro, beta=0.05, max_completion_len=5)
  results, flops = [], []
  for share in (True, False):
    cfg_ = dataclasses.replace(rl_cfg, share_prompt=share)
    update = step.make_update(THINK_CFG, cfg_, mesh, SGD)
    state = state_lib.init_state(THINK_CFG, SGD, params, mesh)
    ref = jax.tree.map(lambda x: x * 0.9, params)  # a reference that differs: KL > 0
    if mesh is not None:
      ref = jax.device_put(ref, model.param_shardings(THINK_CFG, mesh))
    if shape is None and micro == 1:
      flops.append(update.lower(state, b, ref).cost_analysis()["flops"])
    results.append(_numpy(update(state, b, ref)))
  (s_state, s_m), (f_state, f_m) = results
  assert f_m["kl"] > 1e-3 and f_m["load_balance_loss"] > 0
  for k in ("loss", "pg_loss", "kl", "entropy", "grad_norm", "load_balance_loss", "z_loss"):
    np.testing.assert_allclose(s_m[k], f_m[k], rtol=2e-5, atol=1e-7, err_msg=k)
  chex.assert_trees_all_close(s_state.params, f_state.params, rtol=1e-5, atol=1e-6)
  if flops:
    assert flops[0] < 0.85 * flops[1], flops


def test_shared_prompts_need_micro_batches_that_divide_the_group():
  b = _shared_batch(THINK_CFG)  # G = 4
  rl_cfg = dataclasses.replace(RL, num_micro_batches=8)
  update = step.make_update(THINK_CFG, rl_cfg, None, SGD)
  state = state_lib.init_state(THINK_CFG, SGD, _think_params())
  with pytest.raises(ValueError, match="share_prompt=True .*num_micro_batches=8 to divide"):
    update(state, b)
  assert step.prompt_sharing(dataclasses.replace(rl_cfg, share_prompt=False), b) is None
  assert step.prompt_sharing(RL, b.replace(prompt_len=0)) is None  # rows not known to share


def test_shared_prompts_need_micro_batches_that_divide_over_the_devices():
  """2 micro-batches of 4 rows on 8 batch devices: refused with sharing (it gave a wrong
  embedding gradient), allowed without."""
  b = _shared_batch(THINK_CFG)  # 2 prompts x 4
  mesh = sharding.make_mesh((2, 2, 2, 1))
  state = state_lib.init_state(THINK_CFG, SGD, _think_params(), mesh)
  with mock.patch.object(step, "_jitted_step", return_value=lambda *args: "ran"):
    shared = step.make_update(THINK_CFG, dataclasses.replace(RL, num_micro_batches=2), mesh, SGD)
    plain = step.make_update(THINK_CFG, dataclasses.replace(RL, num_micro_batches=2,
                                                            share_prompt=False), mesh, SGD)
    assert plain(state, b) == "ran"
    with pytest.raises(ValueError, match="B\\*G/M=4 rows to divide over the 8 devices"):
      shared(state, b)
