"""Policies on the code task or on addition, all on the same held-out sample: reward and KL to the
SFT model.

    python -m benchmarks.policy_eval --sft=runs/sft_code --out=RESULT.json \
        ppo=runs/ppo grpo=runs/grpo [lora=runs/grpo_lora ...]
    python -m benchmarks.policy_eval --task=arith --sft=runs/sft_add --out=RESULT.json grpo=runs/grpo_add

The settings of the preference lesson's table (experiments/rlhf.py evaluate_policies, without a
reward model): every held-out header (--prompts=0) sampled --samples times at temperature 1 with
seed 999, gold reward by the task's program, Monte Carlo KL per response to the SFT model. Each
named run also reports the size of its last checkpoint.

--task=arith: every held-out --digits-digit addition problem of the GRPO task (--prompts=0), greedy
exact match, and --samples samples each at temperature 1 (seed 999): their exact match and KL.
"""
import argparse
import json
import os
import time
import types

from lm.align import common, grpo


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def run_info(workdir: str) -> dict:
  out = {'workdir': os.path.abspath(workdir)}
  ckpts = os.path.join(workdir, 'checkpoints')
  steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if os.path.isdir(ckpts) else []
  if steps:
    out['checkpoint_bytes'] = _dir_bytes(os.path.join(ckpts, str(steps[-1])))
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--sft', required=True)
  ap.add_argument('--out', required=True)
  ap.add_argument('--prompts', type=int, default=0, help='held-out headers (0: all)')
  ap.add_argument('--samples', type=int, default=4)
  ap.add_argument('--task', choices=('code', 'arith'), default='code')
  ap.add_argument('--digits', type=int, default=2, help='arith: digits per operand')
  ap.add_argument('policies', nargs='*', help='name=RUN_DIR')
  a = ap.parse_args()
  sft = common.load_policy(a.sft)
  if a.task == 'code':
    headers = common.task_prompts('eval', a.prompts)
    ev = common.Evaluator(headers, sft, None, 128, 48, 1.0, 128, samples=a.samples, seed=999)
    n = len(headers)
  else:
    task = grpo.arith_task('eval', a.digits, a.prompts)
    gc = types.SimpleNamespace(max_new_tokens=8, sample_batch=128, temperature=1.0,
                               eval_samples=a.samples)
    ev = grpo.ArithEvaluator(task, sft, gc, 128, seed=999)
    n = len(task.prompts)
  result = {'task': a.task, 'prompts': n, 'samples': a.samples, 'rows': {}}
  todo = [('sft', a.sft)] + [tuple(p.split('=', 1)) for p in a.policies]
  for name, d in todo:
    t0 = time.time()
    params = sft.params if name == 'sft' else common.load_policy(d).params
    row = ev.evaluate(params, prefix='')
    row.update(run_info(d), eval_s=time.time() - t0)
    result['rows'][name] = row
    score = (f"gold {row['gold']:.3f}" if a.task == 'code' else
             f"exact {row['exact']:.3f}  sampled exact {row['sample_exact']:.3f}")
    print(f"{name:>12}: {score}  KL {row['kl']:.2f}  length {row['length']:.1f}", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, 'w') as f:
    json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
