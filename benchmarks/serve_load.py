"""Load on `run.py serve`: concurrent streams against one server, with a bounded local client.

Starts the server as its own process on a free port, then
  1. C concurrent streams for each C in --concurrency, the median of three rounds each
     (aggregate tokens/s, first-token latency),
  2. --rounds rounds of --streams concurrent streams, each just after three single streams: the
     ratio of the aggregate rate to one stream's, no request lost, no error, and the server's
     resident memory after each round,
  3. the malformed requests of `malformed()`, each of which must get a 4xx JSON error, and one
     good request after them.
Every stream asks /v1/chat/completions (or /v1/completions for a pretrained run) for exactly
--tokens tokens (ignore_eos) at temperature 0.8, and counts them from the usage chunk.

  python -m benchmarks.serve_load --workdir=runs/p46/sft --out=docs/results/serving
"""
import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def malformed(model: str) -> list:
  """(method, path, body, expected status): 20 requests a server must refuse with a JSON error.
  A bytes body is sent as it is; a dict as JSON."""
  hi = [{'role': 'user', 'content': 'hi'}]
  chat = '/v1/chat/completions'
  return [
      ('POST', chat, b'{not json', 400),
      ('POST', chat, b'[1, 2]', 400),
      ('POST', chat, {'messages': hi}, 400),
      ('POST', chat, {'model': model}, 400),
      ('POST', chat, {'model': model, 'messages': []}, 400),
      ('POST', chat, {'model': model, 'messages': [{'role': 'robot', 'content': 'hi'}]}, 400),
      ('POST', chat, {'model': 'gpt-9', 'messages': hi}, 404),
      ('POST', chat, {'model': model, 'temperature': -1, 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'temperature': 'hot', 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'top_p': 0, 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'n': 0, 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'max_tokens': 10_000, 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'messages': [{'role': 'user', 'content': 'long ' * 400}]},
       400),
      ('POST', chat, {'model': model, 'stop': ['a', 'b', 'c', 'd', 'e'], 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'logprobs': True, 'messages': hi}, 400),
      ('POST', chat, {'model': model, 'messages': [
          {'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': 'x'}}]}]}, 400),
      ('POST', '/v1/completions', {'model': model, 'prompt': []}, 400),
      ('POST', '/v1/completions', {'model': model, 'prompt': 'x', 'max_tokens': 0}, 400),
      ('GET', '/v1/nothing', None, 404),
      ('GET', chat, None, 405),
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
  import psutil
  return psutil.Process(pid).memory_info().rss / 2**20


async def _stream(client, url, body) -> dict:
  """One streamed request: first-token latency, tokens, total time, whether it ended cleanly."""
  t0 = time.perf_counter()
  first, tokens, done, error = None, 0, False, None
  try:
    async with client.stream('POST', url, json=body) as r:
      if r.status_code != 200:
        return {'error': f'HTTP {r.status_code}: {(await r.aread())[:200]!r}'}
      async for line in r.aiter_lines():
        if not line.startswith('data: '):
          continue
        data = line[6:]
        if data == '[DONE]':
          done = True
          break
        obj = json.loads(data)
        if 'error' in obj:
          error = obj['error']['message']
          break
        if obj.get('usage'):
          tokens = obj['usage']['completion_tokens']
        for c in obj.get('choices', []):
          piece = c.get('delta', {}).get('content') if 'delta' in c else c.get('text')
          if piece and first is None:
            first = time.perf_counter() - t0
  except Exception as e:   # a dropped connection is a lost request, reported, not raised
    error = repr(e)
  return {'first_s': first, 'tokens': tokens, 'wall_s': time.perf_counter() - t0,
          'done': done, 'error': error}


async def _round(base, body, path, concurrency: int, key: str) -> dict:
  import httpx
  limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
  headers = {'Authorization': f'Bearer {key}'} if key else {}
  async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits,
                               headers=headers) as client:
    t0 = time.perf_counter()
    results = await asyncio.gather(*[_stream(client, path, body) for _ in range(concurrency)])
    wall = time.perf_counter() - t0
  ok = [r for r in results if r.get('done') and not r.get('error')]
  firsts = np.array([r['first_s'] for r in ok if r['first_s'] is not None])
  tokens = sum(r['tokens'] for r in ok)
  return {'concurrency': concurrency, 'ok': len(ok), 'lost_or_failed': concurrency - len(ok),
          'errors': sorted({r['error'] for r in results if r.get('error')}),
          'tokens': tokens, 'wall_s': wall, 'tokens_per_s': tokens / wall,
          'first_token_p50_s': float(np.percentile(firsts, 50)) if len(firsts) else None,
          'first_token_p99_s': float(np.percentile(firsts, 99)) if len(firsts) else None}


def _malformed(base, model, key) -> dict:
  import httpx
  headers = {'Authorization': f'Bearer {key}'} if key else {}
  out = []
  with httpx.Client(base_url=base, timeout=60, headers=headers) as c:
    for method, path, body, status in malformed(model):
      kw = {'content': body} if isinstance(body, bytes) else {'json': body} if body else {}
      r = c.request(method, path, **kw)
      try:
        shaped = bool(r.json()['error']['message'])
      except Exception:
        shaped = False
      out.append({'path': path, 'status': r.status_code, 'expected': status,
                  'json_error': shaped})
    after = c.get('/health').status_code
  return {'answered_4xx_json': sum(400 <= o['status'] < 500 and o['json_error'] for o in out),
          'as_expected': sum(o['status'] == o['expected'] for o in out), 'total': len(out),
          'health_after': after, 'requests': out}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', required=True, help='the run to serve')
  p.add_argument('--tokens', type=int, default=64)
  p.add_argument('--streams', type=int, default=64)
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--concurrency', default='1,4,16,64')
  p.add_argument('--slots', type=int, default=64)
  p.add_argument('--out', default='')
  args = p.parse_args()
  port, key = _free_port(), 'bench-key'
  base = f'http://127.0.0.1:{port}'
  env = dict(os.environ, LM_API_KEY=key)
  server = subprocess.Popen([sys.executable, os.path.join(ROOT, 'run.py'), 'serve',
                             f'--workdir={args.workdir}', f'--port={port}',
                             f'--slots={args.slots}'], env=env, cwd=ROOT)
  try:
    import httpx
    t0 = time.perf_counter()
    while True:
      if server.poll() is not None:
        raise SystemExit(f'error: the server exited with status {server.returncode}.')
      try:
        if httpx.get(base + '/health', timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      time.sleep(0.5)
    startup = time.perf_counter() - t0
    card = httpx.get(base + '/v1/models', headers={'Authorization': f'Bearer {key}'}).json()
    card = card['data'][0]
    path = '/v1/chat/completions' if card['chat'] else '/v1/completions'
    body = {'model': card['id'], 'max_tokens': args.tokens, 'temperature': 0.8,
            'ignore_eos': True, 'stream': True, 'stream_options': {'include_usage': True}}
    if card['chat']:
      body['messages'] = [{'role': 'user', 'content': 'Write a short story about a robot.'}]
    else:
      body['prompt'] = 'Once upon a time'
    print(f'server up in {startup:.1f} s (load and compile); model {card["id"]}, '
          f'{args.slots} slots', flush=True)
    run = lambda c: asyncio.run(_round(base, body, path, c, key))
    run(args.streams)   # the first full round after start-up is slow (allocation); not counted
    scan = []
    for c in [int(x) for x in args.concurrency.split(',')]:
      tries = [run(c) for _ in range(3)]   # each point: the median of three rounds
      r = sorted(tries, key=lambda t: t['tokens_per_s'])[1]
      r['tries_tokens_per_s'] = [t['tokens_per_s'] for t in tries]
      scan.append(r)
      print(f"{c:3d} streams: {r['tokens_per_s']:7.1f} tokens/s, first token p50 "
            f"{r['first_token_p50_s']:.3f} s p99 {r['first_token_p99_s']:.3f} s, "
            f"{r['lost_or_failed']} lost", flush=True)
    # The ratio: rounds of --streams streams taking turns with single streams, so that the
    # machine's drift moves both sides alike.
    rounds = []
    for i in range(args.rounds):
      single = sorted(run(1)['tokens_per_s'] for _ in range(3))[1]
      r = run(args.streams)
      r['server_rss_mb'] = _rss_mb(server.pid)
      r['single_stream_tokens_per_s'] = single
      r['ratio'] = r['tokens_per_s'] / single
      rounds.append(r)
      print(f"round {i + 1}: {r['ok']}/{args.streams} streams ok, {r['tokens_per_s']:.1f} "
            f"tokens/s = {r['ratio']:.1f}x one stream's {single:.1f} (just before), first token "
            f"p99 {r['first_token_p99_s']:.3f} s, server RSS {r['server_rss_mb']:.0f} MB",
            flush=True)
    bad = _malformed(base, card['id'], key)
    print(f"malformed: {bad['answered_4xx_json']}/{bad['total']} answered with a 4xx JSON "
          f"error ({bad['as_expected']} with the expected status); /health after: "
          f"{bad['health_after']}", flush=True)
  finally:
    server.terminate()
    server.wait(30)
  ratios = [r['ratio'] for r in rounds]
  result = {'workdir': args.workdir, 'model': card['id'], 'slots': args.slots,
            'tokens_per_stream': args.tokens, 'startup_s': startup, 'scan': scan,
            'rounds': rounds, 'malformed': bad,
            'ratio_median': float(np.median(ratios)), 'ratio_range': [min(ratios), max(ratios)],
            'lost_or_failed': sum(r['lost_or_failed'] for r in scan + rounds)}
  print(f"aggregate at {args.streams} streams / one stream: median {np.median(ratios):.1f}x "
        f"(rounds {min(ratios):.1f}-{max(ratios):.1f}x); lost or failed: "
        f"{result['lost_or_failed']}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'load.json'), 'w') as f:
      json.dump(result, f, indent=1)
    _plot(scan, os.path.join(args.out, 'load.png'))
    print(f'wrote {args.out}/load.json and load.png')


def _plot(scan, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  c = [r['concurrency'] for r in scan]
  fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
  a.plot(c, [r['tokens_per_s'] for r in scan], 'o-')
  a.set(xscale='log', xlabel='concurrent streams', ylabel='tokens/s (all streams)',
        title='throughput')
  b.plot(c, [r['first_token_p50_s'] for r in scan], 'o-', label='p50')
  b.plot(c, [r['first_token_p99_s'] for r in scan], 's--', label='p99')
  b.set(xscale='log', xlabel='concurrent streams', ylabel='seconds', title='first-token latency')
  b.legend()
  for ax in (a, b):
    ax.set_xticks(c, [str(x) for x in c])
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
