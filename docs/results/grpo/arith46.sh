#!/bin/bash
# GRPO on 2-digit addition from a base pretrained with arithmetic lines and the instruction-tuned
# SFT model on it, at the settings of that measurement. Run from the repository root.
mkdir -p runs/a46
t() { /usr/bin/time -f "%e s wall, %M KB peak" "$@"; }
[ -f runs/a46/base/summary.json ] && grep -q '"finished": true' runs/a46/base/summary.json || \
  t python run.py train --config=configs/pretrain_small.py --workdir=runs/a46/base \
    --config.data.arith_fraction=0.2 --config.data.arith_digits=2 --config.train.progress=none \
    > runs/a46/base.log 2>&1 || exit 1
[ -f runs/a46/sft/summary.json ] && grep -q '"finished": true' runs/a46/sft/summary.json || \
  t python run.py finetune --config=configs/sft.py --workdir=runs/a46/sft \
    --config.finetune.init_from=runs/a46/base --config.train.progress=none \
    > runs/a46/sft.log 2>&1 || exit 1
t python run.py grpo --config=configs/grpo.py:arith --workdir=runs/a46/grpo \
  --config.grpo.init_from=runs/a46/sft --config.train.progress=none --config.train.batch_size=8 \
  --config.grpo.minibatch=16 --config.train.lr=3e-5 --config.train.steps=60 "$@" > runs/a46/grpo.log 2>&1
echo DONE >> runs/a46/done.txt
