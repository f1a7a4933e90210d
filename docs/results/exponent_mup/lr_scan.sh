#!/bin/bash
# The μP sweep's learning-rate scan: the base rung (L4 d40) at budget 1.5e12, rates 2^-9 .. 2^-5.
cd "$(dirname "$0")/../../.."
for e in 9 8 7 6 5; do
  lr=$(python -c "print(2**-$e)")
  python run.py sweep --config=configs/sweep_exponent_mup.py --workdir=runs/mup_scan/lr2-$e \
    --config.sweep.lr=$lr --config.sweep.only='^C1.5e12_L4_d40_s0$' --config.sweep.parallel=1
done
