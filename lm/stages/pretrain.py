"""Pretraining by next-token prediction: the model, data and jitted steps of one run.

`train(cfg, workdir)` is the whole job: it prepares the data, builds the mesh and the sharded
state, and hands them to the training loop (lm/training/loop.py), which trains with periodic evaluation
and checkpoints, resumes, and writes config.json, manifest.json, metrics.jsonl, TensorBoard
events and summary.json into workdir. Optimiser and schedules: lm/training/optim.py.
"""
import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.model import attention as attention_lib
from lm.training import checkpoint as ckpt_lib
from lm.data import tokens as data_lib
from lm.eval import evaluate as evaluate_lib
from lm.model import flops as flops_lib
from lm import host
from lm.training import loop
from lm.model import transformer as model_lib
from lm import runs
from lm.model import sharding as shard_lib
from lm.eval import tasks as tasks_lib
from lm.config import ModelConfig
from lm.errors import UserError
# TrainConfig, the schedules and the optimizer live in lm/training/optim.py (train.TrainConfig and
# train.make_optimizer stay reachable here for callers that build a training step).
from lm.training.optim import TrainConfig, make_optimizer


def _logits(mc: ModelConfig, params, batch_BT1, rng):
  inputs, targets = batch_BT1[:, :-1], batch_BT1[:, 1:]
  deterministic = rng is None or mc.dropout == 0
  return model_lib.apply(mc, params, inputs, deterministic=deterministic,
                         rngs=None if deterministic else {'dropout': rng}), targets


def next_token_loss(mc: ModelConfig, params, batch_BT1, rng=None):
  """Mean next-token cross-entropy (float32) of windows [B, T+1]."""
  logits, targets = _logits(mc, params, batch_BT1, rng)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def next_token_losses(mc: ModelConfig, params, batch_BT1, rng=None):
  """(mean cross-entropy, mean squared log-partition logsumexp(logits)^2) of windows [B, T+1]."""
  return cross_entropy_and_z(*_logits(mc, params, batch_BT1, rng))


def cross_entropy_and_z(logits_BTV, targets_BT):
  """(mean cross-entropy, mean logsumexp^2) in float32. The second is what z-loss penalises
  (PaLM, Chowdhery et al. 2022): it pulls the log-partition towards 0 so that the logits do not
  drift, which matters for bfloat16."""
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return (lse - picked).mean(), (lse * lse).mean()


def make_train_step(mc: ModelConfig, tc: TrainConfig, optimizer, seed: int):
  """(state, batch [B, T+1]) -> (state, metrics); micro-batches (train.grad_accum, or on a CPU
  train.micro_batch_tokens) are averaged. With train.z_loss > 0 the loss gains z_loss x the mean
  squared log-partition, logged beside it as `z_loss` (the penalty's own value)."""
  if tc.z_loss:
    def loss(p, _, b, r):
      ce, lse_sq = next_token_losses(mc, p, b, r)
      z = tc.z_loss * lse_sq
      return ce + z, (jnp.ones(()), {'z_loss': z})
  else:
    loss = lambda p, _, b, r: (next_token_loss(mc, p, b, r), jnp.ones(()))
  step = loop.make_step(loss, tc, optimizer, seed, row_wise=True)
  return lambda state, batch: step(state, None, batch)


@dataclasses.dataclass
class Run:
  """Everything the loop, the evaluation and the tests need about one configured run."""
  cfg: dict
  model: ModelConfig
  train: TrainConfig
  dataset: Any
  mesh: Any
  state_shardings: Any
  abstract_state: Any
  init_state: Any
  train_step: Any
  eval_step: Any
  optimizer: Any
  n_params: dict
  flops_per_token: dict
  eval_data: Any = None
  attention_why: str = ''   # why the attention implementation was chosen (manifest.json)


def build(cfg, vocab_size: int = 0) -> Run:
  """Data, model, mesh, optimizer and jitted steps for a config (no state is created yet).

  vocab_size > 0 builds everything but the data (Run.dataset is None): the benchmarks time a
  config's own step on random tokens without preparing its corpus."""
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train)
  tasks_lib.resolve(tc.eval_tasks)   # an unknown task name is refused before any work
  mesh_cfg = shard_lib.MeshConfig.from_config(cfg.mesh)
  shard_lib.maybe_initialize_distributed(mesh_cfg)
  # Before the data: a bad mesh fails in a second.
  mesh = shard_lib.make_mesh(mesh_cfg, batch_size=tc.batch_size)
  if cfg.model.attention_impl == 'cudnn':   # an impossible explicit choice, before the data
    attention_lib.choose_implementation('cudnn', cfg.model.dtype, jax.default_backend(),
                                        cfg.model.d_model // cfg.model.n_heads, cfg.model.pos)
  dataset = None if vocab_size else data_lib.prepare(data_lib.DataConfig.from_config(cfg.data))
  mc = ModelConfig.from_config(cfg.model, vocab_size or dataset.tokenizer.vocab_size)
  impl, why = attention_lib.choose_implementation(mc.attention_impl, mc.dtype,
                                                    jax.default_backend(), mc.head_dim, mc.pos)
  mc = dataclasses.replace(mc, attention_impl=impl)
  tc.check_fits(mc.max_len)
  shard_lib.check_divisibility(mesh, mc, tc.batch_size)
  if dataset is not None:
    dataset.check(tc.batch_size, tc.seq_len, jax.process_count())

  param_shapes = model_lib.param_shapes(mc)
  p_shard = shard_lib.param_shardings(mesh, model_lib.logical_specs(mc), param_shapes)
  optimizer = make_optimizer(tc, param_shapes, model=mc)

  def init_state(rng):
    return loop.new_state(model_lib.init_params(mc, rng), optimizer)
  state_shapes = jax.eval_shape(init_state, jax.random.PRNGKey(0))
  s_shard = shard_lib.state_shardings(mesh, state_shapes, p_shard)
  s_shard['params'] = p_shard
  batch_sh = shard_lib.batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  init_fn = jax.jit(init_state, out_shardings=s_shard)
  if tc.init_from:   # continued pretraining: the init run's weights, a fresh optimizer, step 0
    start = jax.jit(lambda p: loop.new_state(p, optimizer), out_shardings=s_shard)
    init_fn = lambda _: start(_init_params(tc.init_from, mc))
  pinned = lambda fn: shard_lib.with_activation_constraints(fn, mesh)
  train_step = jax.jit(pinned(make_train_step(mc, tc, optimizer, seed)),
                       in_shardings=(s_shard, batch_sh), out_shardings=(s_shard, replicated),
                       donate_argnums=0)
  eval_step = jax.jit(pinned(lambda p, b: next_token_loss(mc, p, b)),
                      in_shardings=(p_shard, batch_sh), out_shardings=replicated)
  counts = flops_lib.param_counts(param_shapes)
  return Run(cfg=cfg.to_dict(), model=mc, train=tc, dataset=dataset, mesh=mesh,
             state_shardings=s_shard, abstract_state=ckpt_lib.abstract(state_shapes, s_shard),
             init_state=init_fn, train_step=train_step, eval_step=eval_step,
             optimizer=optimizer, n_params=counts,
             flops_per_token=flops_lib.flops_per_token(mc, tc.seq_len, counts['total'],
                                                       counts['nonembed']),
             attention_why=why)


def get_batch(run: Run, split: str, index: int):
  """The global batch `index` of a split, placed with the batch sharding."""
  tc = run.train
  rows = run.dataset.batch(split, index, tc.batch_size, tc.seq_len, seed=int(run.cfg['seed']),
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  return shard_lib.global_batch(rows, run.mesh)


def evaluate_loss(run: Run, params) -> float:
  """Mean loss over the fixed validation batches (the same windows at every evaluation)."""
  tc = run.train
  if run.eval_data is None:
    rows = run.dataset.eval_batches(tc.eval_batches, tc.batch_size, tc.seq_len,
                                    jax.process_index(), jax.process_count())
    run.eval_data = [shard_lib.global_batch(r, run.mesh) for r in rows]
  losses = shard_lib.map_bounded(lambda b: run.eval_step(params, b), run.eval_data)
  return float(np.mean(jax.device_get(losses)))


def manifest(run: Run) -> dict:
  mc = run.model
  return {
      **host.device_manifest(run.mesh), 'data': run.dataset.info,
      'params': run.n_params['total'], 'params_nonembed': run.n_params['nonembed'],
      'flops_per_token': {'chinchilla_appendix_f': run.flops_per_token['chinchilla'],
                          '6n': run.flops_per_token['6n'],
                          'model_palm_causal': run.flops_per_token['model']},
      'flops_convention': 'flops = Chinchilla App. F count (3x forward, embeddings, attention '
                          'and logits included); flops_6nd = 6 * N_total * tokens; mfu = '
                          'model FLOPs (6 N_nonembed + 6 L d_attn T per token: PaLM App. B with '
                          'the causal half of attention) / peak; mfu_appf = App. F count / peak',
      'model': dataclasses.asdict(mc), 'head_dim': mc.head_dim,
      'attention': {'requested': run.cfg['model']['attention_impl'], 'used': mc.attention_impl,
                    'why': run.attention_why},
      'epochs': run.dataset.epochs(run.train.steps, run.train.batch_size, run.train.seq_len),
      # A mixture: per source its tokens, the tokens the run draws and the epochs they make.
      **({'sources': run.dataset.draws(run.train.steps, run.train.batch_size, run.train.seq_len)}
         if hasattr(run.dataset, 'draws') else {}),
  }


def eval_row(loss: float, bytes_per_token: float | None) -> dict:
  """An evaluation row's fields from the mean validation loss (nats per token)."""
  row = {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 50))}
  if bytes_per_token:
    row['eval_bpb'] = loss / (math.log(2) * bytes_per_token)
  return row


def stage(run: Run) -> loop.Stage:
  """Pretraining as a stage of the one training loop (lm/training/loop.py)."""
  tc = run.train
  bpt = run.dataset.bytes_per_token('val')
  task_eval = evaluate_lib.loop_tasks(tc, run.model, run.dataset.tokenizer, int(run.cfg['seed']))

  def evaluate(params, _):
    return eval_row(evaluate_loss(run, params), bpt)
  return loop.Stage(
      config=json.loads(json.dumps(run.cfg)), train=tc, dtype=run.model.dtype,
      manifest=lambda: manifest(run), tokenizer=run.dataset.tokenizer,
      abstract_state=run.abstract_state,
      init_state=lambda: run.init_state(jax.random.PRNGKey(int(run.cfg['seed']))), frozen=None,
      train_step=lambda state, _, batch: run.train_step(state, batch),
      batch=lambda step: get_batch(run, 'train', step), evaluate=evaluate,
      tokens_per_step=tc.batch_size * tc.seq_len, flops_per_token=run.flops_per_token,
      n_params=run.n_params, task_eval=task_eval)


def _init_params(init_from: str, mc: ModelConfig):
  _, params, _, _ = runs.load_model(init_from)
  shapes = model_lib.param_shapes(mc)
  if jax.tree.map(lambda x: x.shape, params) != jax.tree.map(lambda x: x.shape, shapes):
    raise UserError(f'the weights of train.init_from={init_from} do not fit the model this run '
                    'builds (the init run changed meanwhile?); start from a finished run.')
  return jax.tree.map(lambda x, s: x.astype(s.dtype), params, shapes)   # model.param_dtype


def with_init_from(cfg):
  """cfg with the model and tokenizer of the run named by train.init_from (if any).

  Continued pretraining keeps the init run's shape and tokenizer: the model section is replaced
  by the init run's (dropout, dtype, param_dtype, remat and attention_impl may still be set
  here), and the data section reads the init run's tokenizer (data.tokenizer=file).
  """
  init_from = cfg.train.get('init_from', '')
  if not init_from:
    return cfg
  src = runs.read_config(init_from)
  tok_dir = os.path.join(init_from, 'tokenizer')
  tokenizer = runs.load_tokenizer(init_from)   # refuses a run without a readable one
  if runs.kind(src) == 'reward':
    raise UserError(f'train.init_from={init_from} is a reward model; start from a language model.')
  model = dict(src['model'] if runs.kind(src) == 'pretrain' else src['base']['model'])
  cfg = cfg.copy_and_resolve_references()
  keep = {k: cfg.model[k] for k in ('dropout', 'dtype', 'param_dtype', 'remat', 'attention_impl')}
  with cfg.unlocked():
    for k in list(cfg.model.keys()):
      if k in model:
        cfg.model[k] = model[k]
    cfg.model.update(keep)
    cfg.model.vocab_size = int(model.get('vocab_size') or tokenizer.vocab_size)
    cfg.model.n_kv_heads = int(model.get('n_kv_heads') or model['n_heads'])
    cfg.data.tokenizer = 'file'
    cfg.data.tokenizer_path = os.path.abspath(tok_dir)
  return cfg


def train(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Trains (or resumes) the run in workdir; returns the summary. `stop_at` simulates a kill."""
  cfg = with_init_from(cfg)
  loop.check_config(workdir, json.loads(cfg.to_json()))   # refuse before preparing any data
  run = build(cfg)  # first jax work: it joins a multi-host job, which must precede any other
  return loop.run(stage(run), workdir, stop_at)
