"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from the pairs alone.

For a pair (prompt x, chosen y_w, rejected y_l), with the SFT model as the frozen reference,

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

where log pi(y|x) sums the response tokens' log-probabilities (the end-of-turn marker included).
beta * (log pi - log ref) is the policy's implicit reward; the logged 'accuracy' is the share of
pairs whose chosen response has the larger implicit reward and 'margin' the mean difference.
At step 0 the policy is the reference, so the loss is exactly log 2.

dpo.sft_weight > 0 adds a ("RPO") term: that weight times the chosen response's negative
log-likelihood per token (Pang et al. 2024, "Iterative Reasoning Preference Optimization"). Plain
DPO only widens the margin, and often by lowering the chosen response's likelihood along with the
rejected one, which moves probability onto responses neither side of any pair contains; the NLL
term keeps the chosen responses likely.

Pairs come from dpo.pairs (a JSONL, e.g. the reward model's pairs.jsonl: offline DPO on the SFT
policy's samples) or, with dpo.pairs empty, are sampled here from the starting policy on the code
task's training headers and labelled by the gold program with dpo.noise label noise, as run.py
reward does (written to pairs.jsonl in the workdir, read back on a rerun). Started from a finished
DPO run, that is a round of iterative ("online") DPO (Xu et al. 2023, "Some things are more CRINGE
than others"; Guo et al. 2024): the new pairs are the current policy's own samples, so they hold
the mistakes it still makes, and the starting policy is the new round's reference. The
evaluation's KL is always to the SFT model the chain of runs began from.

Losses (dpo.loss). With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), the
summed response log-probabilities as above:

  dpo    -log sigmoid(beta h) (with dpo.label_smoothing, the conservative form).
  ipo    (h - 1 / (2 beta))^2: IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand
         Learning from Human Preferences"). A squared loss towards a finite target: a pair
         past it is pulled back (DPO's logistic loss keeps rewarding a wider margin, and on
         deterministic preferences drives it to infinity). Here h is of summed response
         log-probabilities, exactly DPO's h (not a per-token average).
  simpo  -log sigmoid(simpo_beta (avg log pi(y_w) - avg log pi(y_l)) - simpo_gamma): SimPO (Meng
         et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward"), where
         avg log pi(y) is the summed log-probability over the number of response tokens (the
         end-of-turn marker included). No reference: its log-probabilities are not computed (the
         batches carry zeros in their place). simpo_beta has its own key because the values the
         paper uses (2 to 10) are far from DPO's beta (0.1).

Every loss logs the same metrics of its implicit rewards: beta (log pi - log ref) for dpo and
ipo (IPO's optimum is a margin of 1/2 on that scale), simpo_beta * avg log pi for simpo.
'accuracy' is the share of pairs whose chosen response has the larger one, 'margin' the mean of
chosen minus rejected (SimPO's gamma not subtracted).

Replay (dpo.replay_fraction = f > 0): every step adds n_r = round(f 2B / (1 - f)) windows of
train.seq_len + 1 tokens from the pretraining corpus of the SFT run's chain (lm/data/replay.py),
so that f is the replay share of the step's sequences (2B of them are the B pairs' rows), and
the loss is the mean pair loss plus the mean next-token NLL over every replay token (weight 1);
'pair_loss' and 'replay_loss' are logged apart. The windows of a step are a pure function of the
step, so a resumed run continues exactly.

LoRA (lora.rank > 0, common.PolicyLora): the train state holds the adapters alone; the starting
policy's weights are the stage's frozen input, with the adapters the policy and without them the
reference (whose log-probabilities are computed once, as above). config.json's base.model is the
adapted model, so runs.load_model reads the run as its adapters merged into the starting policy;
the evaluation samples the merged weights.

The reference log-probabilities never change, so they are computed once for every pair before
training and travel with the batches: the reference is never held in the train state and costs
no forward pass per step. `train_dpo(cfg, workdir)` runs through the one training loop
(lm/training/loop.py); the evaluation samples the policy on held-out prompts for its gold reward, its KL to
the reference and (with dpo.reward_from) the reward model's score.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm.model import flops as flops_lib
from lm import lock as lock_lib
from lm.training import loop
from lm import runs
from lm.align import common
from lm.align import pairs as pairs_lib
from lm.data import replay as replay_lib
from lm.config import read_section
from lm.model import lora as lora_lib
from lm.errors import UserError
from lm.training.optim import TrainConfig, make_optimizer
from lm.align import reward as reward_lib

PAIRS = 'pairs.jsonl'      # on-policy pairs sampled by the run itself (dpo.pairs empty)
LOSSES = ('dpo', 'ipo', 'simpo')



@dataclasses.dataclass(frozen=True)
class DpoConfig:
  """The `dpo` section (keys and meanings: configs/dpo.py)."""
  init_from: str
  pairs: str
  eval_pairs: str
  beta: float
  label_smoothing: float
  sft_weight: float
  samples_per_prompt: int
  pairs_per_prompt: int
  noise: float
  reward_from: str
  eval_prompts: int
  eval_samples: int
  max_new_tokens: int
  temperature: float
  sample_batch: int
  loss: str
  simpo_beta: float
  simpo_gamma: float
  replay_fraction: float

  @classmethod
  def from_config(cls, s) -> 'DpoConfig':
    c = cls(**read_section(cls, s, 'dpo', defaults={
        'sft_weight': 0.0, 'samples_per_prompt': 8, 'pairs_per_prompt': 4, 'noise': 0.1,
        'loss': 'dpo', 'simpo_beta': 2.0, 'simpo_gamma': 1.0, 'replay_fraction': 0.0}))
    if not c.init_from:
      raise UserError('dpo.init_from is empty; name the SFT run to start from, e.g. '
                      '--config.dpo.init_from=runs/sft_code.')
    if c.loss not in LOSSES:
      raise UserError(f"dpo.loss={c.loss!r} is not a preference loss; use one of "
                      f"{', '.join(LOSSES)}.")
    if not 0 <= c.noise < 0.5:
      raise UserError(f'dpo.noise={c.noise} must be in [0, 0.5) (the share of flipped labels).')
    if c.samples_per_prompt < 2 or c.pairs_per_prompt < 1:
      raise UserError(f'dpo.samples_per_prompt={c.samples_per_prompt} must be at least 2 and '
                      f'dpo.pairs_per_prompt={c.pairs_per_prompt} at least 1.')
    if not c.beta > 0:
      raise UserError(f'dpo.beta={c.beta} must be positive (it scales the implicit reward).')
    if not 0 <= c.label_smoothing < 0.5:
      raise UserError(f'dpo.label_smoothing={c.label_smoothing} must be in [0, 0.5) (the share '
                      'of labels assumed flipped).')
    if c.label_smoothing and c.loss == 'ipo':
      raise UserError(f'dpo.label_smoothing={c.label_smoothing} has no meaning for IPO\'s squared '
                      'loss; set it to 0 with dpo.loss=ipo.')
    if not c.simpo_beta > 0:
      raise UserError(f'dpo.simpo_beta={c.simpo_beta} must be positive (it scales SimPO\'s '
                      'length-normalised reward).')
    if not c.simpo_gamma >= 0:
      raise UserError(f'dpo.simpo_gamma={c.simpo_gamma} must be >= 0 (SimPO\'s target margin).')
    if not 0 <= c.replay_fraction < 1:
      raise UserError(f'dpo.replay_fraction={c.replay_fraction} must be in [0, 1): the share of '
                      'each step\'s sequences taken from the pretraining corpus (0: no replay).')
    if c.sft_weight < 0:
      raise UserError(f'dpo.sft_weight={c.sft_weight} must be >= 0 (0: plain DPO).')
    for key in ('eval_prompts', 'eval_samples', 'max_new_tokens', 'sample_batch'):
      if getattr(c, key) < 1:
        raise UserError(f'dpo.{key}={getattr(c, key)} must be a positive integer.')
    if not c.temperature > 0:
      raise UserError(f'dpo.temperature={c.temperature} must be positive.')
    return c

  def objective(self) -> dict:
    """pair_loss's keyword arguments for this section's loss."""
    return {'beta': self.beta, 'label_smoothing': self.label_smoothing,
            'sft_weight': self.sft_weight, 'loss': self.loss, 'simpo_beta': self.simpo_beta,
            'simpo_gamma': self.simpo_gamma}


def replay_rows(batch_size: int, fraction: float) -> int:
  """Replay windows per step: round(f 2B / (1 - f)), so that they are the share f of the step's
  sequences (the B pairs give 2B); refused when a positive share rounds to none."""
  n = int(round(fraction * 2 * batch_size / (1 - fraction)))
  if fraction > 0 and n < 1:
    raise UserError(f'dpo.replay_fraction={fraction} of a step of train.batch_size={batch_size} '
                    'pairs gives no replay row; raise the share or the batch.')
  return n


def dpo_loss_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                   label_smoothing: float = 0.0):
  """(per-pair loss, implicit reward of chosen, of rejected) from summed log-probabilities.

  label_smoothing e > 0 is conservative DPO (Mitchell 2023): each label is taken to be wrong with
  probability e, loss = (1 - e) (-log sigmoid(m)) + e (-log sigmoid(-m)) for the margin m.
  """
  r_w = beta * (policy_chosen - ref_chosen)
  r_l = beta * (policy_rejected - ref_rejected)
  return common.preference_loss(r_w - r_l, label_smoothing), r_w, r_l


def ipo_loss_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float):
  """IPO's (per-pair loss, implicit reward of chosen, of rejected) from summed log-probabilities:
  (h - 1 / (2 beta))^2 with h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)); the
  rewards are DPO's, beta (log pi - log ref), whose margin beta h the loss pulls to 1/2."""
  h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
  return (h - 1 / (2 * beta)) ** 2, beta * (policy_chosen - ref_chosen), beta * (
      policy_rejected - ref_rejected)


def simpo_loss_terms(policy_chosen, policy_rejected, len_chosen, len_rejected, beta: float,
                     gamma: float, label_smoothing: float = 0.0):
  """SimPO's (per-pair loss, reward of chosen, of rejected): reward r = beta * (summed
  log-probability / response tokens), loss -log sigmoid(r_w - r_l - gamma) (label-smoothed as
  DPO's). No reference."""
  r_w = beta * policy_chosen / len_chosen
  r_l = beta * policy_rejected / len_rejected
  return common.preference_loss(r_w - r_l - gamma, label_smoothing), r_w, r_l


def loss_terms(loss: str, logp_w, logp_l, ref_w, ref_l, len_w, len_l, beta: float,
               label_smoothing: float = 0.0, simpo_beta: float = 2.0, simpo_gamma: float = 1.0):
  """(per-pair loss, reward of chosen, of rejected) of one of LOSSES (module docstring)."""
  if loss == 'dpo':
    return dpo_loss_terms(logp_w, logp_l, ref_w, ref_l, beta, label_smoothing)
  if loss == 'ipo':
    return ipo_loss_terms(logp_w, logp_l, ref_w, ref_l, beta)
  if loss == 'simpo':
    return simpo_loss_terms(logp_w, logp_l, len_w, len_l, simpo_beta, simpo_gamma,
                            label_smoothing)
  raise UserError(f"dpo.loss={loss!r} is not a preference loss; use one of {', '.join(LOSSES)}.")


def pair_loss(mc, params, batch, beta: float, label_smoothing: float = 0.0,
              sft_weight: float = 0.0, loss: str = 'dpo', simpo_beta: float = 2.0,
              simpo_gamma: float = 1.0, base=None):
  """(loss sum, (pairs, metric sums)) of a batch of chosen then rejected rows (a LoRA policy:
  params are its adapters on `base`)."""
  logp = common.sequence_logprob(mc, params, batch, base=base)
  B = logp.shape[0] // 2
  lengths = jnp.maximum(jnp.sum(batch['mask'], axis=-1), 1.0)
  per_pair, r_w, r_l = loss_terms(loss, logp[:B], logp[B:], batch['ref'][:B], batch['ref'][B:],
                                  lengths[:B], lengths[B:], beta, label_smoothing, simpo_beta,
                                  simpo_gamma)
  w = batch['weight'][:B]
  nll = -logp[:B] / lengths[:B]
  if sft_weight:
    per_pair = per_pair + sft_weight * nll
  return jnp.sum(per_pair * w), (jnp.sum(w), {
      'accuracy': jnp.sum((r_w > r_l) * w), 'margin': jnp.sum((r_w - r_l) * w),
      'reward_chosen': jnp.sum(r_w * w), 'reward_rejected': jnp.sum(r_l * w),
      'chosen_nll': jnp.sum(nll * w)})


def replay_nll(mc, params, windows, base=None):
  """Mean next-token NLL over every token of replay windows [n, seq_len + 1]."""
  return -jnp.mean(common.token_logprobs(mc, params, windows, 1.0, base))


def step_loss(mc, params, batch, base=None, **objective):
  """The training loss: pair_loss, plus (a batch with 'replay' windows) the replay tokens' mean
  NLL times the pairs' weight, so that the loop's division gives mean pair loss + replay NLL;
  'pair_loss' and 'replay_loss' are reported apart."""
  total, (w, metrics) = pair_loss(mc, params, batch, base=base, **objective)
  if 'replay' not in batch:
    return total, (w, metrics)
  r = replay_nll(mc, params, batch['replay'], base)
  metrics = dict(metrics, pair_loss=total, replay_loss=r * w)
  return total + r * w, (w, metrics)


def _reference_logprobs(mc, params, rows: dict, batch: int) -> np.ndarray:
  return common.batched(lambda r: common.jit_sequence_logprob(params, r, mc=mc), rows, batch)


def _with_reference(dc: DpoConfig, policy, rows: dict, batch: int) -> dict:
  """Rows with 'ref', the starting policy's summed log-probabilities (zeros for SimPO, which
  has no reference: the batches keep one layout)."""
  for side in ('chosen', 'rejected'):
    if dc.loss == 'simpo':
      rows[side]['ref'] = np.zeros(len(rows[side]['tokens']), np.float32)
    else:
      rows[side]['ref'] = _reference_logprobs(policy.mc, policy.params, rows[side], batch)
  return rows


def _pairs(dc: DpoConfig, tc: TrainConfig, policy, workdir: str, seed: int):
  """The training pairs (a file, or sampled on-policy into the workdir once) and the held-out
  ones, as rows with the reference policy's log-probabilities: (pairs path, sampling info,
  training pairs, pairs dropped as too long, rows, held-out rows or None)."""
  tok, B = policy.tokenizer, tc.batch_size
  pairs_path, sampled = dc.pairs, None
  if not pairs_path:            # on-policy pairs from the starting policy (module docstring)
    pairs_path = os.path.join(workdir, PAIRS)
    if not os.path.exists(pairs_path):
      _, sampled = pairs_lib.sample_to_file(
          pairs_path, policy, common.task_prompts('train'), 'train', 'dpo',
          dc.samples_per_prompt, dc.noise, dc.max_new_tokens, dc.temperature, seed,
          dc.sample_batch, dc.pairs_per_prompt)
  train_pairs, dropped = pairs_lib.fitting(tok, pairs_lib.read_pairs(pairs_path), tc.seq_len)
  if not train_pairs:
    raise UserError(f'every pair of {pairs_path} is longer than train.seq_len={tc.seq_len} '
                    'tokens.')
  rows = _with_reference(dc, policy, pairs_lib.pair_rows(tok, train_pairs, tc.seq_len), 2 * B)
  eval_rows = None
  if dc.eval_pairs:
    ev, _ = pairs_lib.fitting(tok, pairs_lib.read_pairs(dc.eval_pairs), tc.seq_len)
    eval_rows = _with_reference(dc, policy, pairs_lib.pair_rows(tok, ev, tc.seq_len), 2 * B)
  return pairs_path, sampled, train_pairs, dropped, rows, eval_rows


def _held_out_pairs(eval_loss, params, base, eval_rows: dict, stack, B: int) -> dict:
  """The pair loss, accuracy and margin over the held-out pairs, in batches of B."""
  n = len(eval_rows['chosen']['tokens'])
  sums = np.zeros(3)
  for i in range(0, n, B):
    idx = np.arange(i, min(i + B, n))
    b = stack(eval_rows, idx)
    if len(idx) < B:   # pad to the compiled batch with weight-0 pairs
      pad = np.zeros(B - len(idx), int)
      b = stack(eval_rows, np.concatenate([idx, pad]))
      b['weight'][len(idx):B] = 0.0
      b['weight'][B + len(idx):] = 0.0
    total, (w, m) = eval_loss(params, base, b)
    sums += [float(total), float(m['accuracy']), float(m['margin'])]
  return {'eval_pair_loss': sums[0] / n, 'eval_pair_accuracy': sums[1] / n,
          'eval_pair_margin': sums[2] / n}


def build(cfg, workdir: str) -> loop.Stage:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'dpo')
  dc = DpoConfig.from_config(cfg.dpo)
  n_replay = replay_rows(tc.batch_size, dc.replay_fraction)
  if n_replay % tc.grad_accum:
    raise UserError(f'the {n_replay} replay rows of a step (dpo.replay_fraction='
                    f'{dc.replay_fraction}) do not divide into train.grad_accum={tc.grad_accum} '
                    'micro-batches; choose a share or grad_accum whose counts divide.')
  policy, mc, lc = common.stage_policy(cfg, dc.init_from, 'DPO')
  tok = policy.tokenizer
  tc.check_fits(policy.mc.max_len, "the SFT model's max_len")
  rm = None
  if dc.reward_from:
    rm = reward_lib.load(dc.reward_from)
    common.check_compatible(policy, rm.mc, rm.tokenizer, 'reward model')
  replay = None
  if n_replay:
    replay = replay_lib.Replay(runs.pretrain_corpus(dc.init_from, tok), n_replay, tc.seq_len, seed)
  config = json.loads(cfg.to_json())
  config['base'] = common.base_identity(policy)
  config['base']['model'] = json.loads(json.dumps(dataclasses.asdict(mc)))
  loop.check_config(workdir, config)

  pairs_path, sampled, train_pairs, dropped, rows, eval_rows = _pairs(dc, tc, policy, workdir,
                                                                     seed)
  B = tc.batch_size
  n_pairs = len(train_pairs)

  keys = ('tokens', 'mask', 'last', 'ref')
  stack = lambda r, idx: pairs_lib.stack(r, idx, keys)

  def batch(step: int) -> dict:
    idx = common.epoch_indices(step, B, n_pairs, seed, 0xD70)
    b = stack(rows, np.asarray(idx))
    if replay is not None:
      b['replay'] = replay.windows(step)
    return jax.device_put(b)

  def init_params():
    return common.init_adapters(mc, seed) if lc.rank else policy.params
  shapes = jax.eval_shape(init_params)
  optimizer = make_optimizer(tc, shapes, model=mc)
  init_state, abstract_state = common.initial_state(init_params, optimizer)
  frozen = policy.params if lc.rank else None   # the adapters' base (and the reference)
  objective = dc.objective()
  train_step = jax.jit(loop.make_step(lambda p, base, b, r: step_loss(mc, p, b, base, **objective),
                                      tc, optimizer, seed), donate_argnums=0)
  held_out = dict(objective, sft_weight=0.0)     # the preference loss alone
  eval_loss = jax.jit(lambda p, base, b: pair_loss(mc, p, b, base=base, **held_out))
  root, kl_ref = common.kl_reference(policy, dc.init_from)
  evaluator = common.Evaluator(common.task_prompts('eval', dc.eval_prompts), kl_ref, rm,
                               tc.seq_len, dc.max_new_tokens, dc.temperature, dc.sample_batch,
                               samples=dc.eval_samples, seed=seed + 77)

  def evaluate(params, base) -> dict:
    out = evaluator.evaluate(common.merged_policy(mc, params, base))
    if eval_rows is not None:
      out.update(_held_out_pairs(eval_loss, params, base, eval_rows, stack, B))
    return out

  n = flops_lib.param_counts(policy.params)
  fpt = flops_lib.flops_per_token(policy.mc, tc.seq_len, n['total'], n['nonembed'])
  info = {'pairs': pairs_path, 'train_pairs': n_pairs, 'dropped_too_long': dropped,
          'loss': dc.loss, 'beta': dc.beta, 'label_smoothing': dc.label_smoothing,
          'sft_weight': dc.sft_weight, 'kl_reference': root, 'mode': 'lora' if lc.rank else 'full',
          'trainable_params': lora_lib.tree_size(shapes)}
  if dc.loss == 'simpo':
    info.update(simpo_beta=dc.simpo_beta, simpo_gamma=dc.simpo_gamma)
  if replay is not None:
    info['replay'] = dict(replay.info(), fraction=dc.replay_fraction)
  if sampled is not None:
    info['sampling'] = sampled

  def summary(last: dict) -> dict:
    return {'dpo': {**info, 'after': last}}

  return loop.Stage(
      config=config, train=tc, dtype=policy.mc.dtype,
      manifest=lambda: common.manifest(policy, n, {'dpo': info}), tokenizer=tok,
      abstract_state=abstract_state, init_state=init_state, frozen=frozen, train_step=train_step,
      batch=batch, evaluate=evaluate, tokens_per_step=(2 * B + n_replay) * tc.seq_len,
      flops_per_token=fpt, n_params=n, summary=summary)


def train_dpo(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) DPO in workdir; returns the summary."""
  with lock_lib.hold(workdir):   # build may write the sampled pairs before the loop starts
    return loop.run(build(cfg, workdir), workdir, stop_at)
