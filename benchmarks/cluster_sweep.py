"""A sweep on a Ray cluster that loses a node and its driver, against the same sweep run locally.

    python -m benchmarks.cluster_sweep --out=docs/results/cluster_sweep [--config=configs/sweep_smoke.py]

Starts a Ray cluster on this machine: a head with no CPUs for runs and two worker "nodes" of one
CPU each (`ray start`, separate custom resources node_a and node_b). Then `run.py sweep` with
sweep.backend=ray, and on the way:
  1. once a run on node_a has saved a checkpoint, node_a's raylet is killed (SIGKILL, by PID);
  2. once three runs are booked, the driver is SIGKILLed and started again;
  3. once six runs are booked, the same again; the third driver finishes the sweep.
Afterwards it checks that every planned run is booked exactly once in results.csv, counts how
often each run started from scratch and from a checkpoint (its train.log), and compares every
run's eval loss with the same sweep trained by `run.py sweep` locally (in one process), given
as --reference or trained first. Writes OUT/cluster_sweep.json and OUT/driver.log.

Needs ray (pip install -r requirements-cluster.txt). `ray stop --force` at the end stops every
Ray process on this machine: run it where no other Ray cluster runs.
"""
import argparse
import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ray_cli(*args, check=True):
  out = subprocess.run(['ray', *args, '--disable-usage-stats'] if args[0] == 'start'
                       else ['ray', *args], capture_output=True, text=True, timeout=300)
  if check and out.returncode != 0:
    raise SystemExit(f'ray {" ".join(args)} failed: {out.stderr[-2000:]}')
  return out


def start_cluster(port: int) -> str:
  address = f'127.0.0.1:{port}'
  ray_cli('start', '--head', f'--port={port}', '--num-cpus=0', '--resources={"head": 1}',
          '--include-dashboard=false', '--node-ip-address=127.0.0.1')
  for name in ('node_a', 'node_b'):
    ray_cli('start', f'--address={address}', '--num-cpus=1', f'--resources={{"{name}": 1}}',
            '--node-ip-address=127.0.0.1')
  return address


def node_ids(address: str) -> dict:
  """{'node_a': node id, 'node_b': node id} from the cluster's own listing (a throwaway process,
  so this script never becomes a Ray driver itself)."""
  code = ('import json, ray; ray.init(address=%r, log_to_driver=False); '
          'print(json.dumps({k: n["NodeID"] for n in ray.nodes() if n["Alive"] '
          'for k in n["Resources"] if k.startswith("node_")}))' % address)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def raylet_pid(node_id: str) -> int:
  out = subprocess.run(['pgrep', '-af', 'raylet'], capture_output=True, text=True).stdout
  for line in out.splitlines():
    if f'--node_id={node_id}' in line:
      return int(line.split()[0])
  raise SystemExit(f'no raylet process for node {node_id}')


def booked(workdir: str) -> list[dict]:
  try:
    with open(os.path.join(workdir, 'results.csv'), newline='') as f:
      return list(csv.DictReader(f))
  except OSError:
    return []


def run_with_checkpoint(workdir: str, node: str | None = None) -> str | None:
  """A run still training (no summary.json) with a checkpoint saved, on `node` if given."""
  runs = os.path.join(workdir, 'runs')
  for name in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
    rdir = os.path.join(runs, name)
    if os.path.exists(os.path.join(rdir, 'summary.json')):
      continue
    try:
      with open(os.path.join(rdir, 'node.json')) as f:
        where = json.load(f)
    except (OSError, ValueError):
      continue
    ckpt = os.path.join(rdir, 'checkpoints')
    if (node is None or where.get('node') == node) and os.path.isdir(ckpt) and any(
        d.isdigit() for d in os.listdir(ckpt)):
      return name
  return None


def wait_for(predicate, what: str, proc=None, timeout_s: float = 3600.0):
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    if proc is not None and proc.poll() is not None:
      raise SystemExit(f'the driver exited (status {proc.returncode}) before {what}')
    time.sleep(0.5)
  raise SystemExit(f'timed out waiting for {what}')


def driver(args, workdir: str, address: str, log) -> subprocess.Popen:
  cmd = [sys.executable, 'run.py', 'sweep', f'--config={args.config}', f'--workdir={workdir}',
         '--config.sweep.backend=ray', f'--config.sweep.ray_address={address}']
  log.write(f'\n$ {" ".join(cmd)}\n')
  log.flush()
  return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def starts(rdir: str) -> tuple[int, int]:
  """(fresh starts, resumptions from a checkpoint) of a run, from its train.log: a progress line
  whose step is not past the one before starts the run over, unless a resumption line precedes."""
  try:
    text = open(os.path.join(rdir, 'train.log')).read()
  except OSError:
    return 0, 0
  fresh = resumed = 0
  last, resuming = None, False
  for line in text.splitlines():
    m = re.search(r'resuming from step (\d+)', line)
    if m:
      resumed, last, resuming = resumed + 1, int(m.group(1)), True
      continue
    m = re.match(r'step (\d+)/', line)
    if m:
      k = int(m.group(1))
      if not resuming and (last is None or k <= last):
        fresh += 1
      last, resuming = k, False
  return fresh, resumed


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--out', default='docs/results/cluster_sweep')
  ap.add_argument('--config', default='configs/sweep_smoke.py')
  ap.add_argument('--reference', default='', help="a local sweep's results.csv")
  ap.add_argument('--port', type=int, default=6391)
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  work = os.path.abspath(os.path.join(args.out, 'work'))
  ray_dir, local_dir = os.path.join(work, 'ray'), os.path.join(work, 'local')
  log = open(os.path.join(args.out, 'driver.log'), 'a')
  t0 = time.time()
  events = []
  address = start_cluster(args.port)
  try:
    ids = node_ids(address)
    events.append(f'cluster up: head + node_a {ids["node_a"][:8]} + node_b {ids["node_b"][:8]}')
    proc = driver(args, ray_dir, address, log)
    victim = wait_for(lambda: run_with_checkpoint(ray_dir, ids['node_a']),
                      'a run on node_a with a checkpoint', proc)
    os.kill(raylet_pid(ids['node_a']), signal.SIGKILL)
    events.append(f'{time.time() - t0:.0f} s: killed node_a (raylet) while it trained {victim}')
    for at in (3, 6):
      wait_for(lambda: len(booked(ray_dir)) >= at and run_with_checkpoint(ray_dir),
               f'{at} runs booked and a run with a checkpoint', proc)
      training = run_with_checkpoint(ray_dir)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      events.append(f'{time.time() - t0:.0f} s: SIGKILLed the driver with {len(booked(ray_dir))} '
                    f'runs booked, {training} mid-run; started it again')
      proc = driver(args, ray_dir, address, log)
    code = proc.wait()
    events.append(f'{time.time() - t0:.0f} s: the third driver exited with status {code}')
  finally:
    ray_cli('stop', '--force', check=False)
  cluster_s = time.time() - t0

  if args.reference:
    reference = args.reference
  else:
    t1 = time.time()
    subprocess.run([sys.executable, 'run.py', 'sweep', f'--config={args.config}',
                    f'--workdir={local_dir}'], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                   check=True)
    events.append(f'local reference sweep: {time.time() - t1:.0f} s')
    reference = os.path.join(local_dir, 'results.csv')
  with open(os.path.join(ray_dir, 'sweep.json')) as f:
    planned = [r['name'] for r in json.load(f)['runs']]
  rows = booked(ray_dir)
  ref = {r['run']: float(r['eval_loss']) for r in booked(os.path.dirname(reference))} \
      if not args.reference else {r['run']: float(r['eval_loss'])
                                  for r in csv.DictReader(open(reference))}
  per_run = []
  for name in planned:
    got = [float(r['eval_loss']) for r in rows if r['run'] == name]
    fresh, resumed = starts(os.path.join(ray_dir, 'runs', name))
    per_run.append({'run': name, 'rows': len(got), 'eval_loss': got[0] if got else None,
                    'reference': ref.get(name), 'fresh_starts': fresh, 'resumptions': resumed})
  failures = []
  if os.path.exists(os.path.join(ray_dir, 'failures.jsonl')):
    failures = [json.loads(l) for l in open(os.path.join(ray_dir, 'failures.jsonl'))]
  diffs = [abs(r['eval_loss'] - r['reference']) for r in per_run
           if r['eval_loss'] is not None and r['reference'] is not None]
  result = {'config': args.config, 'cluster_wall_s': cluster_s, 'events': events,
            'planned': len(planned), 'booked_once': sum(r['rows'] == 1 for r in per_run),
            'max_abs_loss_diff': max(diffs) if diffs else None, 'compared': len(diffs),
            'failures_jsonl': [{k: f.get(k) for k in ('run', 'attempt', 'lost', 'error')}
                               for f in failures],
            'runs': per_run}
  with open(os.path.join(args.out, 'cluster_sweep.json'), 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != 'runs'}, indent=1))


if __name__ == '__main__':
  main()
