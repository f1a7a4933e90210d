#!/bin/bash
# The learning-rate transfer measurement of docs/results/mup: the whole 2x grid at widths 32-256,
# and at 512 the rates around each parametrisation's optimum (SP's falls with width, μP's stays).
cd "$(dirname "$0")/../../.."
B="python -m benchmarks.lr_transfer --out=docs/results/mup --steps=300"
$B --widths=32,64,128,256 &&
$B --widths=32,512 --parametrizations=sp --lr_exps=-12,-11,-10,-9,-8 &&
$B --widths=32,512 --parametrizations=mup --lr_exps=-9,-8,-7,-6,-5
