"""Direct preference optimisation of an SFT run on preference pairs (lm/align/dpo.py).

  python run.py dpo --config=configs/dpo.py --workdir=runs/dpo \
      --config.dpo.init_from=runs/sft_code --config.dpo.pairs=runs/rm/pairs.jsonl \
      [--config.dpo.reward_from=runs/rm]

A second round of iterative DPO (`:round2`): start from the first round with dpo.pairs empty, so
the pairs are sampled from that policy and labelled by the gold program, and add the chosen
responses' NLL to the loss (iterative RPO, Pang et al. 2024), for 150 steps:

  python run.py dpo --config=configs/dpo.py:round2 --workdir=runs/dpo2 \
      --config.dpo.init_from=runs/dpo [--config.dpo.reward_from=runs/rm]

Loss variants (dpo.loss): 'ipo' (Azar et al. 2023) with the same beta, 'simpo' (Meng et al.
2024, reference-free and length-normalised) with dpo.simpo_beta and dpo.simpo_gamma:

  python run.py dpo --config=configs/dpo.py --workdir=runs/simpo --config.dpo.loss=simpo ...

dpo.replay_fraction > 0 mixes windows of the pretraining corpus into every step (their NLL is
added to the loss); a `lora` section with rank > 0 trains adapters on the frozen starting policy,
which (adapters off) is also the reference.

train.batch_size counts pairs.
"""
import ml_collections

from configs import base


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant not in ('', 'round2'):
    raise ValueError(f"configs/dpo.py:{variant} is not known; use configs/dpo.py or "
                     "configs/dpo.py:round2.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.train = base.get_config().train
  t = c.train
  t.steps = 450              # about one epoch of the reward model's 14,550 pairs
  t.batch_size = 32          # pairs per step (64 sequences)
  t.seq_len = 128
  t.lr = 1e-4
  t.warmup_steps = 20
  t.weight_decay = 0.0
  t.eval_every = 100
  t.checkpoint_every = 100

  d = c.dpo = ml_collections.ConfigDict()
  d.init_from = ''           # the SFT run (or a DPO run: another round): policy and reference
  d.pairs = ''               # JSONL of {"prompt", "chosen", "rejected"}; '' samples them on-policy
  d.samples_per_prompt = 8   # on-policy pairs: responses per training prompt ...
  d.pairs_per_prompt = 4     # ... at most this many pairs per prompt, no response reused ...
  d.noise = 0.1              # ... and this share of labels flipped
  d.eval_pairs = ''          # optional held-out pairs: DPO loss and implicit-reward accuracy
  d.beta = 0.1               # strength of the implicit KL constraint
  d.label_smoothing = 0.0    # conservative DPO: the share of labels assumed flipped
  d.sft_weight = 0.0         # weight of the chosen responses' per-token NLL added to the loss
  d.loss = 'dpo'             # 'dpo', 'ipo' (squared loss towards a margin of 1/(2 beta)) or
                             # 'simpo' (no reference; length-normalised, simpo_beta and _gamma)
  d.simpo_beta = 2.0         # SimPO: scale of the mean per-token log-probability reward
  d.simpo_gamma = 1.0        # SimPO: the target reward margin
  d.replay_fraction = 0.0    # share of each step's sequences taken from the pretraining corpus
                             # (NLL on all their tokens added to the loss); 0: no replay
  d.reward_from = ''         # optional reward-model run: its score of the samples is logged
  d.eval_prompts = 200       # held-out prompts sampled at each evaluation
  d.eval_samples = 2         # samples per held-out prompt
  d.max_new_tokens = 48
  d.temperature = 1.0        # sampling temperature of the evaluation samples
  d.sample_batch = 128

  lo = c.lora = ml_collections.ConfigDict()
  lo.rank = 0                # 0 trains every weight; r > 0 trains rank-r adapters only
  lo.alpha = 16.0            # the adapter update is scaled by alpha / rank
  lo.targets = 'q,k,v,o,up,down'   # any of q, k, v, o (attention), up, gate, down (MLP)

  if variant == 'round2':
    t.steps, t.eval_every, t.checkpoint_every = 150, 50, 50
    d.sft_weight = 1.0
  return c
