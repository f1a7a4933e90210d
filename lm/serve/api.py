"""`python run.py serve`: a run behind the OpenAI HTTP API, and a chat page.

Routes (FastAPI on uvicorn):
  POST /v1/chat/completions   a fine-tuned or aligned run answers in its chat template
  POST /v1/completions        any run continues the prompt (after EOS, as run.py sample does)
  GET  /v1/models             the one model served; GET /health; GET / the chat page

Sampling parameters: temperature (0 to 2, 0 is greedy), top_p, max_tokens (or
max_completion_tokens), stop (up to 4 strings), n (up to MAX_N), seed, stream (server-sent
events, one chunk per decoded piece of text), stream_options.include_usage; two extensions:
top_k, and ignore_eos (keep going past the end token, for benchmarks). Other OpenAI parameters
are accepted and ignored, except those whose answer would be wrong without them (logprobs,
echo, tools, penalties other than 0), which are refused.

Context: a request must fit the model's context (model.max_len tokens): a prompt longer than
that, or a max_tokens beyond what the prompt leaves, is refused with 400
`context_length_exceeded`; nothing is truncated silently (the chat page drops the oldest turns
itself and says so). Without max_tokens, a chat reply may fill the context and a completion gets
16 tokens (the API's defaults).

Errors have the API's shape, {"error": {"message", "type", "param", "code"}}: 400 for a body that
is not JSON or breaks the schema, 401 for a missing or wrong API key (--api_key, checked on every
/v1 request), 404 for an unknown model or route, 503 when the decoder has stopped.

Seeds: choice i of a request with seed s samples with seed s + i, and choice 0 equals
`run.py sample --seed=s` with the same settings (run.py sample draws its samples as one batch, so
its later samples differ).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
import time
from typing import Any, Literal

try:
  import fastapi
  import pydantic
  import uvicorn
  from fastapi import responses
  from fastapi.exceptions import RequestValidationError
  from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError:   # serving is optional: requirements-serve.txt
  fastapi = None

from lm import runs
from lm.chat import TextStream
from lm.data import sft
from lm.errors import UserError
from lm.serve import engine as engine_lib

MAX_N = 16
MAX_STOP = 4
COMPLETION_DEFAULT_TOKENS = 16
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static')
INSTALL = 'pip install -r requirements-serve.txt'


def require() -> None:
  if fastapi is None:
    raise UserError(f'serving needs fastapi and uvicorn, which are not installed; run {INSTALL}.')


class APIError(Exception):
  def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
               kind: str = 'invalid_request_error'):
    super().__init__(message)
    self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

  def response(self):
    return error_response(self.status, self.message, self.code, self.param, self.kind)


def error_response(status, message, code=None, param=None, kind='invalid_request_error'):
  return responses.JSONResponse(
      {'error': {'message': message, 'type': kind, 'param': param, 'code': code}}, status_code=status)


# ---------------------------------------------------------------------------------------------
# Request bodies.

if fastapi is not None:
  class _Body(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='allow')
    model: str
    temperature: float = pydantic.Field(1.0, ge=0, le=2)
    top_p: float = pydantic.Field(1.0, gt=0, le=1)
    top_k: int = pydantic.Field(0, ge=0)
    n: int = pydantic.Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = pydantic.Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None
    tools: Any = None

  class _Message(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra='allow')
    role: Literal['system', 'developer', 'user', 'assistant']
    content: str | list[dict]

  class ChatBody(_Body):
    messages: list[_Message] = pydantic.Field(min_length=1)
    max_completion_tokens: int | None = pydantic.Field(None, ge=1)

  class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False


def _text(content) -> str:
  """A message's content: a string, or the text parts of a content list."""
  if isinstance(content, str):
    return content
  parts = []
  for part in content:
    if part.get('type') != 'text' or not isinstance(part.get('text'), str):
      raise APIError(400, 'only text content parts ({"type": "text", "text": ...}) are '
                     'supported; this model reads text alone.', param='messages')
    parts.append(part['text'])
  return ''.join(parts)


def _stops(stop) -> list[str]:
  stops = [stop] if isinstance(stop, str) else list(stop or [])
  if len(stops) > MAX_STOP:
    raise APIError(400, f'stop holds {len(stops)} sequences; at most {MAX_STOP} are allowed.',
                   param='stop')
  if any(s == '' for s in stops):
    raise APIError(400, 'a stop sequence is empty; give non-empty strings.', param='stop')
  return stops


def _refuse_unsupported(body) -> None:
  for name, bad in (('logprobs', body.logprobs not in (None, False, 0)),
                    ('tools', bool(body.tools)),
                    ('presence_penalty', body.presence_penalty != 0),
                    ('frequency_penalty', body.frequency_penalty != 0),
                    ('echo', getattr(body, 'echo', False))):
    if bad:
      raise APIError(400, f'{name} is not supported by this server; leave it out.', param=name)


# ---------------------------------------------------------------------------------------------
# One choice's text: detokenising, stop sequences, and what may be sent so far.

class Choice:
  def __init__(self, tokenizer, stops: list[str]):
    self.stream, self.stops = TextStream(tokenizer), stops
    self.hold = max((len(s) for s in stops), default=1) - 1   # a stop may still be forming
    self.sent, self.tokens, self.reason = 0, 0, None
    self.text: str | None = None     # the final text, once a stop sequence cut it
    self.done = False

  def push(self, token: int) -> tuple[str, bool]:
    """Takes a token: (the text now safe to send, whether a stop sequence ended the choice)."""
    if self.done:
      return '', False
    self.tokens += 1
    self.stream.push(token)
    return self._scan(final=False)

  def end(self, reason: str) -> str:
    """The sequence ended ('stop' or 'length'): the rest of its text."""
    if self.done:
      return ''
    self.stream.flush()
    piece, stopped = self._scan(final=True)
    if not stopped:
      self.reason = 'length' if reason == 'length' else 'stop'
    self.done = True
    return piece

  def _scan(self, final: bool) -> tuple[str, bool]:
    shown = self.stream.shown
    hits = [i for i in (shown.find(s, self.sent) for s in self.stops) if i >= 0]
    if hits:
      cut = min(hits)
      self.text, self.reason, self.done = shown[:cut], 'stop', True
      piece, self.sent = shown[self.sent:cut], cut
      return piece, True
    upto = len(shown) if final else max(self.sent, len(shown) - self.hold)
    piece, self.sent = shown[self.sent:upto], upto
    return piece, False

  @property
  def final_text(self) -> str:
    return self.text if self.text is not None else self.stream.shown


# ---------------------------------------------------------------------------------------------
# The server.

class Mailbox:
  """Hands items from the engine's thread to asyncio queues on one event loop, waking the loop
  once per batch rather than once per token (a decode step emits a token for every row)."""

  def __init__(self, loop):
    self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

  def post(self, queue, item) -> None:
    with self.lock:
      self.items.append((queue, item))
      if self.scheduled:
        return
      self.scheduled = True
    self.loop.call_soon_threadsafe(self._drain)

  def _drain(self) -> None:
    with self.lock:
      items, self.items, self.scheduled = self.items, [], False
    for queue, item in items:
      queue.put_nowait(item)


class Server:
  """The model, its engine and the request handling behind the routes."""

  def __init__(self, workdir: str, slots: int = 32, name: str | None = None,
               api_key: str | None = None, warmup: bool = True):
    require()
    cfg = runs.read_config(workdir, f'{workdir} has no config.json, so it is not a run folder; '
                           'point --workdir at a run that run.py wrote.')
    if runs.kind(cfg) == 'reward':
      raise UserError(f'{workdir} is a reward model, which scores replies but does not write '
                      f'them; serve its SFT run {runs.base_workdir(cfg)} instead.')
    self.mc, params, self.tokenizer, identity = runs.load_model(workdir)
    self.chat = runs.chats(cfg)
    self.end_id = sft.chat_ids(self.tokenizer)['end'] if self.chat else None
    self.name = name or os.path.basename(os.path.normpath(workdir))
    self.fingerprint = 'lm-' + identity['params_sha256'][:12]
    self.created = int(time.time())
    self.api_key = api_key or None
    self.engine = engine_lib.Engine(self.mc, params, slots)
    self._mailboxes: dict = {}
    if warmup:
      self.engine.warmup()
    self.engine.start()

  def close(self) -> None:
    self.engine.close()

  def mailbox(self) -> 'Mailbox':
    loop = asyncio.get_running_loop()
    if loop not in self._mailboxes:
      self._mailboxes[loop] = Mailbox(loop)
    return self._mailboxes[loop]

  # -- checks ----------------------------------------------------------------------------------
  def check_model(self, body) -> None:
    if body.model != self.name:
      raise APIError(404, f'the model {body.model!r} does not exist here; this server serves '
                     f'{self.name!r} (GET /v1/models).', code='model_not_found', param='model')

  def max_tokens(self, body, prompt_len: int, default: int | None) -> int:
    want = getattr(body, 'max_completion_tokens', None) or body.max_tokens
    room = self.engine.room(prompt_len)
    if prompt_len > self.mc.max_len:
      raise APIError(400, f'the prompt is {prompt_len} tokens, more than this model\'s context '
                     f'of {self.mc.max_len} tokens; shorten it (nothing is truncated).',
                     code='context_length_exceeded', param='messages' if self.chat else 'prompt')
    if want is None:
      return room if default is None else min(default, room)
    if want > room:
      raise APIError(400, f'max_tokens={want} does not fit: the prompt is {prompt_len} tokens '
                     f'and the context {self.mc.max_len}, which leaves room for {room} new '
                     'tokens; lower max_tokens or shorten the prompt.',
                     code='context_length_exceeded', param='max_tokens')
    return want

  # -- generation ------------------------------------------------------------------------------
  def submit(self, queue, offset: int, prompt, body, max_tokens: int, stop_ids: tuple,
             seed: int | None) -> list:
    """Submits body.n sequences of one prompt; their tokens and ends arrive on `queue` as
    (offset + j, 'token' | 'end', value). Returns the requests."""
    mailbox = self.mailbox()
    put = lambda item: mailbox.post(queue, item)
    base = secrets.randbits(31) if seed is None else seed
    reqs = [engine_lib.Request(
        prompt, max_tokens, emit=lambda t, i=offset + j: put((i, 'token', t)),
        finish=lambda r, i=offset + j: put((i, 'end', r)), temperature=body.temperature,
        top_k=body.top_k, top_p=body.top_p, seed=(base + j) % 2**31,
        stop_ids=() if body.ignore_eos else stop_ids) for j in range(body.n)]
    try:
      for req in reqs:
        self.engine.submit(req)
    except RuntimeError as e:
      raise APIError(503, f'the decoder has stopped ({e}); restart the server.',
                     kind='server_error') from e
    return reqs

  async def events(self, queue, reqs, choices):
    """Yields (index, text piece) as text becomes safe to send, and (index, None) when a choice
    ends. Leaving early (a client gone) cancels every sequence still decoding."""
    ended = 0
    try:
      while ended < len(reqs):
        i, what, value = await queue.get()
        c = choices[i]
        if what == 'token':
          piece, stopped = c.push(value)
          if piece:
            yield i, piece
          if stopped:             # a stop sequence: the engine frees the row at its next token
            reqs[i].cancelled = True
            yield i, None
        else:
          ended += 1
          if value == 'error':
            raise APIError(503, 'the decoder stopped while answering; restart the server.',
                           kind='server_error')
          if not c.done:
            piece = c.end(value)
            if piece:
              yield i, piece
            yield i, None
    finally:
      for req in reqs:
        req.cancelled = True


# ---------------------------------------------------------------------------------------------
# Routes.

def _sse(obj) -> str:
  return f'data: {json.dumps(obj, ensure_ascii=False)}\n\n'


def create_app(server: Server):
  """The FastAPI application around a Server (closed when the app shuts down)."""
  require()
  import contextlib

  @contextlib.asynccontextmanager
  async def lifespan(app):
    yield
    server.close()

  app = fastapi.FastAPI(title='lm', lifespan=lifespan, docs_url=None, redoc_url=None)
  app.state.server = server
  if server.api_key:
    app.add_middleware(KeyCheck, key=server.api_key)

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return e.response()

  @app.exception_handler(UserError)
  async def _user_error(request, e: UserError):
    return error_response(400, str(e))

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    errors = e.errors()
    first = errors[0] if errors else {}
    if first.get('type') == 'json_invalid':
      return error_response(400, 'the request body is not valid JSON; send a JSON object.')
    loc = [str(p) for p in first.get('loc', ()) if p != 'body']
    where = '.'.join(loc) or 'body'
    msg = first.get('msg', 'invalid request')
    if first.get('type') == 'missing':
      msg = 'is required'
    if not loc and first.get('type') in ('model_attributes_type', 'dict_type'):
      return error_response(400, 'the request body must be a JSON object.')
    return error_response(400, f'{where}: {msg}.', param=loc[0] if loc else None)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e):
    if e.status_code == 404:
      return error_response(404, f'there is no route {request.method} {request.url.path}; the '
                            'API is under /v1 (chat/completions, completions, models).',
                            code='not_found')
    if e.status_code == 405:
      return error_response(405, f'{request.method} is not allowed on {request.url.path}.')
    return error_response(e.status_code, str(e.detail))

  @app.get('/health')
  async def health():
    if server.engine.error is not None:
      return error_response(503, f'the decoder has stopped: {server.engine.error!r}',
                            kind='server_error')
    running, waiting = server.engine.busy()
    return {'status': 'ok', 'model': server.name, 'slots': server.engine.slots,
            'running': running, 'waiting': waiting}

  @app.get('/v1/models')
  async def models():
    return {'object': 'list', 'data': [_model_card(server)]}

  @app.get('/v1/models/{model_id}')
  async def model(model_id: str):
    if model_id != server.name:
      raise APIError(404, f'the model {model_id!r} does not exist here; this server serves '
                     f'{server.name!r}.', code='model_not_found', param='model')
    return _model_card(server)

  @app.get('/')
  async def page():
    return responses.FileResponse(os.path.join(STATIC, 'index.html'), media_type='text/html')

  @app.post('/v1/chat/completions')
  async def chat_completions(body: ChatBody):
    server.check_model(body)
    _refuse_unsupported(body)
    if not server.chat:
      raise APIError(400, f'{server.name} is a pretrained run that never learned the chat '
                     'template; use /v1/completions, or serve a fine-tuned run.',
                     code='chat_not_supported', param='messages')
    messages = [{'role': 'system' if m.role == 'developer' else m.role,
                 'content': _text(m.content)} for m in body.messages]
    prompt = sft.encode_chat(server.tokenizer, messages, generation_prompt=True)[0]
    max_tokens = server.max_tokens(body, len(prompt), None)
    stops = _stops(body.stop)
    return await _respond(server, body, [prompt], max_tokens, (server.end_id,), stops,
                          chat=True)

  @app.post('/v1/completions')
  async def completions(body: CompletionBody):
    server.check_model(body)
    _refuse_unsupported(body)
    texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not texts:
      raise APIError(400, 'prompt is an empty list; give a string or a list of strings.',
                     param='prompt')
    if len(texts) * body.n > MAX_N:
      raise APIError(400, f'{len(texts)} prompts x n={body.n} is more than {MAX_N} choices; '
                     'send fewer at a time.', param='n')
    prompts = [[server.tokenizer.eos_id] + list(server.tokenizer.encode(t)) for t in texts]
    max_tokens = min(server.max_tokens(body, len(p), COMPLETION_DEFAULT_TOKENS) for p in prompts)
    stops = _stops(body.stop)
    return await _respond(server, body, prompts, max_tokens, (server.tokenizer.eos_id,), stops,
                          chat=False)

  return app


class KeyCheck:
  """ASGI middleware: every /v1 request must carry "Authorization: Bearer KEY" (the page at / and
  /health need none). Plain ASGI, so streamed replies pass through untouched."""

  def __init__(self, app, key: str):
    self.app, self.key = app, key.encode()

  async def __call__(self, scope, receive, send):
    if scope['type'] == 'http' and scope['path'].startswith('/v1'):
      got = dict(scope['headers']).get(b'authorization', b'')
      token = got[7:] if got[:7].lower() == b'bearer ' else b''
      if not secrets.compare_digest(token, self.key):
        response = error_response(401, 'a missing or wrong API key; send "Authorization: Bearer '
                                  'KEY" with the key the server was started with.',
                                  code='invalid_api_key')
        await response(scope, receive, send)
        return
    await self.app(scope, receive, send)


def _model_card(server) -> dict:
  return {'id': server.name, 'object': 'model', 'created': server.created, 'owned_by': 'lm',
          'chat': server.chat, 'context_length': server.mc.max_len}


async def _respond(server, body, prompts, max_tokens, stop_ids, stops, chat: bool):
  """Runs every choice (prompt-major: prompt p's choice j has index p * n + j) and answers in
  one JSON body or as server-sent events."""
  queue: asyncio.Queue = asyncio.Queue()
  reqs = []
  try:
    for p, prompt in enumerate(prompts):
      seed = None if body.seed is None else body.seed + p * body.n
      reqs += server.submit(queue, p * body.n, prompt, body, max_tokens, stop_ids, seed)
  except BaseException:
    for req in reqs:
      req.cancelled = True
    raise
  choices = [Choice(server.tokenizer, stops) for _ in reqs]
  rid = ('chatcmpl-' if chat else 'cmpl-') + secrets.token_hex(12)
  head = {'id': rid, 'object': 'chat.completion' if chat else 'text_completion',
          'created': int(time.time()), 'model': server.name,
          'system_fingerprint': server.fingerprint}
  prompt_tokens = sum(len(p) for p in prompts)

  def usage():
    done = sum(c.tokens for c in choices)
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': done,
            'total_tokens': prompt_tokens + done}

  if not body.stream:
    async for _ in server.events(queue, reqs, choices):
      pass
    out = []
    for i, c in enumerate(choices):
      if chat:
        out.append({'index': i, 'message': {'role': 'assistant', 'content': c.final_text},
                    'logprobs': None, 'finish_reason': c.reason})
      else:
        out.append({'index': i, 'text': c.final_text, 'logprobs': None,
                    'finish_reason': c.reason})
    return {**head, 'choices': out, 'usage': usage()}

  chunk_head = {**head, 'object': 'chat.completion.chunk' if chat else 'text_completion'}

  def chunk(i, piece, finish=None, role=False):
    if chat:
      delta = {'role': 'assistant', 'content': ''} if role else (
          {} if piece is None else {'content': piece})
      c = {'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': finish}
    else:
      c = {'index': i, 'text': piece or '', 'logprobs': None, 'finish_reason': finish}
    return _sse({**chunk_head, 'choices': [c]})

  include_usage = bool((body.stream_options or {}).get('include_usage'))

  async def stream():
    try:
      if chat:
        for i in range(len(choices)):
          yield chunk(i, None, role=True)
      async for i, piece in server.events(queue, reqs, choices):
        yield chunk(i, piece) if piece is not None else chunk(i, None, choices[i].reason)
    except APIError as e:
      yield _sse({'error': {'message': e.message, 'type': e.kind, 'param': None,
                            'code': e.code}})
      return
    finally:
      for req in reqs:
        req.cancelled = True
    if include_usage:
      yield _sse({**chunk_head, 'choices': [], 'usage': usage()})
    yield 'data: [DONE]\n\n'

  return responses.StreamingResponse(stream(), media_type='text/event-stream',
                                     headers={'Cache-Control': 'no-cache'})


# ---------------------------------------------------------------------------------------------
# The command.

def serve(workdir: str, host: str = '127.0.0.1', port: int = 8000, api_key: str = '',
          slots: int = 32, name: str = '') -> None:
  require()
  import socket
  if not 0 < port < 65536:
    raise UserError(f'--port={port} must be between 1 and 65535.')
  with socket.socket() as s:
    try:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      s.bind((host, port))
    except OSError as e:
      raise UserError(f'cannot listen on {host}:{port} ({e.strerror}); pick another --port or '
                      'stop what holds it.') from e
  api_key = api_key or os.environ.get('LM_API_KEY', '')
  print(f'loading {workdir} and compiling the decoder ...', flush=True)
  server = Server(workdir, slots=slots, name=name or None, api_key=api_key)
  app = create_app(server)
  url = f'http://{"localhost" if host in ("127.0.0.1", "::1") else host}:{port}'
  kind = 'chat' if server.chat else 'completions only (a pretrained run)'
  exposed = host not in ('127.0.0.1', 'localhost', '::1')
  print(f'serving {workdir} as model {server.name!r} ({kind}, context {server.mc.max_len} '
        f'tokens, {slots} sequences at a time) on {url}: chat page at /, API at /v1'
        + ('; exposed: other machines can reach it' if exposed else '')
        + ('' if not exposed or api_key else ', and without --api_key anyone who does can use it'),
        flush=True)
  try:
    uvicorn.run(app, host=host, port=port, log_level='warning')
  finally:
    server.close()
