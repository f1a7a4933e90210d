#!/bin/bash
# GRPO on 2-digit addition from an SFT model that can sometimes add. Run from the repository root.
# 1. the base: configs/pretrain_small.py with a fifth of its lines sums of 2-digit numbers;
# 2. SFT on the instruction set's 'add' family alone (1-3 digit operands), no replay;
# 3. GRPO on the held-in 2-digit problems, 32 prompts x 8 samples per iteration;
# 4. greedy and sampled exact match on every held-out 2-digit problem, SFT against GRPO.
set -e
mkdir -p runs/add
t() { /usr/bin/time -f "%e s wall, %M KB peak" "$@"; }
[ -f runs/add/base/summary.json ] || t python run.py train --config=configs/pretrain_small.py \
  --workdir=runs/add/base --config.data.arith_fraction=0.2 --config.data.arith_digits=2
[ -f runs/add/sft/summary.json ] || t python run.py finetune --config=configs/sft.py \
  --workdir=runs/add/sft --config.finetune.init_from=runs/add/base --config.finetune.families=add \
  --config.finetune.train_per_family=20000 --config.finetune.replay_fraction=0 --config.train.steps=2000
t python run.py grpo --config=configs/grpo.py:arith --workdir=runs/add/grpo \
  --config.grpo.init_from=runs/add/sft "$@"
python -m benchmarks.policy_eval --task=arith --samples=2 --sft=runs/add/sft \
  --out=runs/add/policy_eval.json grpo=runs/add/grpo
