"""Malformed input and damaged state end in one sentence or a correct answer, class by class:
bytes that are not UTF-8 in every text reader, damaged JSON state files, --overwrite aimed at its
own input, a results table that cannot support a fit (or is not the one fitted), an eval with
nothing to do, preference tuning from a run that was never fine-tuned, and max_new_tokens beyond
what the model allows. Run folders here are written directly (random weights, no training), so
the whole file stays fast."""
import csv
import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from lm import chat as chat_lib
from lm import cli
from lm import runs
from lm.align import dpo as dpo_lib
from lm.align import pairs as pairs_lib
from lm.config import ModelConfig
from lm.data import corpus
from lm.data import sft
from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError
from lm.eval import evaluate as evaluate_lib
from lm.interop import hf
from lm.model import transformer as model_lib
from lm.scaling import fit as fit_lib
from lm.scaling import report as report_lib
from lm.training import checkpoint as ckpt_lib
from lm.training.optim import TrainConfig, make_optimizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2 = dict(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32, pos='learned',
            norm='layernorm', mlp='gelu', block='prenorm', use_bias=True, tie_embeddings=True)


def write_run(folder, sections=None, **model) -> str:
  """A run folder as training leaves it (config.json, tokenizer/, one checkpoint at step 3) with
  random weights: model options `model` (GPT-2 family by default), extra config `sections`."""
  os.makedirs(folder, exist_ok=True)
  cfg = get_config()
  cfg.model.update(**{**GPT2, **model})
  cfg_json = json.loads(cfg.to_json())
  cfg_json.update(sections or {})
  tok = tokenizer_lib.ByteTokenizer()
  tok.save(os.path.join(folder, 'tokenizer'))
  mc = ModelConfig.from_config(cfg_json['model'], tok.vocab_size)
  if 'base' in cfg_json:            # a fine-tuned run keeps its model beside its base's name
    cfg_json['base'] = dict(cfg_json['base'], model=dataclasses.asdict(mc))
  shapes = jax.eval_shape(lambda: model_lib.init_params(mc, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.05, s.shape), jnp.float32), shapes)
  opt = make_optimizer(TrainConfig.from_config(cfg_json['train']), params)
  ckpts = ckpt_lib.Checkpoints(os.path.join(folder, 'checkpoints'), 1)
  ckpts.save(3, {'params': params, 'opt_state': opt.init(params), 'step': jnp.array(3)})
  ckpts.close()
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(cfg_json, f)
  return str(folder)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """A pretraining run (GPT-2 family, learned positions, max_len 32), a RoPE run, a fine-tuned
  run on the first, and a Hugging Face folder exported from the first."""
  root = tmp_path_factory.mktemp('runs')
  pre = write_run(root / 'pre')
  rope = write_run(root / 'rope', pos='rope', norm='rmsnorm', use_bias=False)
  sft_run = write_run(root / 'sft', sections={'finetune': {'data': 'code'},
                                              'base': {'workdir': pre}})
  hf_dir = str(root / 'hf')
  hf.export_run(pre, hf_dir)
  return {'pre': pre, 'rope': rope, 'sft': sft_run, 'hf': hf_dir, 'root': root}


def flags(**kw):
  """The absl FLAGS the cli functions read, with run.py's defaults."""
  base = dict(config=None, workdir=None, out=None, hf=None, results=None, overwrite=False,
              max_shard_mb=2048, add_chat_tokens=False, loss_key=None, params_key='params',
              flops_key=None, bootstrap=0)
  return type('Flags', (), {**base, **kw})


def tree(folder) -> dict:
  """{relative path: bytes} of every file under folder: what must survive a refusal."""
  out = {}
  for d, _, files in os.walk(folder):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, folder)] = fh.read()
  return out


def eval_section(**kw):
  """configs/eval.py's section with no validation split and no tasks, then `kw`."""
  from configs import eval as eval_cfg
  e = eval_cfg.get_config().eval
  e.update({**dict(val=False, tasks='', max_tokens=2000, batch_size=4, examples=4), **kw})
  return e


# ---- bytes that are not UTF-8, in every reader ----------------------------------------------

GOOD_SFT = b'{"prompt": "a", "response": "b"}\n'
GOOD_PAIR = b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
GOOD_CSV = b'params,tokens,loss\n1e6,1e8,3.0\n2e6,1e8,2.9\n4e6,1e8,2.8\n'


@pytest.mark.parametrize('read,good', [
    (sft.load_jsonl, GOOD_SFT), (pairs_lib.read_pairs, GOOD_PAIR), (fit_lib.read_results, GOOD_CSV)],
    ids=['sft_jsonl', 'pairs_jsonl', 'results_csv'])
def test_data_files_refuse_bad_bytes_with_line_and_offset(tmp_path, read, good):
  path = tmp_path / 'data'
  lines = good.count(b'\n')
  path.write_bytes(good + b'\xff' + good.splitlines(keepends=True)[-1])
  with pytest.raises(UserError, match=rf'{path} is not UTF-8 text: byte 0xff at line '
                     rf'{lines + 1}, byte offset {len(good)} '):
    read(str(path))
  path.write_bytes(good.replace(b'\n', b'\x00\n', 1))                # NUL: a binary file
  with pytest.raises(UserError, match=r'holds a NUL byte at line 1, .*binary'):
    read(str(path))
  with pytest.raises(UserError, match='is a folder; name a file'):
    read(str(tmp_path))
  # A byte-order mark and Windows line ends are text all the same.
  path.write_bytes(b'\xef\xbb\xbf' + good.replace(b'\n', b'\r\n'))
  assert len(read(str(path))) == max(1, lines - 1)


def test_typed_text_and_eval_corpora_replace_and_count(folders, tmp_path, monkeypatch):
  assert corpus.clean_text('caf\udce9 ok') == ('caf\ufffd ok', 1)      # argv's escaped bytes
  assert corpus.clean_text('fine \ufffd') == ('fine \ufffd', 0)        # U+FFFD typed is kept
  # The chat's stdin: input() from a stream that would raise on the byte, then the note.
  monkeypatch.setattr(sys, 'stdin', io.TextIOWrapper(io.BytesIO(b'hi \xff\xfe there\n/quit\n'),
                                                     encoding='utf-8'))
  written = []
  replies = chat_lib.chat_cli(folders['sft'], max_new_tokens=2, temperature=0.0,
                              write=written.append)
  assert len(replies) == 1
  assert '(note: 2 invalid UTF-8 byte sequences in your message replaced with U+FFFD)\n' in written
  # An eval corpus is read with replacement, and eval.json and the table say how many.
  blob = tmp_path / 'blob.txt'
  blob.write_bytes(b'text \xff\xfe and \xc3 more text\n' * 4)
  res = evaluate_lib.evaluate_run(folders['pre'], eval_section(corpora=str(blob)))
  assert res['text'][str(blob)]['replaced_chars'] == 12
  assert 'note: ' + str(blob) + ' is not all UTF-8 text: 12 invalid' in evaluate_lib.table(res)


# ---- damaged JSON state ---------------------------------------------------------------------

DAMAGE = {'truncated': b'{"model": {"n_layers": 2', 'binary': b'\xff\xfe\x00\x01garbage',
          'not_an_object': b'[1, 2, 3]'}


def copy_tree(src, dst):
  for rel, data in tree(src).items():
    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
    with open(os.path.join(dst, rel), 'wb') as f:
      f.write(data)
  return str(dst)


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_state_files_are_named_with_what_to_do(folders, tmp_path, damage):
  """Each JSON state file a command reads, damaged three ways: one sentence naming the file and
  what the user can do (restore it, delete it to rebuild, fetch the model again)."""
  run = copy_tree(folders['pre'], tmp_path / 'run')
  imported = copy_tree(folders['hf'], tmp_path / 'hf')
  fit_dir = tmp_path / 'fit'
  fit_dir.mkdir()
  (fit_dir / 'results.csv').write_bytes(GOOD_CSV)
  cases = [  # (file, reader, words of the advice)
      ('run/config.json', lambda: runs.read_config(run), 'restore it'),
      ('run/summary.json', lambda: runs.finished_summary(run, 'pretraining', 'train'),
       'restore it, or rerun `python run.py train`'),
      ('run/manifest.json', lambda: runs.check_finetuned(run, 'DPO'), 'restore it'),
      ('run/tokenizer/tokenizer.json', lambda: runs.load_tokenizer(run), 'prepare the data'),
      ('fit/fit.json', lambda: cli.plot(flags(workdir=str(fit_dir))), 'delete it and run'),
      ('fit/curves.json', lambda: fit_lib.read_curves(str(fit_dir / 'curves.json')),
       'delete it to go on without'),
      ('hf/config.json', lambda: hf.import_model(imported, str(tmp_path / 'out')),
       'fetch or copy the model again'),
      ('hf/tokenizer_config.json', lambda: hf.import_model(imported, str(tmp_path / 'out')),
       'fetch or copy the model again'),
  ]
  for rel, read, advice in cases:
    path = tmp_path / rel
    keep = path.read_bytes() if path.exists() else None
    path.write_bytes(DAMAGE[damage])
    with pytest.raises(UserError) as e:
      read()
    msg = str(e.value)
    assert str(path) in msg and advice in msg and msg.count('. ') == 0, (rel, msg)
    if keep is None:
      path.unlink()
    else:
      path.write_bytes(keep)
  assert not (tmp_path / 'out').exists()


# ---- --overwrite and its own input; folders that are files; damaged weights -----------------

def test_an_output_never_replaces_its_own_input(folders, tmp_path):
  run = copy_tree(folders['pre'], tmp_path / 'run')
  src = copy_tree(folders['hf'], tmp_path / 'hf')
  before = tree(tmp_path)
  refusals = [  # (call, words): the output is the source, lies inside it, or holds it
      (lambda: hf.export_run(run, run, overwrite=True), 'is --workdir='),
      (lambda: hf.export_run(run, os.path.join(run, 'checkpoints'), overwrite=True), 'lies inside'),
      (lambda: hf.export_run(run + '/./', str(tmp_path), overwrite=True), 'holds --workdir='),
      (lambda: hf.import_model(src, src, overwrite=True), 'is --hf='),
      (lambda: hf.import_model(src, os.path.join(src, 'run'), overwrite=True), 'lies inside'),
      (lambda: cli.merge(flags(workdir=run, out=run)), 'is --workdir='),
      (lambda: cli.export(flags(workdir=run, out=str(tmp_path / 'hf' / 'config.json'))),
       'is a file, not a folder'),
      (lambda: cli.import_(flags(hf=src, workdir=str(tmp_path / 'hf' / 'tokenizer.json'))),
       'is a file, not a folder'),
      (lambda: cli.fit(flags(results=str(tmp_path / 'r.csv'), workdir=os.path.join(run, 'config.json'))),
       'is a file, not a folder'),
  ]
  for call, words in refusals:
    with pytest.raises(UserError, match='could delete the source|is a file') as e:
      call()
    assert words in str(e.value), str(e.value)
  assert tree(tmp_path) == before          # nothing written, nothing deleted


def test_damaged_or_unaccounted_weights_are_refused_by_name(folders, tmp_path):
  from safetensors.numpy import load_file, save_file
  weights = os.path.join(folders['hf'], 'model.safetensors')
  raw = open(weights, 'rb').read()
  for name, data in [('truncated', raw[:len(raw) // 2]), ('random', os.urandom(4096)),
                     ('empty', b'')]:
    src = copy_tree(folders['hf'], tmp_path / name)
    with open(os.path.join(src, 'model.safetensors'), 'wb') as f:
      f.write(data)
    with pytest.raises(UserError, match=rf'{src}/model.safetensors is not a readable safetensors '
                       'file .*fetch it again'):
      hf.import_model(src, str(tmp_path / 'out'))
  # config.json says one layer, the weights hold two: the second layer's tensors are named.
  src = copy_tree(folders['hf'], tmp_path / 'layers')
  cfg = json.load(open(os.path.join(src, 'config.json')))
  json.dump(dict(cfg, n_layer=1), open(os.path.join(src, 'config.json'), 'w'))
  with pytest.raises(UserError, match=r'holds 12 tensors that its config.json does not account '
                     r'for \(transformer\.h\.1\.attn\.c_attn\.bias, .* and 8 more\); config.json '
                     'describes 1 layer but the weights hold 2'):
    hf.import_model(src, str(tmp_path / 'out'))
  # Buffers some checkpoints carry (GPT-2's causal mask) are not weights and pass.
  tensors = load_file(os.path.join(src, 'model.safetensors'))
  tensors['transformer.h.0.attn.bias'] = np.ones((1, 1, 32, 32), np.float32)
  save_file(tensors, os.path.join(src, 'model.safetensors'))
  json.dump(cfg, open(os.path.join(src, 'config.json'), 'w'))
  assert hf.import_model(src, str(tmp_path / 'out'))['model']['n_layers'] == 2


# ---- a table that cannot support a fit, or is not the one fitted -----------------------------

def write_table(path, rows):
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  return str(path)


def law_rows():
  """Fifteen runs on three IsoFLOP budgets of a known law."""
  rows = []
  for C in (1e15, 1e16, 1e17):
    for N in np.geomspace(1e6, 1e8, 5):
      D = C / (6 * N)
      rows.append({'params': N, 'tokens': D, 'flops': 6 * N * D,
                   'loss': 1.7 + 400 / N**0.34 + 410 / D**0.28})
  return rows


def test_fit_refuses_what_it_used_to_fill_in(tmp_path):
  rows = law_rows()
  with pytest.raises(UserError, match=r'20 runs but only 1 distinct \(params, tokens\) point; a '
                     'scaling law needs at least 3'):
    fit_lib.fit_results(fit_lib.read_results(write_table(tmp_path / 'same.csv', [rows[3]] * 20)))
  table = write_table(tmp_path / 'results.csv', rows)
  for key in ('flops_key', 'loss_key'):      # no fallback (6ND, another loss column)
    with pytest.raises(UserError, match=r"has no 'nope' column \(its columns: 'params', 'tokens', "
                       r"'flops', 'loss'\)"):
      report_lib.run_fit(table, tmp_path / 'x', bootstrap=0, **{key: 'nope'})
  with pytest.raises(UserError, match="no 'params_nonembed' column"):
    report_lib.run_fit(table, tmp_path / 'x', params_key='params_nonembed', bootstrap=0)
  with pytest.raises(UserError, match="'loss' of .* line 3 is 'nan'; it must be a positive finite"):
    fit_lib.read_results(write_table(tmp_path / 'nan.csv', rows[:1] + [dict(rows[1], loss='nan')]))
  assert not (tmp_path / 'x').exists()


def test_plot_checks_the_table_it_is_given(tmp_path):
  rows = law_rows()
  table = write_table(tmp_path / 'results.csv', rows)
  out = tmp_path / 'fit'
  fitted = report_lib.run_fit(table, out, bootstrap=0, top_k=1)   # top_k=1: one L-BFGS start
  assert fitted['results']['rows'] == 15
  assert json.load(open(out / 'fit.json'))['results'] == fitted['results']
  other = write_table(tmp_path / 'other.csv', rows[:-1])
  with pytest.raises(UserError, match=rf'{other} \(14 runs\) is not the results table this folder '
                     rf'was fitted from \({table}, 15 runs'):
    cli.plot(flags(workdir=str(out), results=other))
  # The same runs written another way (a byte-order mark, CRLF) are the same table.
  same = tmp_path / 'same.csv'
  same.write_bytes(b'\xef\xbb\xbf' + open(table, 'rb').read().replace(b'\r\n', b'\n')
                   .replace(b'\n', b'\r\n'))
  assert fit_lib.check_same_table(fitted, str(same), fit_lib.read_results(str(same))) is None
  # A fit.json from before tables were recorded: a note, not a refusal.
  old = {k: v for k, v in fitted.items() if k != 'results'}
  note = fit_lib.check_same_table(old, other, fit_lib.read_results(other))
  assert note.startswith('note: this fit.json does not record which results table')


# ---- an eval with nothing to do ----------------------------------------------------------------

def test_an_eval_with_nothing_to_do_keeps_the_old_result(folders):
  run = folders['pre']
  saved = os.path.join(run, 'eval.json')
  with open(saved, 'w') as f:
    f.write('{"text": {"val": {"loss": 2.5}}}\n')
  with pytest.raises(UserError, match=r'eval.val is False, eval.corpora and eval.tasks are empty, '
                     rf'so there is nothing to evaluate and {saved} is left as it was'):
    evaluate_lib.evaluate_run(run, eval_section())
  # Every task left out (auto: none fits max_len 32 with 30 shots): refused, not `{}` written.
  with pytest.raises(UserError, match=r'no task fits this model \(arith1: 30 shots make .* left '
                     'as it was'):
    evaluate_lib.evaluate_run(run, eval_section(tasks='auto', shots=30, format='fewshot'))
  assert json.load(open(saved)) == {'text': {'val': {'loss': 2.5}}}


# ---- preference tuning from a run that was never fine-tuned ---------------------------------

def test_preference_stages_refuse_a_pretraining_run(folders, tmp_path):
  from configs import dpo as dpo_cfg, ppo as ppo_cfg, reward as reward_cfg
  from lm.align import ppo as ppo_lib
  from lm.align import reward as reward_lib
  r = reward_cfg.get_config()
  r.reward.init_from = folders['pre']
  with pytest.raises(UserError, match='never fine-tuned, so it does not know the chat template the '
                     r'reward model prompts in; fine-tune it first'):
    reward_lib.build(r, str(tmp_path / 'rm'))
  d = dpo_cfg.get_config()
  d.dpo.init_from, d.dpo.pairs = folders['pre'], 'pairs.jsonl'
  with pytest.raises(UserError, match=rf'{folders["pre"]} is a pretraining run that was never '
                     r'fine-tuned.*fine-tune it first \(python run.py finetune --config=configs/'
                     r'sft.py --config.finetune.init_from=.*start DPO from that run'):
    dpo_lib.build(d, str(tmp_path / 'dpo'))
  p = ppo_cfg.get_config()
  p.ppo.init_from, p.ppo.reward_from = folders['pre'], folders['pre']
  with pytest.raises(UserError, match='never fine-tuned.*start PPO from that run'):
    ppo_lib.build(p, str(tmp_path / 'ppo'))
  assert not os.listdir(tmp_path)
  # A fine-tuned run, a merged one and an imported model are accepted.
  runs.check_finetuned(folders['sft'], 'DPO')
  merged = copy_tree(folders['pre'], tmp_path / 'merged')
  json.dump({'merged_from': folders['sft']}, open(os.path.join(merged, 'manifest.json'), 'w'))
  runs.check_finetuned(merged, 'DPO')
  imported = str(tmp_path / 'imported')
  hf.import_model(folders['hf'], imported)
  runs.check_finetuned(imported, 'DPO')


# ---- max_new_tokens beyond what the model allows ------------------------------------------------

def test_sample_caps_max_new_tokens_with_a_note(folders, monkeypatch, capsys):
  from lm.eval import sample as sample_lib
  kw = dict(temperature=0.0, top_k=0, top_p=1.0, seed=0)
  # Learned positions end at max_len 32: EOS + 5 prompt bytes leave 27 new tokens.
  chat_lib.sample_cli(folders['pre'], 'hello', max_new_tokens=100_000_000, **kw)
  out = capsys.readouterr().out
  assert ('note: max_new_tokens=100000000 is more than this model allows after a 6-token prompt '
          '(learned positions end at model.max_len=32); generating at most 27.') in out
  # RoPE runs past max_len, to 4 x max_len positions; the KV cache within the device's memory.
  mc = runs.load_model(folders['rope'])[0]
  n, note = sample_lib.cap_new_tokens(mc, 6, 10**8)
  assert n == 4 * 32 - 6 + 1 and 'at most 4 x model.max_len=32 positions' in note
  assert sample_lib.cap_new_tokens(mc, 6, 50) == (50, None)
  per_slot = 2 * mc.n_layers * 2 * mc.n_kv_heads * mc.head_dim * 4
  monkeypatch.setattr(sample_lib, 'device_memory_bytes', lambda: 2 * 60 * per_slot)
  n, note = sample_lib.cap_new_tokens(mc, 6, 10**8, rows=2)
  assert n == 60 - 16 + 1 and 'KV cache of 2 row(s) must fit in 50% of device memory' in note


# ---- run.py: the refusal is one sentence and exit status 2 ------------------------------------

def test_run_py_refuses_an_export_over_its_own_run(folders, tmp_path):
  run = copy_tree(folders['pre'], tmp_path / 'run')
  before = tree(run)
  out = subprocess.run([sys.executable, 'run.py', 'export', f'--workdir={run}', f'--out={run}',
                        '--overwrite'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and out.stderr.count('\n') == 1
  assert out.stderr.startswith(f'error: --out={run} is --workdir={run}, the folder it is made from')
  assert tree(run) == before
