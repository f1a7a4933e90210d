"""lm-eval loglikelihood throughput: the project's adapter (lm/eval/harness.py) against lm-eval's own
`hf` model class on the same weights, interleaved in one process.

    python -m benchmarks.harness_speed [--rounds=3 --docs=200 --batch=32 --out=FILE.json]

A Llama-shaped model is made with transformers (4 layers, width 256, a byte-level BPE of 1000
tokens trained here on the Python standard library, 256 positions), saved, and imported with
`run.py import`'s code. The requests are those of a multiple-choice task of --docs questions with
four choices each (lines of standard-library code cut in two; the true end among three others),
tokenized once by each side as lm-eval does. Each round times `loglikelihood` on all of them for
the adapter and for HFLM (batch --batch, float32, CPU), alternating which goes first; the first
round includes the adapter's compiles. Reports requests/s and tokens/s per round, and the largest
difference between the two sides' log-likelihoods. Needs lm-eval, accelerate, torch, transformers.
"""
import argparse
import glob
import json
import os
import random
import sys
import tempfile
import time

import numpy as np


def make_model(folder: str):
  import torch
  import transformers
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  stdlib = os.path.dirname(json.__file__)
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train(sorted(glob.glob(os.path.join(stdlib, '*.py'))),
          trainers.BpeTrainer(vocab_size=1000, special_tokens=['<|endoftext|>'],
                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                              show_progress=False))
  tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token='<|endoftext|>',
                                             eos_token='<|endoftext|>')
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688,
                                 num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                                 max_position_embeddings=256, tie_word_embeddings=True,
                                 bos_token_id=0, eos_token_id=0)
  model = transformers.LlamaForCausalLM(cfg)
  model.save_pretrained(folder)
  tok.save_pretrained(folder)


def requests(n_docs: int, seed: int = 0):
  from lm_eval.api.instance import Instance
  rng = random.Random(seed)
  lines = [ln.strip() for f in sorted(glob.glob(os.path.join(os.path.dirname(json.__file__),
                                                              '..', '*.py')))[:60]
           for ln in open(f, encoding='utf-8').read().split('\n') if 30 < len(ln.strip()) < 120]
  out = []
  for d in range(n_docs):
    picks = rng.sample(lines, 4)
    context = ' '.join(rng.sample(lines, 3)) + ' ' + picks[0][:len(picks[0]) // 2]
    for p in picks:
      out.append(Instance(request_type='loglikelihood', doc={}, idx=len(out),
                          arguments=(context, ' ' + p[len(p) // 2:])))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--docs', type=int, default=200)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from lm_eval.models.huggingface import HFLM
  from lm import runs
  from lm.eval import harness
  from lm.interop import hf
  tmp = tempfile.mkdtemp()
  src, run = os.path.join(tmp, 'hf'), os.path.join(tmp, 'run')
  make_model(src)
  hf.import_model(src, run, overwrite=True)
  mc, params, tokenizer, _ = runs.load_model(run)
  ours = harness.make_adapter(mc, params, tokenizer, batch_size=args.batch)
  theirs = HFLM(pretrained=src, device='cpu', dtype='float32', batch_size=args.batch)
  reqs = requests(args.docs)
  n_tokens = sum(len(ours.tok_encode(c + x)) for c, x in (r.args for r in reqs))
  rows, results = [], {}
  for rnd in range(args.rounds):
    order = [('adapter', ours), ('hf', theirs)]
    if rnd % 2:
      order.reverse()
    for name, lm in order:
      t0 = time.perf_counter()
      res = lm.loglikelihood(reqs, disable_tqdm=True)
      dt = time.perf_counter() - t0
      results[name] = np.asarray([r[0] for r in res])
      rows.append({'round': rnd, 'model': name, 'seconds': dt, 'requests_per_s': len(reqs) / dt,
                   'tokens_per_s': n_tokens / dt})
      print(f"round {rnd} {name:8s} {dt:7.2f} s  {len(reqs) / dt:8.1f} requests/s  "
            f"{n_tokens / dt:9.0f} tokens/s", flush=True)
  diff = float(np.abs(results['adapter'] - results['hf']).max())
  med = {n: float(np.median([r['requests_per_s'] for r in rows if r['model'] == n
                             and r['round'] > 0] or [r['requests_per_s'] for r in rows
                                                     if r['model'] == n]))
         for n in ('adapter', 'hf')}
  summary = {'requests': len(reqs), 'tokens': n_tokens, 'batch': args.batch,
             'model': 'llama L4 d256 h8, vocab 1000, 256 positions, float32, CPU',
             'max_abs_loglikelihood_diff': diff, 'median_requests_per_s_after_round_0': med,
             'ratio_adapter_over_hf': med['adapter'] / med['hf'], 'rounds': rows}
  print(json.dumps({k: v for k, v in summary.items() if k != 'rounds'}, indent=1))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  main()
