"""lm-evaluation-harness through the project's model (lm/eval/harness.py): the adapter's three
request types against direct scoring and sampling, parity with lm-eval's own `hf` model class on
an imported Hugging Face model (local multiple-choice and rolling-loglikelihood tasks), and a local
task end to end through `run.py eval`. Needs lm-eval, accelerate, torch and transformers (marked
`extras`: pip install -r requirements-eval.txt -r requirements-test.txt)."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.extras

lm_eval = pytest.importorskip('lm_eval')
pytest.importorskip('accelerate')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from lm import runs
from lm.eval import harness
from lm.eval import sample as sample_lib
from lm.interop import hf
from tests import test_hf
from tests.test_hf import make_hf_model

hf_tokenizer_dir = test_hf.hf_tokenizer_dir   # the fixture, shared

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _code_lines(n, seed=0):
  rng = np.random.default_rng(seed)
  lines = [ln.strip() for ln in open(textwrap.__file__).read().split('\n')
           if 12 < len(ln.strip()) < 60]
  return [lines[i] for i in rng.choice(len(lines), n, replace=False)]


def write_local_tasks(folder):
  """Two lm-eval tasks on local JSON lines: multiple choice (the true end of a line of stdlib
  code among three others) and rolling log-likelihood (whole lines of code)."""
  os.makedirs(folder, exist_ok=True)
  lines = _code_lines(48)
  mc = []
  for i in range(12):
    line = lines[i]
    cut = len(line) // 2
    others = [lines[12 + 3 * i + k][len(lines[12 + 3 * i + k]) // 2:] for k in range(3)]
    choices = others[:i % 4] + [line[cut:]] + others[i % 4:]
    mc.append({'question': line[:cut], 'choices': choices, 'answer': i % 4})
  with open(os.path.join(folder, 'mc.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in mc)
  with open(os.path.join(folder, 'text.jsonl'), 'w') as f:
    f.writelines(json.dumps({'text': '\n'.join(lines[k:k + 6])}) + '\n' for k in range(0, 36, 6))
  common = 'dataset_path: json\ntest_split: train\n'
  with open(os.path.join(folder, 'local_mc.yaml'), 'w') as f:
    f.write(f'task: local_mc\n{common}dataset_kwargs:\n  data_files: {folder}/mc.jsonl\n'
            'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
            'metric_list:\n  - metric: acc\n')
  with open(os.path.join(folder, 'local_text.yaml'), 'w') as f:
    f.write(f'task: local_text\n{common}dataset_kwargs:\n  data_files: {folder}/text.jsonl\n'
            'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
            'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n')
  return folder


@pytest.fixture(scope='module')
def imported_llama(hf_tokenizer_dir, tmp_path_factory):
  src = str(tmp_path_factory.mktemp('llama_hf'))
  make_hf_model(src, hf_tokenizer_dir, 'llama')
  run = str(tmp_path_factory.mktemp('llama_run'))
  hf.import_model(src, run, overwrite=True)
  mc, params, tokenizer, _ = runs.load_model(run)
  return src, run, harness.make_adapter(mc, params, tokenizer, batch_size=8)


def instances(kind, args):
  from lm_eval.api.instance import Instance
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihood_equals_direct_scoring(imported_llama):
  _, _, lm = imported_llama
  pairs = [('def f(x):\n    return', ' x + 1'), ('import os', '\nimport sys'), ('', 'hello'),
           ('a = 1  ', 'b')]
  got = lm.loglikelihood(instances('loglikelihood', pairs), disable_tqdm=True)
  for (ctx, cont), (lp, greedy) in zip(pairs, got):
    if ctx:
      n = len(ctx) - len(ctx.rstrip())   # trailing spaces move to the continuation
      ctx, cont = ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont
      whole, c = lm.tok_encode(ctx + cont), lm.tok_encode(ctx)
      c_ids, cont_ids = c, whole[len(c):]
    else:
      c_ids, cont_ids = [lm.eot_token_id], lm.tok_encode(cont)
    want = sample_lib.continuation_logprob(lm.mc, lm.params, c_ids, cont_ids)
    assert abs(lp - want) < 1e-4
    seq = np.asarray([c_ids + cont_ids])
    logits = np.asarray(sample_lib.model_lib.apply(lm.mc, lm.params, seq[:, :-1]))[0]
    assert greedy == bool(all(logits[len(c_ids) - 1 + k].argmax() == t
                              for k, t in enumerate(cont_ids)))


def test_rolling_loglikelihood_covers_every_token_once(imported_llama):
  """Longer than model.max_len: the windows still predict every token exactly once."""
  _, _, lm = imported_llama
  text = '\n'.join(_code_lines(12, seed=3))
  ids = lm.tok_encode(text)
  assert len(ids) > lm.max_length
  (got,) = lm.loglikelihood_rolling(instances('loglikelihood_rolling', [(text,)]),
                                    disable_tqdm=True)
  want, prev = 0.0, [lm.eot_token_id]
  for start in range(0, len(ids), lm.max_length):   # disjoint windows with full left context
    chunk = ids[start:start + lm.max_length]
    ctx = (prev + ids[:start])[-(lm.max_length + 1 - len(chunk)):]
    want += sample_lib.continuation_logprob(lm.mc, lm.params, ctx, chunk)
  assert abs(got - want) < 1e-3 and got < 0


def test_generate_until_is_greedy_decoding_cut_at_the_stop(imported_llama):
  _, _, lm = imported_llama
  prompts = ['def f(x):\n', 'import']
  got = lm.generate_until(instances('generate_until', [
      (p, {'until': ['\n'], 'max_gen_toks': 12}) for p in prompts]), disable_tqdm=True)
  for p, text in zip(prompts, got):
    ids = sample_lib.generate_tokens(lm.mc, lm.params, [lm.tok_encode(p)], 12, 0.0, 0, 1.0, 0,
                                     eos_id=lm.eot_token_id, pad_id=lm.tok.pad_id)[0]
    full = lm.tok.decode(sample_lib.cut_at_eos(ids, lm.eot_token_id))
    assert text == full.split('\n')[0] and '\n' not in text


def test_local_tasks_equal_lm_evals_hf_model(imported_llama, tmp_path):
  """The acceptance: per-example log-likelihoods of lm-eval's `hf` class on the same weights, to
  1e-4, and the same accuracy and perplexity."""
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
  src, _, ours = imported_llama
  tasks = write_local_tasks(str(tmp_path / 'tasks'))
  theirs = HFLM(pretrained=src, device='cpu', dtype='float32', batch_size=8)
  out = {}
  for name, lm in (('ours', ours), ('hf', theirs)):
    out[name] = lm_eval.simple_evaluate(model=lm, tasks=['local_mc', 'local_text'],
                                        task_manager=TaskManager(include_path=tasks),
                                        bootstrap_iters=0, log_samples=True, verbosity='ERROR')
  for task in ('local_mc', 'local_text'):
    a = [s['resps'] for s in out['ours']['samples'][task]]
    b = [s['resps'] for s in out['hf']['samples'][task]]
    assert len(a) == len(b) > 0
    flat = lambda r: np.asarray([x[0][0] if isinstance(x[0], (list, tuple)) else x[0]
                                 for ex in r for x in ex], np.float64)
    np.testing.assert_allclose(flat(a), flat(b), atol=1e-4, rtol=0)
  assert out['ours']['results']['local_mc']['acc,none'] == out['hf']['results']['local_mc'][
      'acc,none']
  for m in ('word_perplexity,none', 'bits_per_byte,none'):
    assert abs(out['ours']['results']['local_text'][m] / out['hf']['results']['local_text'][m]
               - 1) < 1e-4


def test_local_task_through_run_py_eval(imported_llama, tmp_path):
  """`run.py eval --config.eval.harness=...` writes the harness's numbers into eval.json beside
  the project's own, and they equal run_harness on the same run."""
  _, run, lm = imported_llama
  tasks = write_local_tasks(str(tmp_path / 'tasks'))
  out = subprocess.run(
      [sys.executable, 'run.py', 'eval', f'--workdir={run}', '--config=configs/eval.py',
       '--config.eval.harness=local_mc', f'--config.eval.harness_include={tasks}',
       '--config.eval.tasks=', '--config.eval.val=False', f'--config.eval.corpora={tasks}/text.jsonl',
       '--config.eval.harness_limit=8'], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.load(open(os.path.join(run, 'eval.json')))
  got = result['harness']
  assert got['n']['local_mc'] == 8 and 0 <= got['tasks']['local_mc']['acc'] <= 1
  want = harness.run_harness(lm, ['local_mc'], limit=8, include=tasks)
  assert got['tasks'] == want['tasks']
  assert 'local_mc' in out.stdout and 'acc' in out.stdout
  assert result['text']   # the project's own metrics beside them


def test_unknown_task_is_one_sentence(imported_llama):
  from lm.errors import UserError
  with pytest.raises(UserError, match="lm-eval knows no task 'no_such_task'"):
    harness.run_harness(imported_llama[2], ['no_such_task'])


def test_train_eval_harness_scores_tasks_at_evaluations(cache_dir, tmp_path):
  """train.eval_harness: the harness tasks scored at each evaluation land in metrics.jsonl, and
  the last equals scoring the finished run's weights afterwards."""
  from lm.stages import pretrain as train_lib
  from tests.test_hf import small_run_config
  tasks = write_local_tasks(str(tmp_path / 'tasks'))
  c = small_run_config(cache_dir, steps=4)
  c.train.eval_every = 2
  c.train.eval_harness, c.train.eval_harness_limit = 'local_mc', 6
  c.train.eval_harness_include = tasks
  run = str(tmp_path / 'run')
  train_lib.train(c, run)
  rows = [json.loads(l) for l in open(os.path.join(run, 'metrics.jsonl'))]
  scored = [r for r in rows if 'harness/local_mc/acc' in r]
  assert [r['step'] for r in scored] == [2, 4]
  mc, params, tokenizer, _ = runs.load_model(run)
  again = harness.run_harness(harness.make_adapter(mc, params, tokenizer), ['local_mc'], limit=6,
                              include=tasks)
  assert scored[-1]['harness/local_mc/acc'] == again['tasks']['local_mc']['acc']


def test_unknown_harness_task_in_training_is_refused_before_training(cache_dir, tmp_path):
  from lm.errors import UserError
  from lm.stages import pretrain as train_lib
  from tests.test_hf import small_run_config
  c = small_run_config(cache_dir, steps=2)
  c.train.eval_harness = 'no_such_task'
  with pytest.raises(UserError, match="lm-eval knows no task 'no_such_task'"):
    train_lib.train(c, str(tmp_path / 'run'))
  assert not os.path.exists(os.path.join(tmp_path, 'run', 'metrics.jsonl'))


def test_sweep_scores_every_run_and_plots_tasks_against_compute(tmp_path):
  """sweep.harness: every finished run scored on the task list (harness.json per run, kept on a
  rerun), harness.csv with N, D, C, loss and the task metrics, and task_vs_compute.png."""
  import csv
  from lm.scaling import sweep as sweep_lib
  from tests.test_sweep import tiny_sweep
  tasks = write_local_tasks(str(tmp_path / 'tasks'))
  cfg = tiny_sweep(str(tmp_path / 'cache'), budgets=(4e9,))
  cfg.sweep.harness, cfg.sweep.harness_limit, cfg.sweep.harness_include = 'local_mc', 4, tasks
  workdir = str(tmp_path / 'sweep')
  out = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert out['finished'] == 3 and set(out['harness']) == {r for r in os.listdir(
      os.path.join(workdir, 'runs'))}
  rows = list(csv.DictReader(open(os.path.join(workdir, 'harness.csv'))))
  assert len(rows) == 3 and all(0 <= float(r['local_mc/acc']) <= 1 for r in rows)
  assert all(float(r['flops']) > 0 and float(r['eval_loss']) > 0 for r in rows)
  assert os.path.getsize(os.path.join(workdir, 'task_vs_compute.png')) > 10_000
  first = {r: os.path.getmtime(os.path.join(workdir, 'runs', r, 'harness.json'))
           for r in out['harness']}
  again = sweep_lib.run_sweep(cfg, workdir, fit=False)
  assert again['harness'] == out['harness']
  assert first == {r: os.path.getmtime(os.path.join(workdir, 'runs', r, 'harness.json'))
                   for r in out['harness']}   # not scored twice


def test_chat_template_gives_the_runs_own_chat_ids(imported_llama, tmp_path):
  """eval.harness_chat: lm-eval's rendered conversation tokenizes to exactly the ids the chat
  template (lm/data/sft.py) gives the same messages, chat tokens included."""
  from lm.data import sft
  src = imported_llama[0]
  run = str(tmp_path / 'chat_run')
  hf.import_model(src, run, overwrite=True, add_chat_tokens=True)
  mc, params, tokenizer, _ = runs.load_model(run)
  lm = harness.make_adapter(mc, params, tokenizer, chat=True)
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': '2+2?'}]
  text = lm.apply_chat_template(messages)
  want, _ = sft.encode_chat(tokenizer, messages, generation_prompt=True)
  assert lm.tok_encode(text) == [int(i) for i in want]
  plain = harness.make_adapter(*runs.load_model(imported_llama[1])[:3])
  from lm.errors import UserError
  with pytest.raises(UserError, match='no chat tokens'):
    harness.make_adapter(plain.mc, plain.params, plain.tok, chat=True)
