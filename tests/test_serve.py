"""Serving (lm/serve): the continuous-batching engine against plain generation, and the OpenAI
API's shapes, streaming, stop sequences, n, seeds, errors and API key, through FastAPI's test
client and the official `openai` client against a real uvicorn server."""
import dataclasses
import json
import socket
import threading
import time

import numpy as np
import pytest

fastapi = pytest.importorskip('fastapi', reason='serving needs requirements-serve.txt')
from fastapi.testclient import TestClient  # noqa: E402

from configs.base import get_config  # noqa: E402
from lm import chat as chat_lib  # noqa: E402
from lm import runs  # noqa: E402
from lm.data import tokenizer as tokenizer_lib  # noqa: E402
from lm.errors import UserError  # noqa: E402
from lm.eval import sample  # noqa: E402
from lm.serve import api  # noqa: E402
from lm.serve import engine as engine_lib  # noqa: E402
from lm.stages import pretrain as train_lib  # noqa: E402
from lm.training import checkpoint as ckpt_lib  # noqa: E402
from test_sample import params_for  # noqa: E402

MAX_LEN = 64
KEY = 'test-key'


def _write_run(d, chat: bool, params=None):
  cfg = get_config()
  cfg.model.update(n_layers=2, d_model=32, n_heads=4, d_ff=64, max_len=MAX_LEN, pos='rope')
  cfg_json = json.loads(cfg.to_json())
  tok = tokenizer_lib.ByteTokenizer()
  tok.save(str(d / 'tokenizer'))
  mc = runs.model_config(cfg_json, tok.vocab_size)
  if chat:   # what a fine-tuning run records: its section and its base's resolved model
    cfg_json['finetune'] = {'init_from': ''}
    cfg_json['base'] = {'model': dataclasses.asdict(mc)}
  (d / 'config.json').write_text(json.dumps(cfg_json))
  params = params_for(mc) if params is None else params
  opt = train_lib.make_optimizer(train_lib.TrainConfig.from_config(cfg_json['train']), params)
  ckpts = ckpt_lib.Checkpoints(str(d / 'checkpoints'), 2)
  ckpts.save(3, {'params': params, 'opt_state': opt.init(params), 'step': np.int32(3)})
  ckpts.close()
  return params


@pytest.fixture(scope='module')
def run_dirs(tmp_path_factory):
  """A chat run (random weights, the chat template) and a pretrained run with the same weights."""
  chat_dir = tmp_path_factory.mktemp('sft')
  params = _write_run(chat_dir, chat=True)
  plain_dir = tmp_path_factory.mktemp('base')
  _write_run(plain_dir, chat=False, params=params)
  return str(chat_dir), str(plain_dir)


@pytest.fixture(scope='module')
def server(run_dirs):
  s = api.Server(run_dirs[0], slots=4, name='tiny-chat', api_key=KEY)
  yield s
  s.close()


@pytest.fixture(scope='module')
def client(server):
  with TestClient(api.create_app(server)) as c:
    c.headers['Authorization'] = f'Bearer {KEY}'
    yield c


def _reference_chat(server, messages, max_tokens, temperature=0.0, seed=0, top_p=1.0):
  return sample.chat(server.mc, server.engine.params, server.tokenizer, messages, max_tokens,
                     temperature, 0, top_p, seed)[0]


def _sse(response):
  """The JSON events of a server-sent-event stream, and whether it ended with [DONE]."""
  events, done = [], False
  for line in response.iter_lines():
    if not line:
      continue
    assert line.startswith('data: '), line
    data = line[len('data: '):]
    if data == '[DONE]':
      done = True
      continue
    events.append(json.loads(data))
  return events, done


# ---------------------------------------------------------------------------------------------
# The engine.

def test_buckets():
  assert engine_lib.buckets(64) == (16, 32, 64)
  assert engine_lib.buckets(40) == (16, 32, 40)
  assert engine_lib.buckets(16) == (16,)
  assert [engine_lib.bucket_for(n, 40) for n in (1, 16, 17, 33, 40)] == [16, 16, 32, 40, 40]


def test_batched_equals_unbatched_and_nothing_recompiles(server):
  """Requests decoded together, of mixed lengths and settings, with rows refilled and the cache
  rolled, give exactly what plain generation gives each alone; nothing compiles after warm-up."""
  eng, mc, params = server.engine, server.mc, server.engine.params
  compiled = [f._cache_size() for f in (engine_lib._admit, engine_lib._step, engine_lib._roll)]
  rng = np.random.default_rng(0)
  reqs = []
  index_before = eng.index
  # (prompt length, reply length, temperature, top_k, top_p): prompts in the engine's buckets
  # of 16 and 64; four settings, so that the reference compiles four programs.
  settings = [(3, 4, 0.0, 0, 1.0), (40, 13, 0.9, 0, 0.8), (14, 13, 1.3, 7, 1.0),
              (47, 4, 0.7, 0, 1.0)]
  for i in range(12):         # 12 requests on 4 rows: rows are refilled
    n, m, temperature, top_k, top_p = settings[i % 4]
    prompt = rng.integers(0, 256, n).astype(np.int32)
    out, done = [], threading.Event()
    req = engine_lib.Request(prompt, m, out.append, lambda r, d=done: d.set(),
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=i,
                             stop_ids=(10,))
    reqs.append((req, out, done))
    eng.submit(req)
  for req, out, done in reqs:
    assert done.wait(120)
    ref = sample.generate_tokens(mc, params, [req.prompt], req.max_tokens, req.temperature,
                                 req.top_k, req.top_p, req.seed, eos_id=10)[0]
    assert out == sample.cut_at_eos(ref, 10), (len(req.prompt), req.max_tokens)
  assert eng.steps > 0 and eng.index != index_before + eng.steps   # the cache rolled
  assert [f._cache_size() for f in (engine_lib._admit, engine_lib._step,
                                    engine_lib._roll)] == compiled


def test_engine_refuses_what_does_not_fit(server):
  eng = server.engine
  with pytest.raises(UserError, match='context of 64'):
    eng.check(MAX_LEN + 1, 1)
  with pytest.raises(UserError, match='at most 5 new tokens'):
    eng.check(MAX_LEN - 4, 6)
  eng.check(MAX_LEN - 4, 5)
  with pytest.raises(UserError, match='positive integer'):
    engine_lib.Engine(server.mc, server.engine.params, slots=0)


# ---------------------------------------------------------------------------------------------
# The API.

def test_models_health_and_page(client):
  r = client.get('/v1/models')
  assert r.status_code == 200
  card, = r.json()['data']
  assert card['id'] == 'tiny-chat' and card['object'] == 'model' and card['chat'] is True
  assert card['context_length'] == MAX_LEN
  assert client.get('/v1/models/tiny-chat').json()['id'] == 'tiny-chat'
  assert client.get('/health').json()['status'] == 'ok'
  page = client.get('/')
  assert page.status_code == 200 and page.headers['content-type'].startswith('text/html')
  assert '/v1/chat/completions' in page.text


def test_chat_completion_equals_sample_at_temperature_0(client, server):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi?'}]
  r = client.post('/v1/chat/completions', json={
      'model': 'tiny-chat', 'messages': messages, 'temperature': 0, 'max_tokens': 20})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body['object'] == 'chat.completion' and body['id'].startswith('chatcmpl-')
  choice, = body['choices']
  assert choice['message']['role'] == 'assistant' and choice['index'] == 0
  assert choice['message']['content'] == _reference_chat(server, messages, 20)
  assert choice['finish_reason'] in ('stop', 'length')
  u = body['usage']
  assert u['prompt_tokens'] == len(messages[0]['content']) + len(messages[1]['content']) + 6
  assert u['total_tokens'] == u['prompt_tokens'] + u['completion_tokens']


def test_streamed_chat_equals_the_whole_answer(client, server):
  messages = [{'role': 'user', 'content': 'Tell me a story.'}]
  req = {'model': 'tiny-chat', 'messages': messages, 'temperature': 0.8, 'seed': 5,
         'max_tokens': 30, 'stream': True, 'stream_options': {'include_usage': True}}
  with client.stream('POST', '/v1/chat/completions', json=req) as r:
    assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
    events, done = _sse(r)
  assert done
  assert events[0]['object'] == 'chat.completion.chunk'
  assert events[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
  text = ''.join(e['choices'][0]['delta'].get('content', '') for e in events if e['choices'])
  finish = [e['choices'][0]['finish_reason'] for e in events if e['choices']]
  assert finish[-1] in ('stop', 'length') and not any(finish[:-1])
  assert events[-1]['choices'] == [] and events[-1]['usage']['completion_tokens'] > 0
  whole = client.post('/v1/chat/completions', json={**req, 'stream': False}).json()
  assert text == whole['choices'][0]['message']['content']
  assert text == _reference_chat(server, messages, 30, temperature=0.8, seed=5)


def test_completions_seeds_and_n(client, server):
  req = {'model': 'tiny-chat', 'prompt': 'Once upon', 'max_tokens': 12, 'temperature': 1.0,
         'seed': 42}
  one = client.post('/v1/completions', json=req).json()
  assert one['object'] == 'text_completion'
  again = client.post('/v1/completions', json=req).json()
  assert one['choices'][0]['text'] == again['choices'][0]['text']   # a seed reproduces
  ref = sample.generate(server.mc, server.engine.params, server.tokenizer, ['Once upon'], 12,
                        1.0, 0, 1.0, 42)[0]
  assert one['choices'][0]['text'] == ref                        # and equals run.py sample's
  other = client.post('/v1/completions', json={**req, 'seed': 43}).json()
  assert other['choices'][0]['text'] != one['choices'][0]['text']
  many = client.post('/v1/completions', json={**req, 'n': 3}).json()
  assert [c['index'] for c in many['choices']] == [0, 1, 2]
  for j, c in enumerate(many['choices']):   # choice j samples with seed + j
    alone = client.post('/v1/completions', json={**req, 'seed': 42 + j}).json()
    assert c['text'] == alone['choices'][0]['text']
  assert len({c['text'] for c in many['choices']}) > 1
  two = client.post('/v1/completions', json={**req, 'prompt': ['Once upon', 'The end'],
                                               'n': 2}).json()
  assert [c['index'] for c in two['choices']] == [0, 1, 2, 3]
  assert two['choices'][0]['text'] == one['choices'][0]['text']
  # The default max_tokens of a completion is 16 (the API's).
  default = client.post('/v1/completions', json={'model': 'tiny-chat', 'prompt': 'a',
                                                  'temperature': 0, 'ignore_eos': True}).json()
  assert default['usage']['completion_tokens'] == 16
  assert default['choices'][0]['finish_reason'] == 'length'


def test_stop_sequences(client, server):
  """The text ends before the first stop sequence, streamed or not."""
  base = {'model': 'tiny-chat', 'prompt': 'x', 'max_tokens': 40, 'temperature': 0,
          'ignore_eos': True}
  full = client.post('/v1/completions', json=base).json()['choices'][0]['text']
  assert len(full) >= 10
  stop = full[6:9]
  cut = full[:full.index(stop)]
  got = client.post('/v1/completions', json={**base, 'stop': [stop, '\x00never']}).json()
  assert got['choices'][0]['text'] == cut and got['choices'][0]['finish_reason'] == 'stop'
  with client.stream('POST', '/v1/completions', json={**base, 'stop': stop, 'stream': True}) as r:
    events, done = _sse(r)
  assert done and ''.join(e['choices'][0]['text'] for e in events) == cut
  assert events[-1]['choices'][0]['finish_reason'] == 'stop'
  assert server.engine.busy() == (0, 0) or _settles(server)


def _settles(server, seconds=10.0):
  end = time.time() + seconds
  while time.time() < end:
    if server.engine.busy() == (0, 0):
      return True
    time.sleep(0.05)
  return False


def test_twenty_malformed_requests_each_get_a_json_error(client):
  from benchmarks.serve_load import malformed
  assert len(malformed('tiny-chat')) == 20
  for method, path, body, status in malformed('tiny-chat'):
    kw = {'content': body} if isinstance(body, bytes) else {'json': body} if body else {}
    r = client.request(method, path, **kw)
    assert r.status_code == status, (path, body, r.status_code, r.text)
    err = r.json()['error']
    assert err['message'] and err['type'], err
  ok = client.post('/v1/chat/completions', json={
      'model': 'tiny-chat', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 3})
  assert ok.status_code == 200   # still serving


def test_context_errors_name_the_limit(client):
  r = client.post('/v1/chat/completions', json={
      'model': 'tiny-chat', 'messages': [{'role': 'user', 'content': 'x' * 100}]})
  assert r.status_code == 400 and r.json()['error']['code'] == 'context_length_exceeded'
  assert 'context of 64 tokens' in r.json()['error']['message']
  r = client.post('/v1/completions', json={'model': 'tiny-chat', 'prompt': 'abc',
                                           'max_tokens': 62})
  assert r.json()['error']['code'] == 'context_length_exceeded'
  assert 'room for 61' in r.json()['error']['message']
  assert client.post('/v1/completions', json={'model': 'tiny-chat', 'prompt': 'abc',
                                              'max_tokens': 61}).status_code == 200


def test_api_key(client):
  req = {'model': 'tiny-chat', 'prompt': 'a', 'max_tokens': 2}
  for headers in ({'Authorization': ''}, {'Authorization': 'Bearer wrong'}):
    r = client.post('/v1/completions', json=req, headers=headers)
    assert r.status_code == 401 and r.json()['error']['code'] == 'invalid_api_key'
    assert client.get('/v1/models', headers=headers).status_code == 401
  assert client.post('/v1/completions', json=req).status_code == 200
  assert client.get('/', headers={'Authorization': ''}).status_code == 200   # the page itself


def test_a_client_leaving_mid_stream_frees_its_row(client, server):
  req = {'model': 'tiny-chat', 'prompt': 'x', 'max_tokens': 60, 'temperature': 0,
         'ignore_eos': True, 'stream': True}
  with client.stream('POST', '/v1/completions', json=req) as r:
    for _ in r.iter_lines():
      break
  assert _settles(server)


def test_pretrained_run_serves_completions_only(run_dirs):
  s = api.Server(run_dirs[1], slots=4, warmup=False)
  try:
    with TestClient(api.create_app(s)) as c:
      name = c.get('/v1/models').json()['data'][0]['id']
      assert c.get('/v1/models').json()['data'][0]['chat'] is False
      r = c.post('/v1/chat/completions', json={'model': name, 'messages': [
          {'role': 'user', 'content': 'hi'}]})
      assert r.status_code == 400 and r.json()['error']['code'] == 'chat_not_supported'
      r = c.post('/v1/completions', json={'model': name, 'prompt': 'hi', 'temperature': 0})
      assert r.status_code == 200 and r.json()['choices'][0]['finish_reason'] in ('stop', 'length')
  finally:
    s.close()


def test_serve_refusals(run_dirs, tmp_path):
  with socket.socket() as held:
    held.bind(('127.0.0.1', 0))
    held.listen()
    port = held.getsockname()[1]
    with pytest.raises(UserError, match=f'cannot listen on 127.0.0.1:{port}'):
      api.serve(run_dirs[0], port=port)
  with pytest.raises(UserError, match='not a run folder'):
    api.Server(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# The official client against a real server.

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def live_url(server):
  uvicorn = pytest.importorskip('uvicorn')
  port = _free_port()
  config = uvicorn.Config(api.create_app(server), host='127.0.0.1', port=port, log_level='error')
  live = uvicorn.Server(config)
  thread = threading.Thread(target=live.run, daemon=True)
  thread.start()
  for _ in range(200):
    if live.started:
      break
    time.sleep(0.05)
  yield f'http://127.0.0.1:{port}'
  live.should_exit = True
  thread.join(10)


def test_openai_client_matches_run_py_sample(live_url, run_dirs, capsys):
  openai = pytest.importorskip('openai', reason='the parity test needs the openai package')
  client = openai.OpenAI(base_url=live_url + '/v1', api_key=KEY)
  assert [m.id for m in client.models.list()] == ['tiny-chat']
  expected = chat_lib.sample_cli(run_dirs[0], 'What is 2+2?', max_new_tokens=24, temperature=0)[0]
  msg = [{'role': 'user', 'content': 'What is 2+2?'}]
  got = client.chat.completions.create(model='tiny-chat', messages=msg, temperature=0,
                                       max_tokens=24)
  assert got.choices[0].message.content == expected
  pieces = [chunk.choices[0].delta.content or '' for chunk in client.chat.completions.create(
      model='tiny-chat', messages=msg, temperature=0, max_tokens=24, stream=True)
      if chunk.choices]
  assert ''.join(pieces) == expected and len(pieces) > 2
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model='other', messages=msg)
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=live_url + '/v1', api_key='wrong').models.list()


def test_chat_page_in_a_real_browser(live_url, server, tmp_path):
  """Headless Chromium loads the page, sends a message; the reply streams in, equal to the
  greedy reply."""
  from benchmarks import serve_page
  why = serve_page.available()
  if why:
    pytest.skip(f'the browser test needs Chromium and Selenium: {why}')
  driver = serve_page.chromium()
  try:
    got = serve_page.chat(driver, live_url, ['Hello there'], api_key=KEY, temperature=0)
    driver.save_screenshot(str(tmp_path / 'page.png'))
  finally:
    serve_page.quit(driver)
  messages = [{'role': 'user', 'content': 'Hello there'}]
  n = len('Hello there') + 4    # with eos, <|user|>, <|end|> and <|assistant|>
  expected = _reference_chat(server, messages, MAX_LEN - n + 1)
  assert got['errors'] == []
  assert got['replies'] == [expected] and got['updates'] > 2
  assert (tmp_path / 'page.png').stat().st_size > 1000


def test_start_up_line_says_when_the_server_is_exposed(run_dirs, monkeypatch, capsys):
  ran = []
  monkeypatch.setattr(api.uvicorn, 'run', lambda app, **kw: ran.append(kw))
  monkeypatch.delenv('LM_API_KEY', raising=False)
  api.serve(run_dirs[0], host='127.0.0.1', port=_free_port(), slots=4)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert line.startswith(f'serving {run_dirs[0]}') and 'exposed' not in line
  api.serve(run_dirs[0], host='0.0.0.0', port=_free_port(), slots=4)
  line = capsys.readouterr().out.strip().splitlines()[-1]
  assert 'exposed' in line and 'without --api_key' in line
  assert [kw['host'] for kw in ran] == ['127.0.0.1', '0.0.0.0']


def test_missing_fastapi_is_one_sentence(monkeypatch):
  monkeypatch.setattr(api, 'fastapi', None)
  with pytest.raises(UserError, match='pip install -r requirements-serve.txt'):
    api.serve('runs/x')
