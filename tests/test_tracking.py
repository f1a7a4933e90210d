"""Weights & Biases tracking (lm/tracking.py) of a sweep in offline mode, and the one-sentence
refusals when wandb or lm-eval is not installed. The W&B test is marked `extras` (needs wandb:
pip install -r requirements-eval.txt); the refusals run in the default suite."""
import glob
import json
import os
import socket
import struct
import sys
import threading

import pytest

from lm.errors import UserError
from lm.scaling import sweep as sweep_lib
from test_sweep import tiny_sweep


def test_missing_wandb_is_refused_before_any_work(monkeypatch):
  from configs import base
  from lm.training.optim import TrainConfig
  monkeypatch.setitem(sys.modules, 'wandb', None)
  t = base.get_config().train
  t.wandb = True
  with pytest.raises(UserError, match=r'train.wandb=True needs the wandb package.*'
                                      r'pip install -r requirements-eval\.txt'):
    TrainConfig.from_config(t)


def test_missing_lm_eval_is_refused_in_one_sentence(monkeypatch, tmp_path):
  from configs import eval as eval_cfg
  from lm.eval import evaluate
  monkeypatch.setitem(sys.modules, 'lm_eval', None)
  c = eval_cfg.get_config().eval
  c.harness = 'hellaswag'
  with pytest.raises(UserError, match=r'harness tasks need lm-eval.*'
                                      r'pip install -r requirements-eval\.txt'):
    evaluate.evaluate_run(str(tmp_path), c)


def read_wandb_records(path):
  """The protobuf records of a .wandb file (a LevelDB-style log: 32 KiB blocks of records with a
  7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST), after its 7-byte file header."""
  from wandb.proto import wandb_internal_pb2 as pb
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  out, pos, parts = [], 7, b''
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    if left < 7:
      pos += left
      continue
    length, kind = struct.unpack('<HB', data[pos + 4:pos + 7])
    if length == 0 and kind == 0:
      pos += left
      continue
    chunk = data[pos + 7:pos + 7 + length]
    pos += 7 + length
    parts = chunk if kind in (1, 2) else parts + chunk
    if kind in (1, 4):
      r = pb.Record()
      r.ParseFromString(parts)
      out.append(r)
  return out


@pytest.mark.extras
def test_sweep_with_wandb_offline_logs_one_grouped_run_per_training_run(tmp_path, monkeypatch):
  """train.wandb=True in a sweep, WANDB_MODE=offline, no API key, and the W&B host pointed at a
  socket this test listens on: one offline run per training run under its folder, grouped by the
  sweep and tagged with N, D and C, with the resolved config and the metrics rows; the fit as an
  artifact of the group; and not one connection to the host."""
  pytest.importorskip('wandb')
  server = socket.socket()
  server.bind(('127.0.0.1', 0))
  server.listen(8)
  server.settimeout(0.2)
  accepted, stop = [], threading.Event()

  def listen():
    while not stop.is_set():
      try:
        accepted.append(server.accept())
      except OSError:
        pass
  thread = threading.Thread(target=listen, daemon=True)
  thread.start()
  for var in ('WANDB_API_KEY', 'WANDB_ENTITY', 'HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy',
              'https_proxy'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_BASE_URL', f'http://127.0.0.1:{server.getsockname()[1]}')
  monkeypatch.setenv('WANDB_CONFIG_DIR', str(tmp_path / 'wandb_config'))
  cfg = tiny_sweep(str(tmp_path / 'cache'))
  cfg.base.train.wandb, cfg.base.train.wandb_project = True, 'sweeps'
  workdir = str(tmp_path / 'my_sweep')
  try:
    out = sweep_lib.run_sweep(cfg, workdir)
  finally:
    stop.set()
    thread.join(timeout=2)
    server.close()
  assert out['finished'] == 6
  assert accepted == []   # nothing tried to reach the W&B host
  plan = json.load(open(os.path.join(workdir, 'sweep.json')))['runs']
  for sp in plan:
    rdir = os.path.join(workdir, 'runs', sp['name'])
    files = glob.glob(os.path.join(rdir, 'wandb', 'offline-run-*', 'run-*.wandb'))
    assert len(files) == 1, rdir
    records = read_wandb_records(files[0])
    run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
    assert run.run_group == 'my_sweep' and run.project == 'sweeps'
    assert f"N={sp['params']}" in run.tags and f"C={sp['budget']:g}" in run.tags
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config['train']['steps'] == sp['steps'] and config['model']['d_model'] == sp['d_model']
    assert config['manifest']['params'] == sp['params']
    logged = [{i.key or '/'.join(i.nested_key): i.value_json for i in r.history.item}
              for r in records if r.WhichOneof('record_type') == 'history']
    rows = [json.loads(l) for l in open(os.path.join(rdir, 'metrics.jsonl'))]
    assert len(logged) == len(rows)
    for got, want in zip(logged, rows):   # every scalar of every row, at its step
      assert int(got['_step']) == want['step']
      for k, v in want.items():
        if k != 'step' and isinstance(v, float):
          assert abs(float(got[k]) - v) <= 1e-6 * max(1.0, abs(v)), k
  fit_runs = glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'run-*.wandb'))
  assert len(fit_runs) == 1
  records = read_wandb_records(fit_runs[0])
  run = next(r.run for r in records if r.WhichOneof('record_type') == 'run')
  assert run.run_group == 'my_sweep' and run.job_type == 'fit'
  assert any(r.WhichOneof('record_type') == 'artifact' for r in records)
