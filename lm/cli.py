"""The subcommands behind run.py; each takes the parsed absl FLAGS."""
import os

from lm.errors import UserError
from lm import chat as chat_lib
from lm import pipeline as pipeline_lib
from lm.align import dpo as dpo_lib
from lm.align import grpo as grpo_lib
from lm.align import ppo as ppo_lib
from lm.align import reward as reward_lib
from lm.eval import evaluate as evaluate_lib
from lm.interop import hf
from lm.metrics import read_json_object, write_json_atomic
from lm.scaling import budget as budget_lib
from lm.scaling import fit as fit_lib
from lm.scaling import plot as plot_lib
from lm.scaling import report as report_lib
from lm.scaling import sweep as sweep_lib
from lm.stages import finetune as finetune_lib
from lm.stages import pretrain as train_lib


DEFAULT_MINUTES = 10.0   # `python run.py` alone: the default sweep planned for this long


def _need(value, flag: str, example: str):
  if not value:
    raise UserError(f'--{flag} is required, e.g. {example}.')
  return value


def _folder(value, flag: str, example: str) -> str:
  """A required folder flag (--workdir, --out); an existing file of that name is refused."""
  _need(value, flag, example)
  if os.path.isfile(value):
    raise UserError(f'--{flag}={value} is a file, not a folder; name a folder, e.g. {example}.')
  return value


def train(FLAGS):
  cfg = _need(FLAGS.config, 'config', '--config=configs/tiny.py')
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/tiny')
  summary = train_lib.train(cfg, workdir)
  if summary.get('finished'):
    ev = summary.get('eval_loss')
    print(f"done: {summary['steps']} steps, train loss {summary['final_loss']:.4f}"
          + (f', eval loss {ev:.4f}' if ev is not None else '') + f'; outputs in {workdir}')


def finetune(FLAGS):
  cfg = _need(FLAGS.config, 'config', '--config=configs/sft.py')
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/sft')
  if 'finetune' not in cfg:
    raise UserError('--config is not a fine-tuning config (it has no `finetune` section); use '
                    'e.g. --config=configs/sft.py.')
  summary = finetune_lib.finetune(cfg, workdir)
  if summary.get('finished'):
    ft = summary['finetune']
    acc = lambda d: ', '.join(f"{k[4:]} {v:.0%}" for k, v in sorted(d.items())
                              if k.startswith('acc/') and k != 'acc/all')
    print(f"done: {summary['steps']} steps, held-out loss {summary['eval_loss']:.4f}; "
          f"{ft['trainable_params']:,} trainable parameters ({ft['trainable_fraction']:.2%})")
    if 'acc/all' in ft['after']:
      print(f"exact match before: {ft['before']['acc/all']:.1%} ({acc(ft['before'])})")
      print(f"exact match after:  {ft['after']['acc/all']:.1%} ({acc(ft['after'])})")
    print(f'outputs in {workdir}')


def _stage(FLAGS, section: str, example: str):
  cfg = _need(FLAGS.config, 'config', f'--config=configs/{example}.py')
  workdir = _folder(FLAGS.workdir, 'workdir', f'--workdir=runs/{example}')
  if section not in cfg:
    raise UserError(f'--config has no `{section}` section; use --config=configs/{example}.py.')
  return cfg, workdir


def reward(FLAGS):
  cfg, workdir = _stage(FLAGS, 'reward', 'reward')
  summary = reward_lib.train_reward(cfg, workdir)
  if summary.get('finished'):
    r = summary['reward']
    print(f"done: {summary['steps']} steps on {r['train_pairs']} pairs; held-out pair accuracy "
          f"{r['eval_accuracy']:.1%} on {r['eval_pairs']} pairs; outputs in {workdir}")


def dpo(FLAGS):
  cfg, workdir = _stage(FLAGS, 'dpo', 'dpo')
  summary = dpo_lib.train_dpo(cfg, workdir)
  if summary.get('finished'):
    a = summary['dpo']['after']
    print(f"done: {summary['steps']} steps; held-out gold reward {a['eval_gold']:.3f} at KL "
          f"{a['eval_kl']:.2f} nats to the SFT model; outputs in {workdir}")


def ppo(FLAGS):
  cfg, workdir = _stage(FLAGS, 'ppo', 'ppo')
  summary = ppo_lib.train_ppo(cfg, workdir)
  if summary.get('finished'):
    a = summary['ppo']['after']
    print(f"done: {summary['steps']} iterations; held-out gold reward {a['eval_gold']:.3f}, "
          f"proxy {a['eval_proxy']:.3f}, at KL {a['eval_kl']:.2f} nats to the SFT model; "
          f'outputs in {workdir}')


def grpo(FLAGS):
  cfg, workdir = _stage(FLAGS, 'grpo', 'grpo')
  summary = grpo_lib.train_grpo(cfg, workdir)
  if summary.get('finished'):
    a = summary['grpo']['after']
    score = (f"held-out exact match {a['eval_exact']:.1%}" if 'eval_exact' in a
             else f"held-out gold reward {a['eval_gold']:.3f}")
    print(f"done: {summary['steps']} iterations; {score} at KL {a['eval_kl']:.2f} nats to the "
          f'SFT model; outputs in {workdir}')


def merge(FLAGS):
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/sft_lora')
  out = _folder(FLAGS.out, 'out', '--out=runs/sft_lora_merged')
  hf.check_apart(workdir, out, '--workdir', '--out')
  finetune_lib.merge(workdir, out)
  print(f'wrote the merged model to {out}')


def export(FLAGS):
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/base_small')
  out = _folder(FLAGS.out, 'out', '--out=runs/base_small_hf')
  if FLAGS.max_shard_mb < 1:
    raise UserError(f'--max_shard_mb={FLAGS.max_shard_mb} must be at least 1.')
  info = hf.export_run(workdir, out, overwrite=FLAGS.overwrite,
                       max_shard_bytes=FLAGS.max_shard_mb << 20)
  print(f"wrote {out}: a {info['family']} model ({info['bytes'] / 1e6:.1f} MB of float32 weights "
        f"from step {info['step']}), files {', '.join(info['files'])}")


def import_(FLAGS):
  src = _need(FLAGS.hf, 'hf', '--hf=path/to/hf_model')
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/imported')
  info = hf.import_model(src, workdir, overwrite=FLAGS.overwrite,
                         add_chat_tokens=FLAGS.add_chat_tokens)
  m = info['model']
  print(f"wrote {workdir}: {info['architecture']} with {m['n_layers']} layers, d_model "
        f"{m['d_model']}, {m['n_heads']} heads ({m['n_kv_heads']} key/value), vocabulary "
        f"{m['vocab_size']}; sample, finetune or train it with --config.train.init_from")


def eval(FLAGS):   # noqa: A001 (the subcommand's name)
  from configs import eval as eval_config
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/tiny')
  cfg = FLAGS.config or eval_config.get_config()
  if 'eval' not in cfg:
    raise UserError('--config is not an eval config (it has no `eval` section); use '
                    '--config=configs/eval.py or leave --config out.')
  result = evaluate_lib.evaluate_run(workdir, cfg.eval)
  print(evaluate_lib.table(result))
  print(f'wrote {os.path.join(workdir, "eval.json")}')


def sample(FLAGS):
  chat_lib.sample_cli(_folder(FLAGS.workdir, 'workdir', '--workdir=runs/tiny'), FLAGS.prompt,
                      FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                      FLAGS.seed, FLAGS.num_samples, raw=FLAGS.raw, system=FLAGS.system)


def pipeline(FLAGS):
  from configs import pipeline as pipeline_config
  cfg = FLAGS.config or pipeline_config.get_config()
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/pipeline')
  if 'pipeline' not in cfg:
    raise UserError('--config is not a pipeline config (it has no `pipeline` section); use '
                    '--config=configs/pipeline.py.')
  pipeline_lib.run_pipeline(cfg, workdir)


def chat(FLAGS):
  chat_lib.chat_cli(_folder(FLAGS.workdir, 'workdir', '--workdir=runs/sft_full'), FLAGS.prompt,
                    FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p,
                    FLAGS.seed, FLAGS.system)


def serve(FLAGS):
  # Here rather than at the top: fastapi and uvicorn take 0.4 s to import, which every other
  # subcommand would pay.
  from lm.serve import api as serve_lib
  serve_lib.serve(_folder(FLAGS.workdir, 'workdir', '--workdir=runs/sft'), FLAGS.host,
                  FLAGS.port, FLAGS.api_key, FLAGS.slots, FLAGS.model_name)


def sweep(FLAGS, cfg=None, workdir=None, minutes=None):
  cfg = cfg or _need(FLAGS.config, 'config', '--config=configs/sweep_smoke.py')
  workdir = workdir or _folder(FLAGS.workdir, 'workdir', '--workdir=runs/sweep')
  if 'sweep' not in cfg or 'base' not in cfg:
    raise UserError('--config is not a sweep config (it needs `sweep` and `base` sections); '
                    'use e.g. --config=configs/sweep_smoke.py, or `run.py train` for one run.')
  minutes = getattr(FLAGS, 'minutes', None) if minutes is None else minutes
  if minutes is not None:   # the budgets sized to this machine (lm/scaling/budget.py)
    cfg = budget_lib.sized_config(cfg, workdir, minutes)
  out = sweep_lib.run_sweep(cfg, workdir)
  if out.get('stopped'):
    return
  print(f"sweep: {out['finished']} runs finished, {len(out['failed'])} failed, "
        f"{out['wall_s']:.0f} s; results in {out['results']}")
  fit = out.get('fit')
  if fit:
    a2, a3 = fit['approach2'], fit['approach3']
    fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'
    print(f"fit: approach 2 a={fmt(a2.get('a'))} b={fmt(a2.get('b'))}; approach 3 "
          f"E={fmt(a3.get('E'))} alpha={fmt(a3.get('alpha'))} beta={fmt(a3.get('beta'))} "
          f"a={fmt(a3.get('a'))}")
    print(report_lib.verdict(fit).replace('**', ''))
    print(f'plots and report: {os.path.abspath(workdir)}/*.png, '
          f'{os.path.abspath(workdir)}/report.md')


def default(FLAGS):
  """`python run.py` alone: the default smoke sweep into runs/sweep_smoke, its budgets planned
  for --minutes (10 by default) on this machine."""
  from configs import sweep_smoke
  workdir = _folder(FLAGS.workdir or os.path.join('runs', 'sweep_smoke'), 'workdir',
                    '--workdir=runs/sweep_smoke')
  minutes = getattr(FLAGS, 'minutes', None)
  minutes = DEFAULT_MINUTES if minutes is None else minutes
  print(f'running the default scaling sweep (configs/sweep_smoke.py) into {workdir}, planned for '
        f"{minutes:g} minute{'' if minutes == 1 else 's'} on this machine; see README.md for "
        'other commands')
  sweep(FLAGS, sweep_smoke.get_config(), workdir, minutes)


def fit(FLAGS):
  results = _need(FLAGS.results, 'results', '--results=runs/sweep_smoke/results.csv')
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/fit')
  # The table is read (and refused if it is not one) before anything beside it.
  fit_lib.read_results(results, FLAGS.loss_key, FLAGS.params_key, FLAGS.flops_key)
  # A sweep's results.csv (even mid-sweep) comes with its runs' training curves: Approach 1.
  curves = sweep_lib.curves_beside(results)
  out = report_lib.run_fit(results, workdir, loss_key=FLAGS.loss_key, params_key=FLAGS.params_key,
                        flops_key=FLAGS.flops_key, bootstrap=FLAGS.bootstrap, curves=curves)
  if curves:
    write_json_atomic(os.path.join(workdir, 'curves.json'), curves)   # for `run.py plot`
  a3 = out['approach3']
  g = lambda v: 'none' if v is None else f'{v:.4g}'
  print(f"approach 3: E={g(a3['E'])} A={g(a3['A'])} B={g(a3['B'])} alpha={g(a3['alpha'])} "
        f"beta={g(a3['beta'])} a={g(a3['a'])}")
  if a3['a'] is None:
    print('approach 3 gives no exponent: a fitted alpha or beta is not positive, so loss does not '
          'fall with parameters and data in these runs (see report.md).')
  elif out['approach2']['budgets'] or out['approach2']['skipped_budgets']:
    print(report_lib.verdict(out).replace('**', ''))
  print(f'wrote {workdir}/fit.json, {workdir}/report.md and the plots')


def plot(FLAGS):
  """Re-draws the plots of a sweep or fit folder from its results.csv and fit.json."""
  workdir = _folder(FLAGS.workdir, 'workdir', '--workdir=runs/sweep_smoke')
  fit_path = os.path.join(workdir, 'fit.json')
  results = FLAGS.results or os.path.join(workdir, 'results.csv')
  if not os.path.exists(fit_path):
    raise UserError(f'{fit_path} does not exist; run `run.py fit` or `run.py sweep` first.')
  fitted = read_json_object(fit_path, 'delete it and run `run.py fit` (or the sweep) again to '
                            'rebuild it, or restore it')
  if not isinstance(fitted.get('columns'), dict) or not isinstance(fitted.get('approach3'), dict):
    raise UserError(f'{fit_path} does not hold a fit (no columns or approach3); delete it and run '
                    '`run.py fit` (or the sweep) again to rebuild it, or restore it.')
  cols = fitted['columns']
  rows = fit_lib.read_results(results, cols.get('loss'), cols.get('params', 'params'),
                              cols.get('flops'))
  note = fit_lib.check_same_table(fitted, results, rows)   # refuses another table
  if note:
    print(note)
  curves_path = os.path.join(workdir, 'curves.json')
  curves = fit_lib.read_curves(curves_path) if os.path.exists(curves_path) else None
  for p in plot_lib.make_all(fitted, rows, workdir, curves=curves):
    print(p)
