"""lm-evaluation-harness numbers through the project's adapter beside lm-eval's own `hf` class.

    python -m benchmarks.harness_parity --out=docs/results/harness/parity.json

Two models, each scored by both sides on the same two local tasks (tests/test_harness.py
write_local_tasks: a multiple-choice task on lines of standard-library code, and a
rolling-loglikelihood task on whole lines):
  imported: a Llama-shaped model made with transformers and imported (`run.py import`'s code);
  trained:  a small model pretrained here (configs/tiny.py with a SwiGLU MLP, --steps steps),
            exported to a Hugging Face folder (`run.py export`'s code) so that transformers can
            load it.
Prints and writes the task metrics of both sides and the largest per-request log-likelihood
difference, for lm-eval's hf class as it is and with its prefix token (what an empty context is
conditioned on) set to the run's EOS, as the adapter does. Needs lm-eval, accelerate, torch, transformers.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def score(lm, tasks_dir):
  import lm_eval
  from lm_eval.tasks import TaskManager
  res = lm_eval.simple_evaluate(model=lm, tasks=['local_mc', 'local_text'],
                                task_manager=TaskManager(include_path=tasks_dir),
                                bootstrap_iters=0, log_samples=True, verbosity='ERROR')
  metrics = {t: {k.split(',')[0]: v for k, v in m.items()
                 if isinstance(v, float) and 'stderr' not in k}
             for t, m in res['results'].items()}
  lls = []
  for t in ('local_mc', 'local_text'):
    for s in res['samples'][t]:
      for r in s['resps']:
        lls.append(r[0][0] if isinstance(r[0], (list, tuple)) else r[0])
  return metrics, np.asarray(lls, np.float64)


def HFLM_bos(folder):
  import transformers
  return transformers.AutoTokenizer.from_pretrained(folder).bos_token_id


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default='')
  ap.add_argument('--steps', type=int, default=300)
  args = ap.parse_args()
  sys.path.insert(0, ROOT)
  from lm_eval.models.huggingface import HFLM
  from configs import tiny
  from lm import runs
  from lm.eval import harness
  from lm.interop import hf
  from lm.stages import pretrain
  from benchmarks.harness_speed import make_model
  from tests.test_harness import write_local_tasks
  tmp = tempfile.mkdtemp()
  tasks = write_local_tasks(os.path.join(tmp, 'tasks'))
  out = {}
  # imported from transformers
  src, run = os.path.join(tmp, 'hf'), os.path.join(tmp, 'imported')
  make_model(src)
  hf.import_model(src, run, overwrite=True)
  # trained here, then exported so that transformers can read it
  c = tiny.get_config()
  c.train.steps, c.train.progress = args.steps, 'none'
  c.model.mlp = 'swiglu'   # the Llama family, which transformers reads back
  c.data.cache_dir = os.path.join(tmp, 'cache')
  trained, exported = os.path.join(tmp, 'trained'), os.path.join(tmp, 'trained_hf')
  pretrain.train(c, trained)
  hf.export_run(trained, exported)
  for name, ours_dir, hf_dir in (('imported', run, src), ('trained', trained, exported)):
    mc, params, tokenizer, _ = runs.load_model(ours_dir)
    a_metrics, a_ll = score(harness.make_adapter(mc, params, tokenizer, batch_size=16), tasks)
    b_metrics, b_ll = score(HFLM(pretrained=hf_dir, device='cpu', dtype='float32',
                                 batch_size=16), tasks)
    out[name] = {'adapter': a_metrics, 'hf': b_metrics, 'requests': len(a_ll),
                 'max_abs_loglikelihood_diff': float(np.abs(a_ll - b_ll).max())}
    # lm-eval's hf class conditions an empty context (a rolling text's first window) on the
    # tokenizer's BOS when it declares one; the project's runs are trained on documents separated
    # by EOS and condition on EOS. With the same prefix token both sides agree.
    c_metrics, c_ll = score(HFLM(pretrained=hf_dir, device='cpu', dtype='float32',
                                 batch_size=16, prefix_token_id=tokenizer.eos_id), tasks)
    out[name].update({'hf_prefix_eos': c_metrics, 'hf_bos_id': HFLM_bos(hf_dir),
                      'max_abs_loglikelihood_diff_prefix_eos': float(np.abs(a_ll - c_ll).max())})
    print(name, json.dumps(out[name], indent=1), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
