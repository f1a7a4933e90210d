"""Talking to a run from the terminal: `python run.py sample` and `python run.py chat`.

`sample_cli` continues a prompt (or, for a run trained in the chat template, answers it as a
user turn; a reward-model run shows its SFT policy's replies with their rewards).

`chat_cli` is a terminal chat with a fine-tuned or aligned run.

The conversation is kept in the chat template (lm/data/sft.py) and every reply is streamed: the prompt
is prefilled into a KV cache once, then one jitted decode step per token, each printed as soon as
it completes a character. Sampling is `run.py sample`'s (temperature, top-k, top-p, seed; step t
draws with fold_in(seed, t) as `sample.decode_loop` does, so a streamed reply equals the batched
one). A reply ends at <|end|> or after max_new_tokens; the conversation never runs past
model.max_len: when the history and a full reply no longer fit, the oldest turns are dropped
(the system message stays) and a note says so.

`sample` lowers a max_new_tokens the model cannot serve (learned positions end at model.max_len;
others stop at 4 x max_len, and the KV cache must fit the device) to what it can, with a note
(sample.cap_new_tokens). Typed or pasted text (stdin, --prompt, --system) with bytes that are not
UTF-8 has them replaced with U+FFFD (corpus.clean_text), and a note says how many.

Interactive: type a message and press Enter; `/reset` starts over, `/quit` (or Ctrl-D) leaves.
`--prompt=TEXT` answers once and exits (for scripts and tests).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

from lm import runs
from lm.eval import sample as sample_lib
from lm.data import corpus
from lm.data import sft
from lm.align import common
from lm.align import reward as reward_lib
from lm.errors import UserError

_decode = jax.jit(sample_lib.decode_step, static_argnames=('mc',))
_sample = jax.jit(sample_lib.sample_logits, static_argnames=('temperature', 'top_k', 'top_p'))


def stream_ids(mc, params, prompt_ids, max_new_tokens: int, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_id: int | None = None):
  """Yields the new token ids one by one (the stop id last, when reached)."""
  prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
  P = sample_lib.padded_len(mc, len(prompt))
  tokens = np.zeros((1, P), np.int32)
  tokens[0, :len(prompt)] = prompt
  lengths = jnp.asarray([len(prompt)], jnp.int32)
  logits, cache = sample_lib.prefill(mc, params, jnp.asarray(tokens), lengths,
                                     slots=P + max_new_tokens - 1)
  rng = jax.random.PRNGKey(seed)
  sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
  for t in range(max_new_tokens):
    token = _sample(jax.random.fold_in(rng, t), logits, **sampling)
    tid = int(token[0])
    yield tid
    if tid == stop_id or t == max_new_tokens - 1:
      return
    logits, cache = _decode(mc, params, cache, token, lengths + t)


class TextStream:
  """Turns token ids into printable text increments (a character split over byte tokens waits
  until it is complete)."""

  def __init__(self, tokenizer):
    self.tokenizer, self.ids, self.shown = tokenizer, [], ''

  def push(self, tid: int) -> str:
    self.ids.append(tid)
    text = self.tokenizer.decode(self.ids)
    if text.endswith('\ufffd'):
      return ''
    new, self.shown = text[len(self.shown):], text
    return new

  def flush(self) -> str:
    text = self.tokenizer.decode(self.ids)
    new, self.shown = text[len(self.shown):], text
    return new


class Chat:
  """A conversation with one model: its history, fitting it into the context, streaming replies."""

  def __init__(self, mc, params, tokenizer, system: str = '', max_new_tokens: int = 200,
               temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0):
    sample_lib.check_sampling(temperature, top_k, top_p, 1, max_new_tokens)
    self.mc, self.params, self.tokenizer = mc, params, tokenizer
    self.end = sft.chat_ids(tokenizer)['end']
    self.system = system
    self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    self.max_new, self.seed, self.turn = max_new_tokens, seed, 0
    self.history: list[dict] = []

  def reset(self) -> None:
    self.history = []

  def _messages(self, history):
    return ([{'role': 'system', 'content': self.system}] if self.system else []) + history

  def _prompt(self, user: str) -> tuple[np.ndarray, int, bool]:
    """(prompt ids, new tokens allowed, whether earlier turns were dropped)."""
    history = self.history + [{'role': 'user', 'content': user}]
    dropped = False
    want = min(self.max_new, 32)   # the least room a reply gets before old turns are dropped
    while True:
      ids = sft.encode_chat(self.tokenizer, self._messages(history), generation_prompt=True)[0]
      room = self.mc.max_len - len(ids) + 1
      if room >= want or len(history) == 1:
        break
      history = history[2:]       # the oldest user/assistant exchange
      dropped = True
    if room < 1:
      raise UserError(f'the message is {len(ids)} tokens with the template, more than this '
                      f"model's context of model.max_len={self.mc.max_len}; shorten it.")
    self.history = history[:-1]
    return ids, min(self.max_new, room), dropped

  def reply(self, user: str, write=None) -> str:
    """Streams the reply to `user` through write(text) and returns it."""
    ids, new, dropped = self._prompt(user)
    if dropped and write:
      write('(earlier turns dropped to fit the context)\n')
    stream = TextStream(self.tokenizer)
    for tid in stream_ids(self.mc, self.params, ids, new, seed=self.seed + self.turn,
                          stop_id=self.end, **self.sampling):
      if tid == self.end:
        break
      piece = stream.push(tid)
      if piece and write:
        write(piece)
    rest = stream.flush()
    if rest and write:
      write(rest)
    text = stream.shown
    self.history += [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': text}]
    self.turn += 1
    return text


def load_chat_model(workdir: str):
  """(mc, params, tokenizer) of a run that answers in the chat template, else one sentence."""
  cfg = runs.config_or_empty(workdir)
  if not cfg:
    raise UserError(f'{workdir} is not a run folder (it has no config.json); point --workdir at '
                    'a run that run.py finetune, dpo or ppo wrote.')
  if runs.kind(cfg) == 'reward':
    raise UserError(f'{workdir} is a reward model, which scores replies but does not write them; '
                    f"chat with its SFT run {runs.base_workdir(cfg)} instead.")
  if not runs.chats(cfg):
    raise UserError(f'{workdir} is a pretrained run, which never learned the chat template; '
                    'fine-tune it first (run.py finetune) or continue text with run.py sample.')
  return runs.load_model(workdir)[:3]


def _valid_text(text: str, what: str, write) -> str:
  """Typed or pasted text (stdin, a command-line flag) with bytes that are not UTF-8 replaced by
  U+FFFD (corpus.clean_text), and a note through write() saying how many."""
  text, bad = corpus.clean_text(text)
  if bad:
    write(f'(note: {bad} invalid UTF-8 byte sequence{"s" * (bad != 1)} in {what} replaced with '
          'U+FFFD)\n')
  return text


def _stdin_escapes_bad_bytes() -> None:
  """Lets input() hand over bytes that are not UTF-8 as escapes (for _valid_text to replace and
  count) instead of raising UnicodeDecodeError; a stdin that cannot be reconfigured is kept."""
  try:
    sys.stdin.reconfigure(errors='surrogateescape')
  except (AttributeError, ValueError, OSError):   # replaced streams, detached buffers
    pass


def chat_cli(workdir: str, prompt: str = '', max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, system: str = '',
             read=input, write=None) -> list[str]:
  """The subcommand: one streamed answer to --prompt, or an interactive loop."""
  out = sys.stdout
  write = write or (lambda s: (out.write(s), out.flush()))
  sample_lib.check_sampling(temperature, top_k, top_p, 1, max_new_tokens)
  mc, params, tokenizer = load_chat_model(workdir)
  system = _valid_text(system, '--system', write)
  chat = Chat(mc, params, tokenizer, system, max_new_tokens, temperature, top_k, top_p, seed)
  if prompt:
    text = chat.reply(_valid_text(prompt, '--prompt', write), write)
    write('\n')
    return [text]
  if read is input:
    _stdin_escapes_bad_bytes()
  write(f'chatting with {workdir} (model.max_len {mc.max_len} tokens); /reset starts over, '
        '/quit leaves\n')
  replies = []
  while True:
    try:
      line = read('you> ')
    except EOFError:
      write('\n')
      break
    line = _valid_text(line, 'your message', write).strip()
    if line in ('/quit', '/exit'):
      break
    if line == '/reset':
      chat.reset()
      write('(a new conversation)\n')
      continue
    if not line:
      continue
    write('assistant> ')
    try:
      replies.append(chat.reply(line, write))
    except UserError as e:
      write(f'({e})')
    write('\n')
  return replies


def sample_cli(workdir: str, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, seed: int = 0, num_samples: int = 1,
               raw: bool = False, system: str = '') -> list[str]:
  """`python run.py sample`: prints prompt + continuation for each sample; returns the texts.

  A fine-tuned run gets the prompt as a user turn of the chat template (and `system` as its
  system message) and prints its reply; raw=True continues the text as pretraining would.
  """
  sample_lib.check_sampling(temperature, top_k, top_p, num_samples, max_new_tokens)
  cfg = runs.read_config(workdir, f'{workdir} has no config.json, so it is not a training run; '
                         'train first with python run.py train --config=configs/tiny.py '
                         f'--workdir={workdir}.')
  write = lambda s: print(s, end='', flush=True)
  prompt = _valid_text(prompt, '--prompt', write)
  system = _valid_text(system, '--system', write)
  if runs.kind(cfg) == 'reward':
    return _sample_with_rewards(workdir, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                                num_samples, system)
  mc, params, tokenizer, _ = runs.load_model(workdir)
  if runs.chats(cfg) and not raw:
    messages = ([{'role': 'system', 'content': system}] if system else []) + [
        {'role': 'user', 'content': prompt}]
    n = len(sft.encode_chat(tokenizer, messages, generation_prompt=True)[0])
    max_new_tokens = _capped(mc, n, max_new_tokens, num_samples)
    sample_lib.check_lengths(mc, n, max_new_tokens)
    texts = sample_lib.chat(mc, params, tokenizer, messages, max_new_tokens, temperature, top_k,
                            top_p, seed, num_samples)
    for i, text in enumerate(texts):
      if num_samples > 1:
        print(f'--- sample {i + 1}/{num_samples} ---')
      print(f'user: {prompt}\nassistant: {text}', flush=True)
    return texts
  n = 1 + len(tokenizer.encode(prompt))
  max_new_tokens = _capped(mc, n, max_new_tokens, num_samples)
  sample_lib.check_lengths(mc, n, max_new_tokens)
  if n + max_new_tokens - 1 > mc.max_len:
    print(f'note: generating past model.max_len={mc.max_len} positions, which the model never '
          'saw in training; quality may drop.', flush=True)
  texts = sample_lib.generate(mc, params, tokenizer, [prompt], max_new_tokens, temperature,
                              top_k, top_p, seed, num_samples)
  for i, text in enumerate(texts):
    if num_samples > 1:
      print(f'--- sample {i + 1}/{num_samples} ---')
    print(prompt + text, flush=True)
  return texts


def _capped(mc, prompt_len: int, max_new_tokens: int, rows: int) -> int:
  """max_new_tokens within what the model (and the device's memory) allows, with a note when it
  is lowered (sample.cap_new_tokens), as the chat keeps a reply within the context."""
  max_new_tokens, note = sample_lib.cap_new_tokens(mc, prompt_len, max_new_tokens, rows)
  if note:
    print(note, flush=True)
  return max_new_tokens


def _sample_with_rewards(workdir, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                         num_samples, system) -> list[str]:
  """A reward-model run: its SFT policy's replies, each with the reward model's normalised score."""
  rm = reward_lib.load(workdir)
  policy = common.load_policy(runs.base_workdir(runs.read_config(workdir)))
  messages = ([{'role': 'system', 'content': system}] if system else []) + [
      {'role': 'user', 'content': prompt}]
  prompt_ids = sft.encode_chat(policy.tokenizer, messages, generation_prompt=True)[0]
  max_new_tokens = _capped(policy.mc, len(prompt_ids), max_new_tokens, num_samples)
  sample_lib.check_lengths(policy.mc, len(prompt_ids), max_new_tokens)
  texts = sample_lib.chat(policy.mc, policy.params, policy.tokenizer, messages, max_new_tokens,
                          temperature, top_k, top_p, seed, num_samples)
  resp = [common.response_ids(policy.tokenizer, t) for t in texts]
  rows = common.make_rows([prompt_ids] * len(texts), resp,
                          len(prompt_ids) + max(len(r) for r in resp), policy.tokenizer.pad_id)
  scores = rm.scores(rows, len(texts))
  for i, (text, s) in enumerate(zip(texts, scores)):
    if num_samples > 1:
      print(f'--- sample {i + 1}/{num_samples} ---')
    print(f'user: {prompt}\nassistant: {text}\nreward: {s:+.3f}', flush=True)
  return texts
