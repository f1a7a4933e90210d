"""Evaluation: task metrics, few-shot prompts, held-out arithmetic, bits per byte, `run.py eval`."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base as base_cfg
from configs import eval as eval_cfg
from lm.data import arith
from lm.data import tokens as data_lib
from lm.eval import evaluate as ev
from lm.model import transformer as model_lib
from lm.eval import tasks
from lm.data import tokenizer as tokenizer_lib
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig
from lm.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTES = tokenizer_lib.ByteTokenizer()


# ---------------------------------------------------------------------------------------------
# Metrics on hand-made predictions.

def test_exact_match_and_partial_credit_by_hand():
  assert tasks.exact_match(' 579 ', '579') and not tasks.exact_match('578', '579')
  # Numbers align from the right (place value): '578' vs '579' has 2 of 3 digits right.
  assert tasks.partial_credit('578', '579') == pytest.approx(2 / 3)
  # An extra leading digit: units, tens, hundreds right, but 4 positions to account for.
  assert tasks.partial_credit('1579', '579') == pytest.approx(3 / 4)
  assert tasks.partial_credit('79', '579') == pytest.approx(2 / 3)
  assert tasks.partial_credit('', '579') == 0.0
  # Text aligns from the left.
  assert tasks.partial_credit('abd', 'abc') == pytest.approx(2 / 3)
  assert tasks.partial_credit('xabc', 'abc') == 0.0
  assert tasks.partial_credit('579', '579') == 1.0 and tasks.partial_credit('', '') == 1.0
  assert tasks.position_hits('1579', '579') == [True, True, True]
  assert tasks.position_hits('98', '579') == [False, False, False]


def test_independent_exact_and_score_by_hand():
  golds = ['12', '34', '56', '78']
  # Units right in '12', '16' (2/4); tens right in '12', '35' (2/4; '7' has none); length 3/4.
  preds = ['12', '35', '16', '7']
  assert tasks.independent_exact(preds, golds) == pytest.approx((2 / 4) * (2 / 4) * (3 / 4))
  s = tasks.score(preds, golds, logprobs=[-1.0, -2.0, -3.0, -6.0])
  assert s['exact'] == 0.25 and s['logprob'] == -3.0 and s['n'] == 4
  assert s['partial'] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)
  # Answers of different lengths: position 2 only exists for the 3-digit answer.
  assert tasks.independent_exact(['100', '9'], ['100', '9']) == 1.0


# ---------------------------------------------------------------------------------------------
# Problems and prompts.

def test_heldout_arithmetic_never_appears_in_training_text_or_demonstrations():
  docs = arith.arith_documents(60_000, max_digits=4, seed=3)
  seen = set()
  for _, text in docs:
    for line in text.splitlines():
      q, c = line.split('=')
      a, b = map(int, q.split('+'))
      assert a + b == int(c)
      seen.add((a, b))
  assert sum(len(t) for _, t in docs) >= 60_000
  digits = {len(str(a)) for a, _ in seen}
  assert digits == {1, 2, 3, 4}
  for d in arith.ARITH_DIGITS:
    held = arith.arith_problems(d, 300, heldout=True)
    assert held and len(set(held)) == len(held)
    assert all(len(str(a)) == d and len(str(b)) == d for a, b in held if d > 1)
    assert not seen & set(held)
    task = tasks.build(f'arith{d}', 50)
    demo_q = {x.question for x in task.demos}
    assert not demo_q & {x.question for x in task.eval}
  # One-digit problems: the held-out side is about 20% of the 100.
  assert 10 <= len(arith.arith_problems(1, 1000, heldout=True)) <= 30


def test_fewshot_prompt_and_chat_messages():
  task = tasks.build('arith3', 20)
  p = tasks.fewshot_prompt(task, 4, k=3)
  lines = p.split('\n')
  assert len(lines) == 4 and lines[-1] == task.eval[4].question
  for line in lines[:3]:
    q, c = line.split('=')
    a, b = map(int, q.split('+'))
    assert a + b == int(c) and not arith.arith_is_heldout(a, b)
  assert tasks.fewshot_prompt(task, 4, k=0) == task.eval[4].question
  assert tasks.fewshot_prompt(task, 4, k=3) == p                         # seeded
  msgs = tasks.chat_messages(task, 4, k=2)
  assert [m['role'] for m in msgs] == ['user', 'assistant', 'user', 'assistant', 'user']
  assert msgs[-1]['content'] == task.eval[4].prompt
  with pytest.raises(UserError, match='lower the number of shots'):
    tasks.demonstrations(task, 0, k=10_000)
  with pytest.raises(UserError, match='is not a task; the tasks are arith1'):
    tasks.resolve('arith,multiply')
  assert tasks.resolve('arith2, arith') == ('arith2', 'arith1', 'arith3', 'arith4')


# ---------------------------------------------------------------------------------------------
# Text metrics against a hand computation.

def _model(vocab):
  mc = ModelConfig(vocab_size=vocab, n_layers=1, d_model=32, n_heads=2, n_kv_heads=2, max_len=256,
                   pos="rope")
  return mc, model_lib.init_params(mc, jax.random.PRNGKey(1))


@pytest.mark.parametrize('which', ['bytes', 'sentencepiece'])
def test_bits_per_byte_by_hand(which, sp_tokenizer):
  tok = BYTES if which == 'bytes' else sp_tokenizer
  mc, params = _model(tok.vocab_size)
  docs = ['def café(x):\n    return x * 2\n', 'naïve = "déjà vu"\n', 'import os\n']
  got = ev.text_metrics(mc, params, tok, docs, seq_len=200, batch_size=2, max_tokens=0)
  ids = [tok.eos_id]
  for d in docs:
    ids += list(tok.encode(d)) + [tok.eos_id]
  ids = np.asarray(ids, np.int32)[None]
  logits = model_lib.apply(mc, params, ids[:, :-1])
  logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
  nats = -float(np.take_along_axis(logp, ids[:, 1:, None], axis=-1).sum())
  n_bytes = sum(len(d.encode('utf-8')) for d in docs)
  assert n_bytes > sum(len(d) for d in docs)                  # non-ASCII: bytes are not chars
  assert got['tokens'] == ids.shape[1] - 1 and got['bytes'] == n_bytes
  assert got['loss'] == pytest.approx(nats / got['tokens'], rel=1e-4)
  assert got['bpb'] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
  assert got['ppl'] == pytest.approx(math.exp(got['loss']), rel=1e-6)
  if which == 'sentencepiece':
    assert got['tokens'] < n_bytes                                  # several bytes per token
  # Short windows: the same tokens are predicted, each with less context.
  short = ev.text_metrics(mc, params, tok, docs, seq_len=8, batch_size=3, max_tokens=0)
  assert short['tokens'] == got['tokens'] and short['bytes'] == n_bytes
  # A cap keeps whole documents in order, the last one cut.
  capped = ev.text_metrics(mc, params, tok, docs, seq_len=16, batch_size=2, max_tokens=10)
  assert capped['tokens'] == 10 and capped['documents'] == 1 and capped['bytes'] <= 10 * 4


# ---------------------------------------------------------------------------------------------
# A tiny run trained with arithmetic mixed in and tasks scored in the loop, then `run.py eval`.

@pytest.fixture(scope='module')
def tiny_run(cache_dir, tmp_path_factory):
  c = base_cfg.get_config()
  c.model.n_layers, c.model.d_model, c.model.n_heads, c.model.max_len = 1, 32, 2, 128
  c.data.max_bytes, c.data.cache_dir, c.data.arith_fraction = 200_000, cache_dir, 0.2
  for k, v in dict(steps=40, batch_size=8, seq_len=64, warmup_steps=2, eval_every=20,
                   eval_batches=1, log_every=10, checkpoint_every=40, progress='none',
                   eval_tasks='arith1,arith2', eval_task_examples=8, eval_shots=2).items():
    c.train[k] = v
  workdir = str(tmp_path_factory.mktemp('tiny'))
  train_lib.train(c, workdir)
  return workdir, c


def test_arithmetic_is_mixed_into_the_corpus(tiny_run):
  _, c = tiny_run
  ds = data_lib.prepare(c.data)
  stats = ds.info['corpus_stats']
  assert stats['arith_bytes'] / stats['bytes'] == pytest.approx(0.2, abs=0.01)
  text = bytes(np.asarray(ds.train[-4000:], np.uint8)).decode('latin-1')
  assert '+' in text and '=' in text


def test_training_loop_scores_tasks_at_evaluations(tiny_run):
  workdir, _ = tiny_run
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  evals = [r for r in rows if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [20, 40]
  for r in evals:
    for d in (1, 2):
      for m in ('exact', 'partial', 'exact_indep'):
        assert 0.0 <= r[f'task/arith{d}/{m}'] <= 1.0
      assert r[f'task/arith{d}/logprob'] < 0
    assert r['tokens'] > 0 and r['flops'] > 0


def _eval_cfg(**kw):
  e = eval_cfg.get_config().eval
  for k, v in dict(max_tokens=3000, examples=8, batch_size=8).items():
    e[k] = v
  for k, v in kw.items():
    e[k] = v
  return e


def test_eval_of_a_run_with_two_extra_corpora(tiny_run, tmp_path):
  workdir, _ = tiny_run
  (tmp_path / 'notes.txt').write_text('Bonjour à tous.\n' * 40)
  with open(tmp_path / 'docs.jsonl', 'w') as f:
    for i in range(5):
      f.write(json.dumps({'body': f'def f{i}(x):\n    return x + {i}\n'}) + '\n')
  res = ev.evaluate_run(workdir, _eval_cfg(
      corpora=f"{tmp_path / 'notes.txt'},{tmp_path / 'docs.jsonl'}", text_field='body',
      tasks='arith1,arith2'))
  saved = json.load(open(os.path.join(workdir, 'eval.json')))
  assert set(saved['text']) == {'val', str(tmp_path / 'notes.txt'), str(tmp_path / 'docs.jsonl')}
  assert saved['text']['val']['tokens'] == 3000 and 'pystdlib' in saved['text']['val']['source']
  notes = saved['text'][str(tmp_path / 'notes.txt')]
  assert notes['bytes'] == len('Bonjour à tous.\n'.encode('utf-8') * 40)
  assert notes['documents'] == 1 and saved['text'][str(tmp_path / 'docs.jsonl')]['documents'] == 5
  for m in saved['text'].values():
    assert m['loss'] > 0 and m['bpb'] > 0
  assert saved['format'] == 'fewshot' and saved['shots'] == 3
  assert set(saved['tasks']) == {'arith1', 'arith2'}
  assert len(saved['tasks']['arith2']['answers']) == 8
  assert saved['run']['step'] == 40
  assert 'arith2' in ev.table(res) and 'bpb' in ev.table(res)


def test_eval_refuses_bad_input_in_one_sentence(tiny_run, tmp_path):
  workdir, _ = tiny_run
  with pytest.raises(UserError, match="'subtract' is not a task; the tasks are"):
    ev.evaluate_run(workdir, _eval_cfg(tasks='subtract'))
  with pytest.raises(UserError, match='does not exist; fix --config.eval.corpora'):
    ev.evaluate_run(workdir, _eval_cfg(corpora=str(tmp_path / 'missing.txt')))
  with pytest.raises(UserError, match='matches no files'):
    ev.evaluate_run(workdir, _eval_cfg(corpora=str(tmp_path / '*.nothing')))
  with pytest.raises(UserError, match='do not fit model.max_len=128; lower the number of shots'):
    ev.evaluate_run(workdir, _eval_cfg(tasks='arith4', shots=12))
  with pytest.raises(UserError, match='is not a run folder'):
    ev.evaluate_run(str(tmp_path), _eval_cfg())
  assert not os.path.exists(os.path.join(str(tmp_path), 'eval.json'))


def test_run_py_eval_exits_nonzero_on_a_folder_that_is_not_a_run(tmp_path):
  out = subprocess.run([sys.executable, 'run.py', 'eval', f'--workdir={tmp_path}'], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith('error: ') and 'not a run folder' in \
      out.stderr


@pytest.mark.slow   # 55 s: a sweep of its own; the task evaluations it uses stay in the default suite
def test_emergence_lesson_on_a_tiny_ladder(cache_dir, tmp_path):
  """experiments/emergence.py end to end on two tiny sizes: the sweep trains them with task
  evaluations, the lesson tabulates and plots every metric."""
  from configs import emergence as emergence_cfg
  from experiments import emergence
  cfg = emergence_cfg.get_config()
  b, s = cfg.base, cfg.sweep
  b.data.max_bytes, b.data.cache_dir = 200_000, cache_dir
  b.train.eval_task_examples, b.train.eval_batches, b.train.progress = 4, 1, 'none'
  b.train.batch_size, b.train.seq_len = 8, 64
  s.grid_params, s.grid_tokens = (9_000.0, 20_000.0), (6_000.0,)
  s.evals_per_run, s.parallel = 2, 1
  result = emergence.run(str(tmp_path / 'runs'), cfg)
  runs = result['runs']
  assert len(runs) == 2 and runs[0]['params'] < runs[1]['params']
  for r in runs:
    assert len(r['evals']) >= 2 and r['evals'][-1]['step'] == 12
    assert all(f'task/arith{d}/exact_indep' in r['evals'][-1] for d in emergence.DIGITS)
  rows = emergence.table_rows(runs)
  assert rows[0]['4/partial'] >= 0 and rows[1]['1/logprob'] < 0
  out = str(tmp_path / 'out')
  os.makedirs(out)
  paths = emergence.plot(result, out)
  assert [os.path.basename(p) for p in paths] == ['emergence.png', 'subskills.png',
                                                  'results.json']
  assert json.load(open(paths[-1]))['table'][1]['params'] == runs[1]['params']
