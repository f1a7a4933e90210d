"""Packed runs (lm/scaling/packed.py): K runs in one vmapped program equal the same runs alone."""
import csv
import glob
import json
import os

import numpy as np
import pytest

from configs import base
from lm import runs
from lm.stages import pretrain as train_lib
from lm.errors import UserError
from lm.scaling import packed as packed_lib
from lm.scaling import plan as plan_lib
from lm.scaling import runner as runner_lib
from lm.scaling import sweep as sweep_lib

MEMBERS = ((0, 3e-3), (1, 6e-3))   # (seed, peak lr)


def member_config(cache_dir, seed, lr, **model):
  c = base.get_config()
  c.seed = seed
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 2, 32, 4, 64
  for k, v in model.items():
    c.model[k] = v
  c.data.max_bytes, c.data.cache_dir = 400_000, cache_dir
  for k, v in dict(steps=12, batch_size=8, seq_len=32, lr=lr, warmup_steps=2, eval_every=6,
                   eval_batches=2, log_every=2, checkpoint_every=4, progress='none').items():
    c.train[k] = v
  return c


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def alone(cache_dir, tmp_path_factory):
  """Each member trained by itself, as a sweep without packing trains it."""
  out = []
  for seed, lr in MEMBERS:
    rdir = str(tmp_path_factory.mktemp(f'alone{seed}'))
    out.append((rdir, train_lib.train(member_config(cache_dir, seed, lr), rdir)))
  return out


@pytest.fixture(scope='module')
def packed(cache_dir, tmp_path_factory):
  """The members packed, stopped at step 4 (as SIGTERM would) and resumed by a second call."""
  root = tmp_path_factory.mktemp('packed')
  rdirs = [str(root / f'm{seed}') for seed, _ in MEMBERS]
  cfgs = [member_config(cache_dir, seed, lr) for seed, lr in MEMBERS]
  stopped = packed_lib.train(cfgs, rdirs, str(root / 'pack'), stop_at=4)
  stopped_with_summary = [os.path.exists(os.path.join(r, 'summary.json')) for r in rdirs]
  summaries = packed_lib.train(cfgs, rdirs, str(root / 'pack'))
  return rdirs, summaries, root, (stopped, stopped_with_summary)


def test_a_stopped_pack_writes_no_summary_and_resumes(packed):
  """The resumed pack's numbers are checked against the lone runs in the next test."""
  _, summaries, _, (stopped, with_summary) = packed
  assert not any(s['finished'] for s in stopped) and not any(with_summary)
  assert all(s['steps'] == 4 for s in stopped) and all(s['finished'] for s in summaries)


def test_packed_runs_equal_the_same_runs_alone(alone, packed):
  """Each member of a pack (stopped at step 4 and resumed) ends where it ends trained alone."""
  rdirs, summaries, root, _ = packed
  for (rdir_a, sum_a), rdir_p, sum_p in zip(alone, rdirs, summaries):
    rows_a, rows_p = read_metrics(rdir_a), read_metrics(rdir_p)
    assert [r['step'] for r in rows_a] == [r['step'] for r in rows_p]
    for key in ('loss', 'loss_avg', 'grad_norm', 'lr'):
      np.testing.assert_allclose([r[key] for r in rows_p], [r[key] for r in rows_a],
                                 rtol=2e-4, err_msg=key)
    evals_a = [r['eval_loss'] for r in rows_a if 'eval_loss' in r]
    evals_p = [r['eval_loss'] for r in rows_p if 'eval_loss' in r]
    assert len(evals_a) == 2
    np.testing.assert_allclose(evals_p, evals_a, rtol=2e-4)
    for key in ('steps', 'tokens', 'flops', 'flops_6nd', 'params', 'params_nonembed'):
      assert sum_p[key] == sum_a[key], key
    np.testing.assert_allclose(sum_p['eval_loss'], sum_a['eval_loss'], rtol=2e-4)
    assert sum_p['finished'] and sum_p['packed'] == len(MEMBERS)
    with open(os.path.join(rdir_p, 'summary.json')) as f:
      assert json.load(f)['eval_loss'] == sum_p['eval_loss']
  # The members really differ (seed and lr), so equality above is not one run copied.
  assert len({round(s['eval_loss'], 4) for s in summaries}) == len(MEMBERS)
  assert not os.path.exists(root / 'pack')   # the stacked checkpoints go once members are done


def test_a_packed_member_folder_is_a_complete_run(alone, packed, cache_dir):
  """Its final checkpoint holds that member's weights: it resumes as finished, like a lone run."""
  rdirs, summaries, _, _ = packed
  _, params_p, _, _ = runs.load_model(rdirs[1])
  _, params_a, _, _ = runs.load_model(alone[1][0])
  import jax
  for a, p in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_p)):
    np.testing.assert_allclose(np.asarray(p), np.asarray(a), rtol=2e-3, atol=2e-5)
  seed, lr = MEMBERS[1]
  again = train_lib.train(member_config(cache_dir, seed, lr), rdirs[1])
  assert again['eval_loss'] == summaries[1]['eval_loss']


def test_members_of_different_programs_are_refused(cache_dir, tmp_path):
  cfgs = [member_config(cache_dir, 0, 3e-3), member_config(cache_dir, 1, 3e-3, n_layers=3)]
  with pytest.raises(UserError, match='model.n_layers'):
    packed_lib.train(cfgs, [str(tmp_path / 'a'), str(tmp_path / 'b')], str(tmp_path / 'pack'))
  assert not os.path.exists(tmp_path / 'a')
  cfgs = [member_config(cache_dir, 0, 3e-3, dropout=0.1), member_config(cache_dir, 1, 3e-3,
                                                                        dropout=0.1)]
  with pytest.raises(UserError, match='dropout'):
    packed_lib.check_members(cfgs)


def test_sweep_groups_only_runs_that_differ_in_seed(cache_dir):
  from tests.test_sweep import tiny_sweep
  c = tiny_sweep(cache_dir)
  c.sweep.seeds, c.sweep.pack = 1, 2
  c.sweep.seeds_smallest = 3
  specs = plan_lib.plan(c.sweep, c.base, 259)
  jobs = [runner_lib.Job(i, sp, plan_lib.run_config(c.base, sp), f'/x/{sp.name}', 1)
          for i, sp in enumerate(specs)]
  groups = runner_lib.packs(jobs, 2)
  assert sorted(j.spec.name for g in groups for j in g) == sorted(sp.name for sp in specs)
  for g in groups:
    assert len({(j.spec.n_layers, j.spec.d_model, j.spec.steps) for j in g}) == 1
  # 3 sizes of the smallest budget with 3 seeds: a pack of 2 and one alone each; the rest alone.
  assert sorted(len(g) for g in groups) == [1] * (len(specs) - 6) + [2] * 3
  c.sweep.parallel = 2
  with pytest.raises(UserError, match='sweep.pack'):
    plan_lib.validate(c.sweep)


def test_a_packed_sweep_books_every_member(cache_dir, tmp_path):
  """sweep.pack through the sweep driver: the smallest budget's seeds train as packs (through
  the training loop's packed stage), each member booked in results.csv as a finished run."""
  from tests.test_sweep import tiny_sweep
  c = tiny_sweep(cache_dir, budgets=(4e9,))
  c.sweep.sizes_per_budget, c.sweep.seeds, c.sweep.seeds_smallest, c.sweep.pack = 1, 1, 2, 2
  c.sweep.bootstrap = 0
  out = sweep_lib.run_sweep(c, str(tmp_path))
  assert out['finished'] == 2 and not out['failed']
  rows = list(csv.DictReader(open(tmp_path / 'results.csv')))
  assert len(rows) == 2 and len({r['seed'] for r in rows}) == 2
  packed = [json.load(open(os.path.join(d, 'manifest.json')))['packed']
            for d in glob.glob(str(tmp_path / 'runs' / '*'))]
  assert sorted(p['index'] for p in packed) == [0, 1]
  assert not os.path.exists(tmp_path / 'packs') or not os.listdir(tmp_path / 'packs')
