"""Supervised fine-tuning (instruction tuning) of a trained run; full, or LoRA with lora.rank > 0.

  python run.py finetune --config=configs/sft.py --workdir=runs/sft \
      --config.finetune.init_from=runs/base_small [--config.lora.rank=8]

The model and tokenizer come from the base run (finetune.init_from), so this file has no model or
data section; train and mesh mean what they mean in configs/base.py.
"""
import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  b = base.get_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train = b.train
  c.mesh = b.mesh
  t = c.train
  t.steps = 1500
  t.batch_size = 16
  t.seq_len = 128           # at most the base model's max_len
  t.lr = 3e-3
  t.warmup_steps = 30
  t.weight_decay = 0.0
  t.eval_every = 500
  t.eval_batches = 8        # pretraining-corpus validation batches (forgetting)
  t.checkpoint_every = 500

  f = c.finetune = ml_collections.ConfigDict()
  f.init_from = ''          # the trained run to start from (required)
  f.data = 'builtin'        # 'builtin' (lm/data/instruct.py), 'code' (lm/data/code_task.py), both
                            # ('builtin+code': every code header beside the instruction set) or a JSONL
                            # file of prompt/response or messages records
  f.eval_data = ''          # held-out JSONL for your own data ('' holds out 5% of f.data)
  f.families = 'add,sub,reverse,upper,count,sort,funcname,module'   # built-in task families
  f.train_per_family = 2000
  f.eval_per_family = 100
  f.data_seed = 0
  f.max_new_tokens = 24     # greedy answer length for exact-match evaluation
  f.eval_batch_size = 128   # prompts decoded at once in evaluation
  f.replay_fraction = 0.25  # share of each batch's rows (and of the loss) taken from the base
                            # run's pretraining corpus, against forgetting (0: chat examples only;
                            # measured: docs/results/replay)

  lo = c.lora = ml_collections.ConfigDict()
  lo.rank = 0               # 0 = full fine-tuning; r > 0 trains rank-r adapters only
  lo.alpha = 16.0           # the adapter update is scaled by alpha / rank
  lo.dropout = 0.0
  lo.targets = 'q,k,v,o,up,down'   # any of q, k, v, o (attention), up, gate, down (MLP)
  lo.b_lr_ratio = 1.0       # LoRA+: the B factors' learning rate is this multiple of train.lr
  lo.train_tokens = 'chat'  # embedding rows that train too: 'chat' (the chat markers), '' or ids
  return c
