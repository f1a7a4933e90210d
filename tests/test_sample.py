"""Tests of cached generation, logits filtering, scoring and the sample command (lm/eval/sample.py)."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.base import get_config
from lm import chat as chat_lib
from lm.training import checkpoint as ckpt_lib
from lm.model import transformer as model_lib
from lm import runs
from lm.eval import sample
from lm.data import tokenizer as tokenizer_lib
from lm.stages import pretrain as train_lib
from lm.config import ModelConfig
from lm.errors import UserError

# Cached and uncached float32 forwards differ only in reduction order (masked cache slots vs a
# plain causal window), so logits of order 1 must agree to this absolute tolerance.
ATOL = 1e-5


def tiny(**kw) -> ModelConfig:
  """2 layers, d_model 32, 4 heads; init_std 0.2 keeps logits and attention far from uniform."""
  args = dict(vocab_size=50, n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64,
              max_len=32, init_std=0.2)
  args.update(kw)
  return ModelConfig(**args)


def params_for(mc, seed=0, std=0.2):
  """Random params from numpy: jitting the model's own init compiles for seconds on a slow CPU."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    noise = rng.normal(0.0, std, s.shape)
    return jnp.asarray(1.0 + noise / 2 if path[-1].key == 'scale' else noise, jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, model_lib.param_shapes(mc))


full_forward = jax.jit(lambda mc, p, t: model_lib.apply(mc, p, t), static_argnums=0)

# One model shared by the generation tests, so they share compilations.
MODEL = tiny(pos='rope', n_kv_heads=2)
PROMPTS = [[1, 2, 3], [7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13], [20, 21]]
N_NEW = 8


# ---------------------------------------------------------------------------------------------
# The cache gives the same logits as a full forward pass.

# Every positional variant; grouped-query (2 kv heads) and multi-query (1) attention ride along,
# and one runs its layers under nn.scan (a stacked cache).
CACHE_CONFIGS = {
    'learned': dict(pos='learned'),
    'sinusoidal_gqa2': dict(pos='sinusoidal', n_kv_heads=2),
    'rope_mqa1': dict(pos='rope', n_kv_heads=1),
    'alibi_gqa2_scan': dict(pos='alibi', n_kv_heads=2, scan_layers=True),
    'none_mqa1': dict(pos='none', n_kv_heads=1),
}
LENGTHS = (3, 9, 6)   # prompts of a right-padded batch
STEPS = 4             # teacher-forced decode steps after the prefill
P = 10                # padded prompt length


@functools.partial(jax.jit, static_argnums=0)
def cached_and_full(mc, params, tokens_BP, feeds_SB, seqs):
  """(prefill logits [B, P, V], decode logits [STEPS, B, V], each sequence's own full forward)."""
  lengths_B = jnp.array(LENGTHS)
  logits_BPV, cache = sample.prefill(mc, params, tokens_BP, lengths_B, slots=P + STEPS,
                                     all_logits=True)

  def step(cache, xs):
    feed_B, t = xs
    logits_BV, cache = sample.decode_step(mc, params, cache, feed_B, lengths_B + t)
    return cache, logits_BV
  _, steps = jax.lax.scan(step, cache, (feeds_SB, jnp.arange(STEPS)))
  full = [model_lib.apply(mc, params, s[None])[0] for s in seqs]   # unpadded, one per shape
  return logits_BPV, steps, full


@pytest.mark.parametrize('name', list(CACHE_CONFIGS))
def test_cached_decoding_matches_full_forward(name):
  mc = tiny(**CACHE_CONFIGS[name])
  params = params_for(mc)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, mc.vocab_size, n + STEPS).astype(np.int32) for n in LENGTHS]
  tokens = np.zeros((len(seqs), P), np.int32)
  for i, n in enumerate(LENGTHS):
    tokens[i, :n] = seqs[i][:n]
  feeds = np.array([[s[n + t] for s, n in zip(seqs, LENGTHS)] for t in range(STEPS)], np.int32)
  prefill, steps, full = jax.device_get(cached_and_full(mc, params, tokens, feeds, tuple(seqs)))
  for i, n in enumerate(LENGTHS):
    np.testing.assert_allclose(prefill[i, :n], full[i][:n], atol=ATOL, rtol=0)
    for t in range(STEPS):
      np.testing.assert_allclose(steps[t, i], full[i][n + t], atol=ATOL, rtol=0)


def test_generate_tokens_equals_uncached_greedy():
  params = params_for(MODEL)
  out = sample.generate_tokens(MODEL, params, PROMPTS, N_NEW, temperature=0.0)
  for prompt, row in zip(PROMPTS, out):
    buf = np.zeros((1, 24), np.int32)   # right-padded: causality hides the tail
    buf[0, :len(prompt)] = prompt
    for t in range(N_NEW):
      n = len(prompt) + t
      buf[0, n] = int(np.argmax(full_forward(MODEL, params, buf)[0, n - 1]))
    assert list(row) == list(buf[0, len(prompt):len(prompt) + N_NEW])


# ---------------------------------------------------------------------------------------------
# Logits filtering and sampling.

def test_top_p_keeps_smallest_set_reaching_p():
  rng = np.random.default_rng(0)
  V, rows = 40, 200
  edge_cases = 0
  for p in [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.99, 1.0]:
    scale = rng.uniform(0.1, 5.0, (rows, 1))     # from nearly flat to very peaked
    logits = (rng.normal(size=(rows, V)) * scale).astype(np.float32)
    kept = np.isfinite(np.asarray(sample.apply_top_p(jnp.asarray(logits), p)))
    probs = np.exp(logits.astype(np.float64) - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for r in range(rows):
      order = np.argsort(-probs[r])
      cum = np.cumsum(probs[r][order])
      n_ref = int(np.searchsorted(cum, p) + 1) if p < 1 else V   # smallest n with cum >= p
      n_ref = min(n_ref, V)
      if kept[r].sum() != n_ref:
        # Only float32 rounding right at the boundary may move it, by one token.
        assert abs(cum[n_ref - 1] - p) < 1e-5 or abs(cum[n_ref - 2] - p) < 1e-5
        edge_cases += 1
        continue
      assert kept[r][order[:n_ref]].all()                       # the most likely ones
  assert edge_cases <= 2


def test_top_k_keeps_exactly_k():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(16, 30)).astype(np.float32))
  for k in [1, 2, 7, 29]:
    out = np.asarray(sample.apply_top_k(logits, k))
    kept = np.isfinite(out)
    assert (kept.sum(-1) == k).all()
    top = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    assert np.take_along_axis(kept, top, -1).all()
    np.testing.assert_array_equal(out[kept], np.asarray(logits)[kept])
  for k in [0, 30, 100]:
    np.testing.assert_array_equal(np.asarray(sample.apply_top_k(logits, k)), logits)


def test_top_k_and_top_p_combine():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(1, 30)).astype(np.float32))
  allowed = np.isfinite(np.asarray(sample.apply_top_p(sample.apply_top_k(logits, 6), 0.6)))[0]
  assert 1 <= allowed.sum() <= 6
  draws = sample.sample_logits(jax.random.PRNGKey(0), jnp.tile(logits, (2000, 1)), 1.0, 6, 0.6)
  assert allowed[np.asarray(draws)].all()
  assert len(np.unique(np.asarray(draws))) == allowed.sum()


def test_low_temperature_is_greedy():
  rng = np.random.default_rng(3)
  logits = jnp.asarray(rng.normal(size=(256, 50)).astype(np.float32) * 3)
  greedy = np.argmax(np.asarray(logits), -1)
  np.testing.assert_array_equal(sample.sample_logits(None, logits, 0.0), greedy)
  np.testing.assert_array_equal(sample.sample_logits(None, logits, 0, 5, 0.5), greedy)
  cold = sample.sample_logits(jax.random.PRNGKey(0), logits, 1e-4)
  np.testing.assert_array_equal(cold, greedy)


def test_seed_determinism():
  logits = jnp.zeros((64, 50))        # uniform: the highest entropy there is
  a = sample.sample_logits(jax.random.PRNGKey(0), logits, 1.0)
  b = sample.sample_logits(jax.random.PRNGKey(0), logits, 1.0)
  c = sample.sample_logits(jax.random.PRNGKey(1), logits, 1.0)
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  params = params_for(MODEL, std=0.02)  # near-uniform next-token distributions
  gen = lambda seed: sample.generate_tokens(MODEL, params, PROMPTS, N_NEW, 1.0, seed=seed)
  np.testing.assert_array_equal(gen(5), gen(5))
  assert (gen(5) != gen(6)).any()


# ---------------------------------------------------------------------------------------------
# Stopping, scoring.

def test_eos_stops_each_sequence():
  params = params_for(MODEL, 2)
  free = sample.generate_tokens(MODEL, params, PROMPTS, N_NEW, temperature=0.0)

  def stops(eos):
    return [list(r).index(eos) if eos in r else N_NEW for r in free]
  # An EOS id at which the rows stop at different steps (some maybe never).
  eos = next(int(t) for t in np.unique(free) if len(set(stops(int(t)))) > 1)
  out = sample.generate_tokens(MODEL, params, PROMPTS, N_NEW, temperature=0.0, eos_id=eos,
                               pad_id=49)
  for row, free_row, stop in zip(out, free, stops(eos)):
    assert list(row[:stop + 1]) == list(free_row[:stop + 1])    # same tokens up to EOS
    assert (row[stop + 1:] == 49).all()                        # then pad
  assert sample.cut_at_eos([4, 5, eos, 6], eos) == [4, 5]


@functools.partial(jax.jit, static_argnums=0)
def reference_logprobs(mc, params, seqs):
  """Log-softmax of each sequence's own plain forward pass."""
  return [jax.nn.log_softmax(model_lib.apply(mc, params, s[None, :-1])[0], -1) for s in seqs]


def test_continuation_logprob_matches_full_forward():
  mc = tiny(pos='learned')            # the variant whose padding must stay inside the table
  params = params_for(mc, 4)
  rng = np.random.default_rng(4)
  pairs = [(rng.integers(0, 50, n), rng.integers(0, 50, m)) for n, m in [(5, 4), (1, 7), (25, 8)]]
  got = sample.continuation_logprobs(mc, params, [p for p, _ in pairs], [c for _, c in pairs])
  seqs = tuple(np.concatenate([p, c]).astype(np.int32) for p, c in pairs)
  for (p, c), logp, value in zip(pairs, reference_logprobs(mc, params, seqs), got):
    ref = sum(float(logp[len(p) - 1 + j, c[j]]) for j in range(len(c)))
    assert abs(value - ref) < 1e-4
  one = sample.continuation_logprob(mc, params, pairs[0][0], pairs[0][1])
  assert abs(one - got[0]) < 1e-4
  assert sample.continuation_logprob(mc, params, [1, 2], []) == 0.0


# ---------------------------------------------------------------------------------------------
# Loading a run, text generation and the sample command.

@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A run folder like training writes: config.json, tokenizer/, one checkpoint (random init)."""
  d = tmp_path_factory.mktemp('run')
  cfg = get_config()
  cfg.model.update(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=32, pos='learned')
  cfg_json = json.loads(cfg.to_json())
  (d / 'config.json').write_text(json.dumps(cfg_json))
  tok = tokenizer_lib.ByteTokenizer()
  tok.save(str(d / 'tokenizer'))
  mc = ModelConfig.from_config(cfg_json['model'], tok.vocab_size)
  params = params_for(mc)
  opt = train_lib.make_optimizer(train_lib.TrainConfig.from_config(cfg_json['train']), params)
  ckpts = ckpt_lib.Checkpoints(str(d / 'checkpoints'), 2)
  ckpts.save(7, {'params': params, 'opt_state': opt.init(params), 'step': jnp.array(7)})
  ckpts.close()
  return str(d), params


def test_load_and_sample_cli(workdir, capsys):
  path, params = workdir
  mc, loaded, tok, _ = runs.load_model(path)
  assert mc.pos == 'learned' and tok.vocab_size == 263     # bytes, specials and chat tokens
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  kw = dict(max_new_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=1, num_samples=2)
  # Emoji and CJK encode through bytes; an empty prompt starts a document.
  texts = chat_lib.sample_cli(path, '🚀 東京', **kw)
  assert len(texts) == 2 and '🚀 東京' in capsys.readouterr().out
  assert len(chat_lib.sample_cli(path, '', **kw)) == 2
  assert sample.generate(mc, loaded, tok, ['🚀 東京'], **kw) == texts   # same seed, same text


def test_bad_inputs(workdir, tmp_path):
  path, _ = workdir
  with pytest.raises(UserError, match='no config.json'):
    runs.load_model(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps(json.loads(get_config().to_json())))
  with pytest.raises(UserError, match='has no checkpoint.*train it first'):
    runs.load_model(str(tmp_path))
  ok = dict(max_new_tokens=4, temperature=1.0, top_k=0, top_p=1.0, seed=0, num_samples=1)
  for bad, match in [(dict(top_p=0.0), 'top_p'), (dict(top_p=1.5), 'top_p'),
                     (dict(temperature=-0.1), 'temperature'), (dict(top_k=-1), 'top_k'),
                     (dict(num_samples=0), 'num_samples'), (dict(max_new_tokens=-1), 'max_new')]:
    with pytest.raises(UserError, match=match):
      chat_lib.sample_cli(path, 'x', **{**ok, **bad})
  with pytest.raises(UserError, match='shorten the prompt'):       # 40 + 1 tokens > max_len 32
    chat_lib.sample_cli(path, 'x' * 40, **ok)
  # 11 + 30 - 1 > 32: refused by the library (run.py sample caps instead, with a note:
  # tests/test_robust_inputs.py)
  with pytest.raises(UserError, match='learned position'):
    sample.check_lengths(runs.load_model(path)[0], 11, 30)
  params = params_for(MODEL)
  long_prompts = PROMPTS[:3] + [list(range(30))]                    # rope runs past max_len 32
  assert sample.generate_tokens(MODEL, params, long_prompts, N_NEW, 0.0).shape == (4, N_NEW)
  with pytest.raises(UserError, match='empty'):
    sample.generate_tokens(MODEL, params, [[]], 3)
  with pytest.raises(UserError, match='empty'):
    sample.continuation_logprob(MODEL, params, [], [1])
