"""The language-model experiments at toy sizes: an RNN against attention, sampling temperature."""
import numpy as np
import pytest

from configs import base
from experiments import rnn_vs_attention
from experiments import temperature


@pytest.fixture(scope='module')
def rnn_result(cache_dir):
  # One layer and short windows keep compilation short; 200 steps of this size take about a
  # second and are enough for the transformer to start using context beyond the previous byte.
  return rnn_vs_attention.run(steps=200, batch_size=16, seq_len=32, d_model=32, n_layers=1,
                              lr_transformer=1e-2, lr_rnn=1e-2, eval_batches=16,
                              max_bytes=600_000, cache_dir=cache_dir)


def test_rnn_and_transformer_train(rnn_result):
  r = rnn_result
  tf, rnn = r['models']['transformer'], r['models']['GRU']
  assert abs(rnn['n_params'] / tf['n_params'] - 1) < 0.15
  for m in (tf, rnn):
    assert len(m['loss']) == r['steps']
    # Uniform over 259 bytes is 5.56 nats; the first and last 10 steps are far apart.
    assert m['loss'][-10:].mean() < m['loss'][:10].mean() - 1.0
    assert m['eval_loss'] < 3.5
    assert m['tokens_per_s'] > 0 and m['step_s'] > 0
    assert m['loss_by_position'].shape == (r['seq_len'],)
    assert m['eval_loss'] == pytest.approx(m['loss_by_position'].mean(), rel=1e-5)


def test_attention_uses_context(rnn_result):
  by_pos = rnn_result['models']['transformer']['loss_by_position']
  # Measured 2.66 at position 0 and 2.39 over the second half (600 KB of the stdlib, whose
  # validation split is 3 documents, 95 KB).
  assert by_pos[len(by_pos) // 2:].mean() < by_pos[0] - 0.1


def test_rnn_vs_attention_plot(rnn_result, tmp_path):
  for path in rnn_vs_attention.plot(rnn_result, str(tmp_path)):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def temp_result(cache_dir, tmp_path_factory):
  cfg = base.get_config()
  cfg.model.update(n_layers=1, d_model=32, n_heads=4, max_len=32)
  cfg.data.update(max_bytes=300_000, cache_dir=cache_dir)
  cfg.train.update(steps=20, batch_size=8, seq_len=32, warmup_steps=2, eval_every=20,
                   eval_batches=2, checkpoint_every=20, progress='none')
  return temperature.run(cfg=cfg, run_dir=str(tmp_path_factory.mktemp('run')), n_samples=0)


def test_temperature_zero_is_one_hot_at_argmax(temp_result):
  r = temp_result
  p0 = r['per_t'][0.0]['probs']
  assert p0[r['argmax']] == 1.0 and p0.sum() == 1.0
  assert r['argmax'] == int(np.argmax(r['logits']))
  assert r['per_t'][0.0]['entropy'] == 0.0


def test_entropy_rises_with_temperature(temp_result):
  h = {t: d['entropy'] for t, d in temp_result['per_t'].items()}
  assert 0 < h[0.7] < h[1.0] < h[1.5] <= temp_result['max_entropy']
  for d in temp_result['per_t'].values():
    assert d['probs'].sum() == pytest.approx(1.0, abs=1e-9)
    assert (d['probs'] >= 0).all()


def test_top_p_keeps_the_smallest_set_reaching_p(temp_result):
  r = temp_result
  p, kept = r['probs'], r['top_p_mask']
  n = int(kept.sum())
  desc = np.sort(p)[::-1]
  # lm.eval.sample sums in float32, so allow rounding at the boundary.
  assert desc[:n].sum() >= r['top_p'] - 1e-6
  assert desc[:n - 1].sum() < r['top_p'] + 1e-6
  # The kept tokens are the n most likely ones.
  assert p[kept].min() >= desc[n - 1]
  assert r['top_p_probs'].sum() == pytest.approx(1.0, abs=1e-9)
  assert (r['top_p_probs'][~kept] == 0).all()
  np.testing.assert_allclose(r['top_p_probs'][kept], p[kept] / p[kept].sum())
  assert r['per_t'][1.0]['top_p_kept'] == n


def test_temperature_plot(temp_result, tmp_path):
  for path in temperature.plot(temp_result, str(tmp_path)):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
