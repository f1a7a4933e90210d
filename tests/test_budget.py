"""--minutes: the time model, the planner on mocked throughput, the plan file and its refusals,
and one real measurement in a throwaway process (lm/scaling/budget.py)."""
import json
import math
import os
import subprocess
import sys

import pytest

from configs import sweep_smoke
from lm.errors import UserError
from lm.scaling import budget as budget_lib
from lm.scaling import plan as plan_lib
from lm.scaling import report as report_lib
from lm.scaling import runner as runner_lib
from lm.data.tokenizer import ByteTokenizer

VOCAB = ByteTokenizer().vocab_size   # the default sweep's byte corpus
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_like(scale=1.0, compile_s=8.0):
  """What 2 CPU cores measured on the default sweep's shapes: about 3e10 FLOP/s at 7K parameters
  rising to 8e10 at 200K (small models use a CPU poorly), 8 s of compiling per run."""
  return lambda sp: {'params': sp.params, 'flops_per_s': scale * 3e10 * (sp.params / 7e3) ** 0.3,
                     'compile_s': compile_s, 'eval_s': 0.05, 'checkpoint_s': 0.1}


def flat(rate, compile_s=1.5):
  """One rate at every size (an accelerator, mocked)."""
  return lambda sp: {'params': sp.params, 'flops_per_s': rate, 'compile_s': compile_s,
                     'eval_s': 0.05, 'checkpoint_s': 0.1}


def choose(measure, minutes=10.0, cfg=None, **kw):
  return budget_lib.choose(cfg or sweep_smoke.get_config(), VOCAB, minutes, measure,
                           clock=lambda: 0.0, **kw)


def grid_steps(a, b):
  return round(4 * math.log10(b / a))


# ---------------------------------------------------------------------------------------------
# The time model against hand numbers


def spec(params, steps, fpt, name='r', trunk='', branch_step=0, batch=16):
  return plan_lib.RunSpec(name, 1, 16, 1, steps, 1e-3, 0, 0, 1e12, params, fpt, trunk=trunk,
                          branch_step=branch_step, batch_size=batch)


def test_time_model_against_hand_numbers():
  c = sweep_smoke.get_config()
  s, base = c.sweep, c.base   # 4 evaluations and 4 saves per run; batch 16 x 128 tokens
  model = budget_lib.TimeModel(
      [{'params': 1e4, 'flops_per_s': 1e10, 'compile_s': 2.0, 'eval_s': 0.5, 'checkpoint_s': 0.25},
       {'params': 1e6, 'flops_per_s': 1e12, 'compile_s': 4.0, 'eval_s': 1.5, 'checkpoint_s': 0.75}],
      fixed_s=1.0)
  # Halfway in log N: the rate is the geometric mean, the overheads the arithmetic one.
  assert model.flops_per_s(1e5) == pytest.approx(1e11)
  assert model.flops_per_s(1e3) == pytest.approx(1e10)
  assert model.flops_per_s(1e8) == pytest.approx(1e12)
  # 100 steps of 2048 tokens at 1e6 FLOPs a token: 2.048e11 FLOPs at 1e11 FLOP/s = 2.048 s;
  # evaluations at steps 25, 50, 75, 100 (4 x 1.0 s), saves there too (4 x 0.5 s), compiling
  # 3 s, the fixed 1 s.
  sp = spec(1e5, 100, 1e6)
  assert model.run_s(sp, s, base) == pytest.approx(2.048 + 4 * 1.0 + 4 * 0.5 + 3.0 + 1.0)
  # 101 steps: one more evaluation and save at the last step.
  assert model.run_s(spec(1e5, 101, 1e6), s, base) == pytest.approx(
      101 * 2048 * 1e6 / 1e11 + 5 * 1.5 + 3.0 + 1.0)
  # A WSD branch trains its last 20 steps alone: one evaluation and one save of its own.
  branch = spec(1e5, 100, 1e6, name='b', trunk='r', branch_step=80)
  assert model.run_s(branch, s, base) == pytest.approx(20 * 2048 * 1e6 / 1e11 + 1.5 + 3.0 + 1.0)
  # Runs in worker processes each pay a process's start as well.
  workers = budget_lib.TimeModel(model.points, fixed_s=1.0, process_s=4.0, workers=True)
  assert workers.run_s(sp, s, base) == pytest.approx(model.run_s(sp, s, base) + 4.0)
  # The sweep: a family on one slot; the makespan is the longest-first schedule's.
  two = budget_lib.TimeModel(model.points, fixed_s=1.0, slots=2)
  t = two.sweep_s([sp, branch, spec(1e5, 100, 1e6, name='x')], s, base)
  one = model.run_s(sp, s, base)
  assert t['serial_s'] == pytest.approx(2 * one + model.run_s(branch, s, base))
  assert t['runs_s'] == pytest.approx(one + model.run_s(branch, s, base))
  assert t['fit_s'] == budget_lib.FIT_S
  assert budget_lib.makespan([5, 4, 3, 3, 3], 2) == 10   # LPT: 5+3 | 4+3+3
  assert budget_lib.makespan([5, 4, 3, 3, 3], 1) == 18
  assert budget_lib.makespan([5, 4, 3], 8) == 5


def test_the_budget_grid():
  assert [budget_lib.grid_value(j) for j in range(48, 53)] == [1e12, 1.8e12, 3.2e12, 5.6e12,
                                                              1e13]
  assert budget_lib.budget_indices(47, 53, 3) == (47, 50, 53)
  assert budget_lib.budget_indices(47, 53, 4) == (47, 49, 51, 53)
  assert budget_lib.budget_indices(47, 48, 3) == (47, 48)


# ---------------------------------------------------------------------------------------------
# The planner on mocked throughput


def test_cpu_like_rate_gives_budgets_near_the_default():
  plan = choose(cpu_like())
  b = plan['budgets']
  assert len(b) == 3 and 3e11 <= b[0] and 1e12 <= b[-1] <= 1e13   # the default: 1e12, 3e12
  assert plan['predicted_s']['total_s'] <= 600
  # Every run long enough: the floor of steps (MIN_STEPS, sweep.min_steps being unset).
  c = budget_lib.apply(sweep_smoke.get_config(), plan)
  specs = plan_lib.plan(c.sweep, c.base, VOCAB)
  assert len(specs) == plan['runs'] and min(sp.steps for sp in specs) >= budget_lib.MIN_STEPS
  # The predicted time is the model's: the runs one after another (sweep.parallel = 1) + the fit.
  p = plan['predicted_s']
  assert p['runs_s'] == pytest.approx(sum(plan['run_predicted_s'].values()), rel=1e-3)
  assert p['total_s'] == pytest.approx(p['spent_s'] + p['runs_s'] + p['fit_s'])


def test_fast_device_plans_large_budgets_over_a_factor_30():
  plan = choose(flat(4e14))
  assert min(plan['budgets']) >= 1e15
  assert plan['span'] >= 30 and len(plan['budgets']) >= 3
  assert plan['predicted_s']['total_s'] <= 600


def test_more_minutes_never_narrow_the_span():
  """The span in steps of the grid (a factor 10^(1/4) each: on the grid itself, 6 steps are a
  factor 31.1-32.1 depending on the mantissa they start from)."""
  spans, tops = [], []
  for minutes in (6, 8, 10, 15, 20, 30, 60, 120):
    plan = choose(cpu_like(), minutes)
    assert plan['predicted_s']['total_s'] <= 60 * minutes
    spans.append(grid_steps(plan['budgets'][0], plan['budgets'][-1]))
    tops.append(plan['budgets'][-1])
  assert spans == sorted(spans) and tops == sorted(tops)
  assert spans[0] < budget_lib.SPAN_CAP_STEPS == spans[-1]


def test_time_spent_before_planning_counts():
  quick = choose(cpu_like(), 15)
  late = choose(cpu_like(), 15, spent_s=240.0)
  assert late['predicted_s']['total_s'] <= 900 and late['predicted_s']['spent_s'] == 240.0
  assert late['budgets'][-1] < quick['budgets'][-1]


def test_noise_moves_a_budget_by_one_grid_step_at_most():
  """A plan is a choice among discrete ones, so some rate is always at a boundary; on the grid
  (1, 1.8, 3.2, 5.6 x 10^k) a 10% error in the measured rate changes no budget by more than one
  step, and across a factor 16 of rates about half of the plans do not change at all."""
  same = 0
  scales = [0.7 * 1.5 ** k for k in range(8)]
  for scale in scales:
    plans = [choose(cpu_like(scale * f))['budgets'] for f in (0.9, 1.0, 1.1)]
    for other in (plans[0], plans[2]):
      assert abs(len(other) - len(plans[1])) <= 1
      assert abs(grid_steps(other[0], plans[1][0])) <= 1
      assert abs(grid_steps(other[-1], plans[1][-1])) <= 1
    same += plans[0] == plans[1] == plans[2]
  assert same >= 3
  fast = [choose(flat(4e14 * f))['budgets'] for f in (0.9, 1.0, 1.1)]
  for other in (fast[0], fast[2]):
    assert abs(grid_steps(other[0], fast[1][0])) <= 1
    assert abs(grid_steps(other[-1], fast[1][-1])) <= 1


def test_too_few_minutes_are_refused_with_the_minutes_needed():
  with pytest.raises(UserError, match=r'--minutes=1 is too short .* give --minutes=\d+ or more'):
    choose(cpu_like(), 1.0)


def test_the_measured_shapes_cover_the_plan():
  asked = []

  def measure(sp):
    asked.append(sp.params)
    return cpu_like()(sp)
  plan = choose(measure)
  assert len(asked) == len(set(asked)) >= 2 and not plan['uncovered']
  top = max(plan['budgets'])
  c = budget_lib.apply(sweep_smoke.get_config(), plan)
  largest = max(sp.params for sp in plan_lib.plan(c.sweep, c.base, VOCAB) if sp.budget == top)
  assert any(abs(math.log(largest / n)) <= math.log(budget_lib.NEAR) for n in asked)


def test_parallel_zero_slots_agree_with_the_runner(monkeypatch):
  from lm.scaling import parallel as parallel_lib
  for platform, count in (('cpu', 1), ('gpu', 4), ('tpu', 8)):
    monkeypatch.setattr(parallel_lib, 'probe_devices', lambda p=platform, c=count: (p, c))
    assert budget_lib.auto_slots(platform, count) == runner_lib.auto_parallel(10 ** 6)


# ---------------------------------------------------------------------------------------------
# The plan file, reruns and refusals


def test_rerun_reuses_the_plan_and_other_minutes_are_refused(tmp_path):
  calls = []

  def measure(sp):
    calls.append(sp.name)
    return cpu_like()(sp)
  size = lambda c, minutes: budget_lib.sized_config(c, str(tmp_path), minutes, VOCAB, measure,
                                                   log=lambda _: None, spent_s=0.0)
  cfg = size(sweep_smoke.get_config(), 10)
  saved = json.loads((tmp_path / budget_lib.PLAN_FILE).read_text())
  assert list(cfg.sweep.budgets) == saved['budgets'] and saved['minutes'] == 10 and calls
  n = len(calls)
  again = size(sweep_smoke.get_config(), 10)
  assert len(calls) == n   # not measured again
  assert again.to_json() == cfg.to_json()
  with pytest.raises(UserError, match=r'planned for --minutes=10 .* new --workdir'):
    size(sweep_smoke.get_config(), 5)
  other = sweep_smoke.get_config()
  other.sweep.span = 3.0
  with pytest.raises(UserError, match=r'another sweep config \(sweep.span 4.0 -> 3.0\)'):
    size(other, 10)
  assert len(calls) == n and not (tmp_path / '.lock').exists()


def test_sweeps_without_budgets_are_refused():
  for key, value, match in (('mode', 'grid', 'sweep.mode=grid has none'),
                            ('mode', 'wsd', 'sweep.mode=wsd has none'),
                            ('pack', 2, 'sweep.pack=2'), ('only', 'L1', "sweep.only='L1'")):
    c = sweep_smoke.get_config()
    with c.sweep.unlocked():
      c.sweep[key] = value
    with pytest.raises(UserError, match=match):
      choose(cpu_like(), cfg=c)
  for bad in (0, -1, float('nan')):
    with pytest.raises(UserError, match='must be a positive number of minutes'):
      budget_lib.check_minutes(bad)


def test_isoflop_wsd_is_planned_with_its_branches():
  c = sweep_smoke.get_config()
  c.sweep.mode = 'isoflop_wsd'
  plan = choose(cpu_like(), 20, cfg=c)
  assert len(plan['budgets']) >= 3 and plan['predicted_s']['total_s'] <= 1200
  # Branches train only their cooldowns: the same budgets cost less than as cosine runs.
  iso = sweep_smoke.get_config()
  model = budget_lib.TimeModel([cpu_like()(spec(n, 1, 1)) for n in (7e3, 3e5)],
                               budget_lib.FIXED_S)
  wsd_cfg, iso_cfg = budget_lib.apply(c, plan), budget_lib.apply(iso, plan)
  wsd = model.sweep_s(plan_lib.plan(wsd_cfg.sweep, c.base, VOCAB), wsd_cfg.sweep, c.base)
  cos = model.sweep_s(plan_lib.plan(iso_cfg.sweep, iso.base, VOCAB), iso_cfg.sweep, iso.base)
  assert wsd['serial_s'] < cos['serial_s']


def test_report_states_what_the_span_can_pin(tmp_path):
  plan = {'minutes': 10, 'budgets': [5.6e11, 1e12, 1.8e12], 'device': '1 x cpu (2 cores)',
          'measured': [{'flops_per_s': 3e10}, {'flops_per_s': 6e10}],
          'predicted_s': {'total_s': 550.0}}
  (tmp_path / budget_lib.PLAN_FILE).write_text(json.dumps(plan))
  text = '\n'.join(report_lib._minutes_section(tmp_path))
  assert '--minutes=10' in text and '5.6e11, 1e12, 1.8e12 FLOPs' in text
  assert 'cannot pin the exponent a' in text and 'More minutes or a faster device' in text
  plan['budgets'] = [1e15, 5.6e15, 3.2e16]
  (tmp_path / budget_lib.PLAN_FILE).write_text(json.dumps(plan))
  text = '\n'.join(report_lib._minutes_section(tmp_path))
  assert 'a factor 32' in text and 'cannot pin' not in text
  assert report_lib._minutes_section(tmp_path / 'none') == []
  # A fit of other budgets (the folder swept again without --minutes) gets no paragraph.
  fit = {'approach2': {'budgets': [{'C': C} for C in plan['budgets']], 'skipped_budgets': []}}
  assert report_lib._minutes_section(tmp_path, fit)
  fit['approach2']['budgets'] = [{'C': 1e12}, {'C': 3e12}]
  assert report_lib._minutes_section(tmp_path, fit) == []


def test_cli_refuses_grid_mode_and_bad_minutes(tmp_path):
  for args, match in ((['--config.sweep.mode=grid', '--minutes=5'], 'sweep.mode=grid has none'),
                      (['--minutes=0'], 'must be a positive number of minutes')):
    out = subprocess.run([sys.executable, 'run.py', 'sweep', '--config=configs/sweep_smoke.py',
                          *args, f'--workdir={tmp_path}/sw'], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    err = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and err[-1].startswith('error: --minutes') and match in err[-1]
    assert not os.path.exists(f'{tmp_path}/sw')


# ---------------------------------------------------------------------------------------------
# One real measurement, in a throwaway process


def test_real_measurement_in_a_subprocess(tmp_path):
  c = sweep_smoke.get_config()
  b = c.base
  b.data.max_bytes, b.data.cache_dir = 200_000, str(tmp_path / 'cache')
  b.model.max_len = 32
  b.train.batch_size, b.train.seq_len, b.train.eval_batches = 4, 32, 2
  c.sweep.head_dim, c.sweep.aspect, c.sweep.sizes_per_budget = 8, 16.0, 3
  c.sweep.evals_per_run = c.sweep.checkpoints_per_run = 1
  from lm.data import tokens as data_lib
  vocab = data_lib.prepare(data_lib.DataConfig.from_config(b.data)).tokenizer.vocab_size
  plan = budget_lib.measure_in_subprocess(c, vocab, 60.0, 1, False, 0.0, measure_limit_s=0.0)
  assert len(plan['measured']) == 1   # no second shape once the limit has passed
  m = plan['measured'][0]
  assert m['flops_per_s'] > 0 and m['compile_s'] > 0 and m['steps_timed'] >= 5
  assert m['batch_size'] == 4 and m['seq_len'] == 32
  assert 'cpu' in plan['device'] and plan['measure_s'] > 0 and len(plan['budgets']) >= 2
