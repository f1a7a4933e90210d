"""The official `openai` client against `run.py serve`, compared with `run.py sample`.

Starts the server on a run, asks it each held-out instruction of the built-in set (--n of them)
through `openai.OpenAI(...).chat.completions.create` at temperature 0, once whole and once
streamed, and compares both with what `run.py sample --temperature=0` answers (the same
function, `lm.eval.sample.chat`, in this process).

  python -m benchmarks.serve_parity --workdir=runs/p46/sft --out=docs/results/serving
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True)
  p.add_argument('--n', type=int, default=40, help='held-out instructions to ask')
  p.add_argument('--max_tokens', type=int, default=48)
  p.add_argument('--out', default='')
  args = p.parse_args()
  sys.path.insert(0, ROOT)
  import openai
  from benchmarks.serve_load import _free_port
  from lm import runs
  from lm.data import instruct
  from lm.eval import sample

  mc, params, tokenizer, _ = runs.load_model(args.workdir)
  per_family = -(-args.n // len(instruct.FAMILIES))
  held_out = instruct.build_instruction_set(train_per_family=1, eval_per_family=per_family)['eval']
  prompts = [e['prompt'] for e in held_out[::max(1, len(held_out) // args.n)]][:args.n]
  port = _free_port()
  server = subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), 'serve',
                             f'--workdir={args.workdir}', f'--port={port}'], cwd=ROOT)
  try:
    client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='none')
    t0 = time.time()
    while True:
      try:
        model = client.models.list().data[0].id
        break
      except openai.APIConnectionError:
        if server.poll() is not None or time.time() - t0 > 300:
          raise SystemExit('error: the server did not start.')
        time.sleep(1)
    rows = []
    for prompt in prompts:
      msg = [{'role': 'user', 'content': prompt}]
      ref = sample.chat(mc, params, tokenizer, msg, args.max_tokens, temperature=0)[0]
      whole = client.chat.completions.create(model=model, messages=msg, temperature=0,
                                             max_tokens=args.max_tokens)
      pieces = [c.choices[0].delta.content or '' for c in client.chat.completions.create(
          model=model, messages=msg, temperature=0, max_tokens=args.max_tokens, stream=True)
          if c.choices]
      rows.append({'prompt': prompt, 'sample': ref, 'api': whole.choices[0].message.content,
                   'streamed': ''.join(pieces), 'chunks': len(pieces)})
  finally:
    server.terminate()
    server.wait(30)
  same = sum(r['api'] == r['sample'] for r in rows)
  same_stream = sum(r['streamed'] == r['sample'] for r in rows)
  print(f'{len(rows)} held-out instructions at temperature 0: the API equals run.py sample in '
        f'{same}, the streamed API in {same_stream} (median '
        f"{sorted(r['chunks'] for r in rows)[len(rows) // 2]} chunks per reply)")
  for r in rows[:5]:
    print(f"  {r['prompt']!r} -> {r['api']!r}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'parity.json'), 'w') as f:
      json.dump({'workdir': args.workdir, 'equal': same, 'equal_streamed': same_stream,
                 'total': len(rows), 'rows': rows}, f, indent=1, ensure_ascii=False)
    print(f'wrote {args.out}/parity.json')


if __name__ == '__main__':
  main()
