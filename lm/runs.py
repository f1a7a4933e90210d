"""The run folder: the one place that reads what a run wrote, for every command and stage.

A run folder holds config.json (the resolved config), tokenizer/, checkpoints/ and, once
finished, summary.json. What kind of run it is follows from its config's sections alone and is
decided here (`kind`):

  pretrain   run.py train, or a plain model folder written by merge or import (model + data)
  finetune   run.py finetune, full or LoRA (finetune + base: the run it started from)
  reward     run.py reward: a scalar head on an SFT trunk (reward + base)
  dpo, ppo   preference-tuned policies (dpo or ppo + base)

Every kind but pretrain names its base run in `base.workdir`, so the runs form chains back to a
pretraining run (`base_chain`, `root_config`). `load_model` reads any language-model run as
(model config, params, tokenizer, identity): a LoRA run's adapters come merged into its base's
weights, and only the checkpoint's parameters are read, so no stage's optimizer is rebuilt.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os

import jax
import numpy as np

from lm.training import checkpoint as ckpt_lib
from lm.training import loop
from lm.model import lora as lora_lib
from lm import metrics as metrics_lib
from lm.data import tokenizer as tokenizer_lib
from lm.data import tokens as data_lib
from lm.config import ModelConfig
from lm.errors import UserError
from lm.training.optim import TrainConfig, make_optimizer

KINDS = ('pretrain', 'finetune', 'reward', 'dpo', 'ppo', 'grpo')
CHAT_KINDS = ('finetune', 'reward', 'dpo', 'ppo', 'grpo')   # trained in the chat template
DAMAGED = 'the run folder is damaged, restore it or train the run again'
MAX_CHAIN = 16           # base runs followed before a chain is refused as a loop
# Where each kind keeps its language model's weights inside the checkpointed state.
PARAMS_KEYS = {'pretrain': ('params',), 'finetune': ('params',), 'dpo': ('params',),
               'ppo': ('params', 'policy'), 'grpo': ('params', 'policy'), 'reward': ('params',)}
PREFERENCE_KINDS = ('dpo', 'ppo', 'grpo')   # tuned from an SFT run, which is their KL reference


# ---------------------------------------------------------------------------------------------
# config.json and the kind of a run.

def read_config(workdir: str, missing: str | None = None) -> dict:
  """A run's config.json; `missing` is the sentence for a folder without one."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(missing or f'{workdir} has no config.json, so it is not a training run; point '
                    'at a folder that run.py train, finetune, reward, dpo, ppo, merge or import '
                    'wrote.')
  return metrics_lib.read_json_object(path, DAMAGED)


def config_or_empty(workdir: str) -> dict:
  """A run's config.json, or {} when there is none readable."""
  try:
    return read_config(workdir)
  except UserError:
    return {}


def kind(cfg: dict) -> str:
  """The kind of run a config describes (module docstring): one of KINDS."""
  for k in ('dpo', 'ppo', 'grpo', 'reward', 'finetune'):
    if k in cfg:
      return k
  return 'pretrain'


def chats(cfg: dict) -> bool:
  """True for a run trained in the chat template (it answers as an assistant)."""
  return kind(cfg) in CHAT_KINDS


def base_workdir(cfg: dict) -> str | None:
  """The run this one started from (None for a pretraining or plain run)."""
  return (cfg.get('base') or {}).get('workdir') or None


def base_chain(workdir: str):
  """(workdir, config) of the run and each base run before it, nearest first."""
  path = workdir
  for _ in range(MAX_CHAIN):
    cfg = read_config(path)
    yield path, cfg
    path = base_workdir(cfg)
    if not path:
      return
  raise UserError(f'{workdir} starts a chain of more than {MAX_CHAIN} base runs; merge it '
                  '(run.py merge) or start from a plain run.')


def root_config(workdir: str) -> dict | None:
  """The config of the plain run (pretrained, merged or imported: it has `model` and `data`) at
  the root of workdir's chain of base runs, or None if there is none."""
  for _, cfg in base_chain(workdir):
    if 'data' in cfg and 'model' in cfg:
      return cfg
  return None


def pretrain_corpus(workdir: str, tokenizer):
  """The pretraining corpus (lm/data/tokens.py Dataset) at the root of workdir's chain of base
  runs, prepared (or read from its cache) and checked to be tokenized as `tokenizer` is: what
  fine-tuning measures forgetting on, and what replay rows come from."""
  root = root_config(workdir)
  if root is None:
    raise UserError(f'{workdir} does not lead back to a pretrained run (no model and data in its '
                    'chain of base runs); start from a run that run.py train wrote.')
  dataset = data_lib.prepare(data_lib.DataConfig.from_config(root['data']))
  if dataset.tokenizer.hash != tokenizer.hash:
    raise UserError(f'the tokenizer of {workdir} differs from its pretraining data\'s; the base '
                    'run is inconsistent, pretrain it again.')
  return dataset


def sft_root(workdir: str) -> str:
  """The first run of workdir's chain that is not preference-tuned (for a DPO or PPO run, the
  SFT run the chain started from: the reference every preference stage measures KL against).
  Absolute path."""
  for path, cfg in base_chain(workdir):
    if kind(cfg) not in PREFERENCE_KINDS:
      return os.path.abspath(path)
  raise UserError(f'{workdir} has no run in its chain that is not preference-tuned.')


def finished_summary(workdir: str, what: str, command: str) -> dict:
  """summary.json of a finished run, else one sentence naming the command that finishes it."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir} is not a finished {what} run (no summary.json); run or resume '
                    f'`python run.py {command}` there first.')
  return metrics_lib.read_json_object(path, f'restore it, or rerun `python run.py {command}` '
                                      'there to write it again')


def manifest(workdir: str) -> dict:
  """A run's manifest.json ({} when it has none); a damaged one is refused in one sentence."""
  path = os.path.join(workdir, 'manifest.json')
  if not os.path.isfile(path):
    return {}
  return metrics_lib.read_json_object(path, DAMAGED)


def check_finetuned(workdir: str, stage: str, kl: bool = True) -> None:
  """Refuses to start a preference stage (`stage`, e.g. 'DPO') from a run that was never
  fine-tuned: a pretraining run never learned the chat template the stage prompts in, and the
  stage would report its KL to it as to "the SFT model". Accepted: fine-tuned and preference-tuned
  runs, a merged fine-tuning run (its manifest names merged_from) and an imported model (what it
  was trained on cannot be known here)."""
  cfg = read_config(workdir)
  if chats(cfg):
    return
  found = manifest(workdir)
  if found.get('merged_from') or found.get('imported_from'):
    return
  also = ' and is no SFT model to measure KL against' if kl else ''
  raise UserError(f'{workdir} is a pretraining run that was never fine-tuned, so it does not know '
                  f'the chat template {stage} prompts in{also}; fine-tune it first (python run.py '
                  f'finetune --config=configs/sft.py --config.finetune.init_from={workdir}) and '
                  f'start {stage} from that run.')


# ---------------------------------------------------------------------------------------------
# Models and weights.

def model_config(cfg: dict, vocab_size: int = 0) -> ModelConfig:
  """The model a run trained, adapters included (a LoRA run's rank and targets)."""
  if kind(cfg) == 'pretrain':
    return ModelConfig.from_config(cfg['model'], vocab_size)
  d = dict(cfg['base']['model'])
  d['lora_targets'] = tuple(d.get('lora_targets', ()))
  d['lora_tokens'] = tuple(d.get('lora_tokens', ()))
  return ModelConfig(**d)


def plain(mc: ModelConfig) -> ModelConfig:
  """The model without adapters, runnable on this machine (a GPU-trained run used elsewhere
  falls back from the cuDNN attention kernel)."""
  if mc.attention_impl == 'cudnn' and jax.default_backend() != 'gpu':
    mc = dataclasses.replace(mc, attention_impl='auto')
  return lora_lib.base_config(mc)


def has_checkpoint(workdir: str) -> bool:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))


def restore_params(workdir: str, keys: tuple[str, ...] = ('params',)):
  """(params, step) of the run's newest readable checkpoint: the subtree at `keys` of its state,
  on one device."""
  if not has_checkpoint(workdir):
    raise UserError(f'{workdir} has no checkpoint, so it is neither finished nor resumable; '
                    'train it first (or point at another run).')
  params, step = ckpt_lib.restore_subtree(os.path.join(workdir, 'checkpoints'), keys)
  if params is None:   # step folders that orbax does not count as finished
    raise UserError(f'{workdir} has no finished checkpoint; train it first.')
  return params, step


def params_hash(params) -> str:
  """sha256 over the parameters' paths, shapes and bytes: the identity of a set of weights."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{jax.tree_util.keystr(path)}{a.shape}{a.dtype}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def load_tokenizer(workdir: str):
  return tokenizer_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))


def load_model(workdir: str, _depth: int = 0):
  """(model config without adapters, params, tokenizer, identity) of any language-model run.

  A LoRA run's adapters are merged into its base's weights (its base is loaded the same way and
  must still be the one it was trained on). identity names the run, the step, the params hash,
  the tokenizer hash and the model.
  """
  if _depth > MAX_CHAIN:
    raise UserError(f'{workdir} starts a chain of more than {MAX_CHAIN} fine-tuning runs; merge '
                    'it first.')
  cfg = read_config(workdir)
  run_kind = kind(cfg)
  if run_kind == 'reward':
    raise UserError(f'{workdir} is a reward model, not a language model; use its SFT run '
                    f"{base_workdir(cfg)} instead (run.py sample on the reward run shows the SFT "
                    "run's samples with their rewards).")
  params, step = restore_params(workdir, PARAMS_KEYS[run_kind])   # refuses a run without one
  tokenizer = load_tokenizer(workdir)
  mc = model_config(cfg, tokenizer.vocab_size)
  if mc.lora_rank:   # the checkpoint holds the adapters: fold them into the base's weights
    _, base_params, _, base_id = load_model(base_workdir(cfg), _depth + 1)
    _check_same_base(cfg['base'], base_id, workdir)
    params = jax.jit(lora_lib.merge, static_argnums=0)(mc, base_params, params)
  mc = plain(mc)
  identity = {'workdir': os.path.abspath(workdir), 'step': int(step),
              'params_sha256': params_hash(params), 'tokenizer_hash': tokenizer.hash,
              'model': dataclasses.asdict(mc)}
  return mc, params, tokenizer, identity


def _check_same_base(recorded: dict, found: dict, workdir: str) -> None:
  for key in ('params_sha256', 'tokenizer_hash'):
    if recorded.get(key) != found[key]:
      what = 'weights' if key == 'params_sha256' else 'tokenizer'
      raise UserError(f"the base run {recorded['workdir']} of {workdir} has changed since it was "
                      f'fine-tuned (its {what} differ); restore that base or fine-tune again.')


def write_plain_run(out: str, cfg: dict, params, tokenizer, step: int, manifest: dict) -> None:
  """A pretraining-style run folder that every command reads as a model: config.json (seed,
  model, data, train, mesh), tokenizer/, one checkpoint at `step` holding `params` with fresh
  optimizer moments (so it can also be trained on), and manifest.json saying where the weights
  came from."""
  os.makedirs(out, exist_ok=True)
  optimizer = make_optimizer(TrainConfig.from_config(cfg['train']), params)
  state = loop.new_state(params, optimizer, step)
  ckpts = ckpt_lib.Checkpoints(os.path.join(out, 'checkpoints'), 1)
  ckpts.save(step, state)
  ckpts.close()
  tokenizer.save(os.path.join(out, 'tokenizer'))
  metrics_lib.write_json_atomic(os.path.join(out, 'config.json'), cfg)
  metrics_lib.write_json_atomic(os.path.join(out, 'manifest.json'), manifest)
