"""Fine-tuning a trained run: supervised / instruction tuning, fully or with LoRA adapters.

`finetune(cfg, workdir)` loads the model named by finetune.init_from (a pretraining run, or an
earlier fine-tuning run, finished or resumable), builds the examples (the built-in instruction set
of lm/data/instruct.py, or the user's JSONL), and trains them through the one training loop
(lm/training/loop.py) with the masked, packed loss of lm/data/sft.py. What trains:

  * full fine-tuning (lora.rank = 0): the train state holds every parameter;
  * LoRA (lora.rank > 0): the train state holds the adapters alone and the base parameters are the
    loop's frozen input, so gradients and optimizer moments exist only for the adapters and the
    base is held once. Checkpoints hold the adapters; config.json names the base run, its step
    and a hash of its parameters, and a resume with a changed base is refused.

Evaluation (every train.eval_every steps and at the end): the loss on held-out examples, the
pretraining corpus's validation loss (forgetting), and for the built-in set the exact-match
accuracy per task family by greedy decoding with the KV cache, on held-out instances in training
phrasings ('eval') and in phrasings never trained on ('eval_phrasing'). The base model's numbers
are measured once before training (base_eval.json) and reported beside the final ones.

`merge(workdir, out)` writes a LoRA run as a plain model folder (lm/runs.py reads every kind of
run, a LoRA run merged in memory).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np

from lm.training import checkpoint as ckpt_lib
from lm.model import flops as flops_lib
from lm import host
from lm.data import instruct
from lm.data import code_task
from lm.model import lora as lora_lib
from lm import lock as lock_lib
from lm.training import loop
from lm import metrics as metrics_lib
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample as sample_lib
from lm.data import replay as replay_lib
from lm.data import sft
from lm.model import sharding as shard_lib
from lm.stages import pretrain as train_lib
from lm.config import LORA_TARGETS, ModelConfig, read_section
from lm.errors import UserError
from lm.training.optim import TrainConfig, make_optimizer

BASE_EVAL = 'base_eval.json'
BASE_EVAL_FIX = 'delete it and rerun run.py finetune there to measure the base model again'
MIXED = 'builtin+code'   # finetune.data: the instruction set and the code-body task together
# Keys of a fine-tuning config that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = loop.RESUMABLE_CHANGES + ('finetune.eval_batch_size',)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """The `finetune` and `lora` sections (keys and meanings: configs/sft.py)."""
  init_from: str
  data: str
  eval_data: str
  families: tuple
  train_per_family: int
  eval_per_family: int
  data_seed: int
  max_new_tokens: int
  eval_batch_size: int
  lora_rank: int
  lora_alpha: float
  lora_dropout: float
  lora_targets: tuple
  lora_train_tokens: str
  lora_b_lr_ratio: float
  replay_fraction: float = 0.0

  @classmethod
  def from_config(cls, cfg) -> 'FinetuneConfig':
    lora = read_section(cls, cfg.lora, 'lora', prefix='lora_',
                        defaults={'train_tokens': '', 'b_lr_ratio': 1.0})
    c = cls(**read_section(cls, cfg.finetune, 'finetune', skip='lora_'), **lora)
    if not c.init_from:
      raise UserError('finetune.init_from is empty; point it at a trained run, e.g. '
                      '--config.finetune.init_from=runs/base_small.')
    if c.lora_rank < 0:
      raise UserError(f'lora.rank={c.lora_rank} must be >= 1 for LoRA, or 0 for full '
                      'fine-tuning.')
    for key in ('train_per_family', 'eval_per_family', 'max_new_tokens', 'eval_batch_size'):
      if getattr(c, key) < 1:
        raise UserError(f'finetune.{key}={getattr(c, key)} must be a positive integer.')
    if c.data in ('builtin', MIXED):
      for fam in c.families:
        if fam not in instruct.FAMILIES:
          raise UserError(f"finetune.families names {fam!r}, which is not a built-in task family; "
                          f"use some of {', '.join(instruct.FAMILIES)}.")
      if not c.families:
        raise UserError('finetune.families is empty; name at least one built-in task family.')
    if not 0 <= c.replay_fraction < 1:
      replay_lib.split(1, c.replay_fraction)   # refuses the value in one sentence
    if not c.lora_b_lr_ratio > 0:
      raise UserError(f'lora.b_lr_ratio={c.lora_b_lr_ratio} must be positive (1 trains A and B at '
                      'the same learning rate).')
    if c.lora_train_tokens not in ('', 'chat') and not all(
        x.strip().isdigit() for x in c.lora_train_tokens.split(',')):
      raise UserError(f"lora.train_tokens={c.lora_train_tokens!r} must be 'chat', '' (none) or "
                      'comma-separated token ids.')
    for t in c.lora_targets:
      if t not in LORA_TARGETS:
        raise UserError(f"lora.targets names {t!r}, which is not a LoRA target; use "
                        f"{', '.join(LORA_TARGETS)}.")
    return c


def _train_tokens(fc: FinetuneConfig, tokenizer) -> tuple:
  if fc.lora_train_tokens == 'chat':
    return tuple(sorted(int(i) for i in sft.chat_ids(tokenizer).values()))
  return tuple(int(x) for x in fc.lora_train_tokens.split(',') if x.strip())


# ---------------------------------------------------------------------------------------------
# Examples.

def load_records(fc: FinetuneConfig) -> dict:
  """{'train': [...], 'eval': [...], ('eval_phrasing': [...])} of the configured data."""
  if fc.data == 'code':
    return code_task.records(fc.train_per_family, fc.eval_per_family)
  if fc.data == MIXED:   # the instruction set and the code-body task, shuffled together
    inst = instruct.build_instruction_set(fc.data_seed, fc.train_per_family, fc.eval_per_family,
                                          fc.families)
    code = code_task.records(0, fc.eval_per_family)
    train = inst['train'] + code['train']
    order = np.random.default_rng([fc.data_seed, 0xC0DE]).permutation(len(train))
    return {'train': [train[i] for i in order], 'eval': inst['eval'] + code['eval'],
            'eval_phrasing': inst['eval_phrasing']}
  if fc.data == 'builtin':
    return instruct.build_instruction_set(fc.data_seed, fc.train_per_family, fc.eval_per_family,
                                          fc.families)
  train = sft.load_jsonl(fc.data)
  if fc.eval_data:
    return {'train': train, 'eval': sft.load_jsonl(fc.eval_data)}
  # No held-out file: a seeded 5% (at least one) of the user's examples is held out.
  order = np.random.default_rng(fc.data_seed).permutation(len(train))
  n_eval = max(1, len(train) // 20) if len(train) > 1 else 0
  held = set(order[:n_eval].tolist())
  return {'train': [r for i, r in enumerate(train) if i not in held],
          'eval': [r for i, r in enumerate(train) if i in held]}


def greedy_answers(mc: ModelConfig, params, tokenizer, records: list[dict], max_new_tokens: int,
                   batch_size: int) -> list[str]:
  """Each record's last assistant turn answered by greedy decoding through the KV-cache sampler."""
  end = tokenizer.chat_ids['end']
  prompts = [sft.encode_chat(tokenizer, sft.prompt_messages(rec)[0], generation_prompt=True)[0]
             for rec in records]
  answers = []
  longest = max(len(p) for p in prompts)
  new = min(max_new_tokens, mc.max_len - longest + 1) if mc.pos == 'learned' else max_new_tokens
  for i in range(0, len(prompts), batch_size):
    chunk = prompts[i:i + batch_size]
    # A full-size last chunk (repeating its first prompt) reuses the compiled shapes.
    padded = chunk + [chunk[0]] * (batch_size - len(chunk))
    out = sample_lib.generate_tokens(mc, params, padded, new, temperature=0.0, eos_id=end,
                                     pad_id=tokenizer.pad_id)
    answers += [tokenizer.decode(sample_lib.cut_at_eos(row, end)) for row in out[:len(chunk)]]
  return answers


def exact_match_accuracy(mc: ModelConfig, params, tokenizer, records: list[dict],
                         max_new_tokens: int, batch_size: int) -> dict:
  """Greedy answers scored by exact match (surrounding whitespace ignored): {'accuracy': {'all':
  accuracy, family: accuracy, ...}, 'answers': [...]}."""
  answers = greedy_answers(mc, params, tokenizer, records, max_new_tokens, batch_size)
  hits: dict = {}
  for rec, ans in zip(records, answers):
    fam = rec.get('family', 'all')
    ok = ans.strip() == sft.prompt_messages(rec)[1].strip()
    hits.setdefault(fam, []).append(ok)
  acc = {fam: float(np.mean(v)) for fam, v in sorted(hits.items())}
  acc['all'] = float(np.mean([ok for v in hits.values() for ok in v]))
  return {'accuracy': acc, 'answers': answers}


# ---------------------------------------------------------------------------------------------
# The stage.

@dataclasses.dataclass
class Job:
  stage: loop.Stage
  evaluate_plain: object   # (params) -> eval dict, for the base model before training
  base_params: object
  info: dict


def _model(fc: FinetuneConfig, tc: TrainConfig, mesh):
  """(base model config, base params, tokenizer, base identity, the trained model's config)."""
  base_mc, base_params, tokenizer, base_id = runs.load_model(fc.init_from)
  sft.chat_ids(tokenizer)   # a base without chat tokens is refused here, before any work
  tc.check_fits(base_mc.max_len, "the base model's max_len")
  use_lora = fc.lora_rank > 0
  mc = dataclasses.replace(base_mc, lora_rank=fc.lora_rank, lora_alpha=fc.lora_alpha,
                           lora_dropout=fc.lora_dropout,
                           lora_targets=fc.lora_targets if use_lora else (),
                           lora_tokens=_train_tokens(fc, tokenizer) if use_lora else ())
  shard_lib.check_divisibility(mesh, mc, tc.batch_size)
  if tc.batch_size % jax.process_count():
    raise UserError(f'train.batch_size={tc.batch_size} must divide evenly over '
                    f'{jax.process_count()} processes.')
  return base_mc, base_params, tokenizer, base_id, mc


@dataclasses.dataclass
class _Data:
  train: sft.Examples
  stream: sft.PackedStream
  eval: sft.Examples
  acc_splits: dict       # split -> records scored by exact match (instruction families)
  code_eval: list        # records scored by the code task's gold reward


def _examples(fc: FinetuneConfig, tc: TrainConfig, tokenizer, seed: int) -> _Data:
  records = load_records(fc)
  train_ex = sft.Examples(records['train'], tokenizer, tc.seq_len, 'training examples')
  eval_ex = sft.Examples(records['eval'], tokenizer, tc.seq_len, 'held-out examples')
  for name, ex in (('training', train_ex), ('held-out', eval_ex)):
    if ex.too_long:
      print(f'note: {ex.too_long} {name} examples are longer than train.seq_len={tc.seq_len} '
            'tokens and were left out (counted in manifest.json).', file=sys.stderr, flush=True)
  # Exact match on the instruction families; the gold reward on the code task's headers.
  acc_splits = {k: [r for r in records[k] if r.get('family') != code_task.FAMILY]
                for k in ('eval', 'eval_phrasing') if k in records}
  if fc.data not in ('builtin', MIXED):
    acc_splits = {}
  code_eval = [r for r in records['eval'] if r.get('family') == code_task.FAMILY]
  return _Data(train_ex, sft.PackedStream(train_ex, seed), eval_ex, acc_splits, code_eval)


def _pretrain_batches(dataset, tc: TrainConfig, mesh) -> list:
  rows = dataset.eval_batches(tc.eval_batches, tc.batch_size, tc.seq_len, jax.process_index(),
                              jax.process_count())
  return [shard_lib.global_batch(r, mesh) for r in rows]


def _eval_batches(examples: sft.Examples, batch_size: int, mesh) -> list:
  """The held-out examples packed into batches of one shape (the last padded with empty rows,
  weight 0)."""
  packed = examples.pack(np.arange(len(examples)))
  out = []
  for i in range(0, len(packed['tokens']), batch_size):
    rows = {k: v[i:i + batch_size] for k, v in packed.items()}
    short = batch_size - len(rows['tokens'])
    if short:
      rows = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
              for k, v in rows.items()}
    out.append({k: shard_lib.global_batch(v, mesh) for k, v in rows.items()})
  return out


def _evaluator(fc: FinetuneConfig, mc: ModelConfig, tokenizer, data: _Data, sft_batches: list,
               pre_batches: list):
  """(params of the plain model) -> evaluation row: held-out loss, the pretraining corpus's loss,
  and the task scores."""
  plain = runs.plain(mc)
  sft_eval = jax.jit(lambda p, b: sft.masked_loss(plain, p, b))
  pre_eval = jax.jit(lambda p, b: train_lib.next_token_loss(plain, p, b))

  def evaluate_plain(params) -> dict:
    sums = shard_lib.map_bounded(lambda b: sft_eval(params, b), sft_batches)
    total, weight = (float(sum(float(s[i]) for s in sums)) for i in (0, 1))
    pre = float(np.mean(jax.device_get(
        shard_lib.map_bounded(lambda b: pre_eval(params, b), pre_batches))))
    row = {'eval_loss': total / max(weight, 1e-9), 'pretrain_eval_loss': pre}
    if data.code_eval:   # the gold reward of greedy answers (lm/data/code_task.py)
      answers = greedy_answers(plain, params, tokenizer, data.code_eval, fc.max_new_tokens,
                               fc.eval_batch_size)
      row['gold'] = float(np.mean([code_task.gold(r['prompt'], a)
                                   for r, a in zip(data.code_eval, answers)]))
    for split, recs in data.acc_splits.items():
      acc = exact_match_accuracy(plain, params, tokenizer, recs, fc.max_new_tokens,
                                 fc.eval_batch_size)['accuracy']
      tag = 'acc' if split == 'eval' else 'acc_phrasing'
      row.update({f'{tag}/{fam}': v for fam, v in acc.items()})
    return row
  return evaluate_plain


def _train_state(fc, tc, mc, base_mc, base_params, seed: int, mesh):
  """What trains, on which shardings: (init_state, state shapes, state shardings, frozen, frozen
  shardings, trainable shapes, optimizer). LoRA trains the adapters with the base frozen."""
  use_lora = fc.lora_rank > 0
  p_shard = shard_lib.param_shardings(mesh, model_lib.logical_specs(base_mc),
                                      model_lib.param_shapes(base_mc))
  base_params = jax.device_put(base_params, p_shard)
  if use_lora:
    var_shapes = jax.eval_shape(lambda: model_lib.init_variables(mc, jax.random.PRNGKey(0)))
    t_shapes = var_shapes[lora_lib.COLLECTION]
    t_shard = shard_lib.param_shardings(mesh, model_lib.logical_specs(mc, lora_lib.COLLECTION),
                                        t_shapes)
  else:
    t_shapes, t_shard = model_lib.param_shapes(base_mc), p_shard
  optimizer = make_optimizer(tc, t_shapes, fc.lora_b_lr_ratio if use_lora else 1.0,
                             model=None if use_lora else base_mc)

  def init_state():
    if use_lora:
      trainable = model_lib.init_variables(mc, jax.random.PRNGKey(seed))[lora_lib.COLLECTION]
    else:
      trainable = base_params
    return loop.new_state(trainable, optimizer)
  shapes = jax.eval_shape(init_state)
  s_shard = shard_lib.state_shardings(mesh, shapes, t_shard)
  s_shard['params'] = t_shard
  frozen, frozen_sh = (base_params, p_shard) if use_lora else (None, None)
  return init_state, shapes, s_shard, frozen, frozen_sh, t_shapes, optimizer, base_params


def _info(fc, tc, mc, base_mc, base_id, data: _Data, t_shapes, state_shapes) -> dict:
  use_lora = fc.lora_rank > 0
  n_base = flops_lib.param_counts(model_lib.param_shapes(base_mc))
  n_trainable = lora_lib.tree_size(t_shapes)
  rows = data.stream.rows_per_epoch()
  return {
      'base': base_id, 'mode': 'lora' if use_lora else 'full',
      'trainable_params': n_trainable, 'base_params': n_base['total'],
      'trainable_fraction': n_trainable / n_base['total'],
      'lora_closed_form': lora_lib.trainable_count(mc) if use_lora else None,
      'optimizer_state_bytes': lora_lib.tree_bytes(state_shapes['opt_state']),
      'data': {'source': fc.data, 'train': data.train.info(), 'eval': data.eval.info(),
               'rows_per_epoch': rows,
               'packing_fill': data.train.info()['pairs'] / (rows * tc.seq_len)},
  }


def build(cfg, workdir: str) -> Job:
  seed = int(cfg.seed)
  tc = TrainConfig.from_config(cfg.train, 'finetune')
  fc = FinetuneConfig.from_config(cfg)
  mesh_cfg = shard_lib.MeshConfig.from_config(cfg.mesh)
  shard_lib.maybe_initialize_distributed(mesh_cfg)
  mesh = shard_lib.make_mesh(mesh_cfg, batch_size=tc.batch_size)
  base_mc, base_params, tokenizer, base_id, mc = _model(fc, tc, mesh)
  data = _examples(fc, tc, tokenizer, seed)
  corpus = runs.pretrain_corpus(fc.init_from, tokenizer)
  pre_batches = _pretrain_batches(corpus, tc, mesh)
  n_replay = replay_lib.split(tc.batch_size, fc.replay_fraction,
                              process_count=jax.process_count())
  replay = replay_lib.Replay(corpus, n_replay, tc.seq_len, seed) if n_replay else None
  (init_state, state_shapes, s_shard, frozen, frozen_sh, t_shapes, optimizer,
   base_params) = _train_state(fc, tc, mc, base_mc, base_params, seed, mesh)
  use_lora = fc.lora_rank > 0

  def loss_fn(trainable, base, batch, rng):
    params, adapters = (base, trainable) if use_lora else (trainable, None)
    if replay is None:
      return sft.masked_loss(mc, params, batch, adapters, rng)
    return sft.mixed_loss(mc, params, batch, fc.replay_fraction, adapters, rng)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_step = jax.jit(shard_lib.with_activation_constraints(
      loop.make_step(loss_fn, tc, optimizer, seed, row_wise=True), mesh),
                       in_shardings=(s_shard, frozen_sh, shard_lib.batch_sharding(mesh)),
                       out_shardings=(s_shard, replicated), donate_argnums=0)
  evaluate_plain = _evaluator(fc, mc, tokenizer, data, _eval_batches(data.eval, tc.batch_size,
                                                                    mesh), pre_batches)
  merged = jax.jit(lambda t, base: lora_lib.merge(mc, base, t) if use_lora else t)

  info = _info(fc, tc, mc, base_mc, base_id, data, t_shapes, state_shapes)
  if replay is not None:
    info['replay'] = dict(replay.info(), fraction=fc.replay_fraction)
  n_base = flops_lib.param_counts(model_lib.param_shapes(base_mc))
  fpt = flops_lib.flops_per_token(base_mc, tc.seq_len, n_base['total'], n_base['nonembed'])
  config = json.loads(cfg.to_json())
  # The base's identity is part of the run's: a resume against other weights is refused.
  config['base'] = {k: base_id[k] for k in ('workdir', 'step', 'params_sha256', 'tokenizer_hash')}
  config['base']['model'] = dataclasses.asdict(mc)
  config = json.loads(json.dumps(config))     # tuples as lists, as config.json will read back

  def manifest() -> dict:
    return dict(host.device_manifest(mesh), params=n_base['total'],
                params_nonembed=n_base['nonembed'],
                flops_per_token={'chinchilla_appendix_f': fpt['chinchilla'], '6n': fpt['6n']},
                model=dataclasses.asdict(mc), **info)

  def batch(step):
    pi, pc = jax.process_index(), jax.process_count()
    rows = data.stream.batch(step, tc.batch_size - n_replay, pi, pc)
    if replay is not None:
      rows = replay_lib.mix(rows, replay.rows(step, pi, pc))
    return {k: shard_lib.global_batch(v, mesh) for k, v in rows.items()}
  stage = loop.Stage(
      config=config, train=tc, dtype=mc.dtype, manifest=manifest, tokenizer=tokenizer,
      abstract_state=ckpt_lib.abstract(state_shapes, s_shard), init_state=jax.jit(
          init_state, out_shardings=s_shard),
      frozen=frozen, train_step=train_step, batch=batch,
      evaluate=lambda trainable, base: evaluate_plain(merged(trainable, base)),
      tokens_per_step=tc.batch_size * tc.seq_len, flops_per_token=fpt, n_params=n_base,
      summary=lambda last_eval: {'finetune': _summary(workdir, info, last_eval, tc)},
      resumable_changes=RESUMABLE_CHANGES)
  return Job(stage=stage, evaluate_plain=evaluate_plain, base_params=base_params, info=info)


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _summary(workdir: str, info: dict, last_eval: dict, tc: TrainConfig) -> dict:
  """Before/after numbers, sizes and speed of a finished fine-tuning run."""
  before = metrics_lib.read_json_object(os.path.join(workdir, BASE_EVAL), BASE_EVAL_FIX)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
          if r.get('tokens_per_s')]
  tps = float(np.median([r['tokens_per_s'] for r in rows])) if rows else None
  return {**{k: v for k, v in info.items() if k != 'data'}, 'data': info['data'],
          'before': before, 'after': last_eval,
          'checkpoint_bytes': _dir_bytes(os.path.join(ckpt_dir, str(steps[-1]))) if steps else None,
          'step_time_s': tc.batch_size * tc.seq_len / tps if tps else None}


def finetune(cfg, workdir: str, stop_at: int | None = None) -> dict:
  """Fine-tunes (or resumes) the run in workdir; returns the summary."""
  loop.check_stage_start(cfg.to_dict())
  job = build(cfg, workdir)
  loop.check_config(workdir, job.stage.config, RESUMABLE_CHANGES)
  # The lock covers base_eval.json too, written before the loop (which holds the same lock).
  with lock_lib.hold(workdir, enabled=jax.process_index() == 0):
    before_path = os.path.join(workdir, BASE_EVAL)
    if not os.path.exists(before_path):
      t0 = time.time()
      print('evaluating the base model before fine-tuning ...', file=sys.stderr, flush=True)
      before = job.evaluate_plain(job.base_params)
      before['eval_seconds'] = time.time() - t0
      if jax.process_index() == 0:
        metrics_lib.write_json_atomic(before_path, before)
    else:    # read at the end for the summary: a damaged one is refused now, not after training
      metrics_lib.read_json_object(before_path, BASE_EVAL_FIX)
    return loop.run(job.stage, workdir, stop_at)


# ---------------------------------------------------------------------------------------------
# Merging.

def merge(workdir: str, out: str) -> dict:
  """Writes the run in workdir (LoRA merged) as a plain model folder that every command reads.

  The folder is a pretraining-style run: config.json (model, data and train of the pretraining
  base, so its pretraining data is known), tokenizer/, and one checkpoint whose params are the
  merged weights (optimizer moments fresh). manifest.json names where the weights came from.
  """
  if os.path.exists(os.path.join(out, 'checkpoints')):
    raise UserError(f'{out} already holds a run; choose a new --out folder.')
  cfg = runs.read_config(workdir)
  if runs.kind(cfg) != 'finetune':
    raise UserError(f'{workdir} is not a fine-tuning run; it is already a plain model.')
  mc, params, tokenizer, ident = runs.load_model(workdir)
  root = runs.root_config(workdir)
  plain_cfg = {k: root[k] for k in root if k in ('seed', 'model', 'data', 'train', 'mesh')}
  plain_cfg['model'] = {k: v for k, v in dataclasses.asdict(mc).items()
                        if k in root['model'] and not k.startswith('lora')}
  manifest = {'merged_from': ident['workdir'], 'step': ident['step'],
              'params_sha256': ident['params_sha256'], 'model': dataclasses.asdict(mc),
              'versions': host.versions(), 'git_commit': host.git_commit()}
  runs.write_plain_run(out, plain_cfg, params, tokenizer, ident['step'], manifest)
  return manifest
