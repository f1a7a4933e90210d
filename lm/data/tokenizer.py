"""Tokenizers: text <-> token ids.

Every tokenizer has `encode(text) -> list[int]` (no BOS/EOS added), `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id`, `pad_id`, `name`, `settings()` (a JSON-able dict), `hash`
(sha256 of the settings and any model file) and `save(dir)`; `load_tokenizer(dir)` reads one back.
`decode` drops the special ids. `decode(encode(s)) == s` for every str s; invalid UTF-8 can only
come from ids a model produced, and `decode` replaces it with U+FFFD.

  * `bytes`: UTF-8 bytes are ids 0..255, then BOS=256, EOS=257, PAD=258, then the chat tokens
    259..262 (vocab 263). `ByteTokenizer(chat=False)` is the 259-id vocabulary without them (runs
    made before chat tokens existed load as that).
  * `sentencepiece`: BPE or unigram trained on training text with byte fallback, so every string
    is representable. Ids 0..3 are <unk> (never produced), BOS, EOS, PAD; then the 256 byte pieces,
    then newline and tab (own pieces so code's line structure is cheap), then learned pieces.
    Normalisation is off and whitespace is kept verbatim, so round trips are exact.
  * `hf`: a Hugging Face `tokenizer.json` (from an imported checkpoint, lm/interop/hf.py, or any
    Hugging Face tokenizer folder given to `load_tokenizer`), run by the `tokenizers` library, so
    text encodes to the ids `transformers` gives it (`encode(text, add_special_tokens=False)`). Its
    special ids come from the checkpoint.
  * `hf` trained here (`train_bpe`, settings 'trained': 'bpe'): a byte-level BPE in the GPT-2
    scheme. Ids 0..2 are <|bos|>, <|eos|>, <|pad|>, then (with chat) the four chat tokens, then the
    256 byte symbols, then the merges in the order they were learned. Every string is
    representable, and text never encodes to a special id (below), so round trips are exact.
  * `symbols`: the identity tokenizer of the synthetic corpus: symbols 0..n-1 are their own ids,
    then BOS=n, EOS=n+1, PAD=n+2. Its text form is the ids in decimal separated by spaces.

Chat tokens. `CHAT_TOKENS` (<|system|>, <|user|>, <|assistant|>, <|end|>) are special ids that the
byte, SentencePiece and trained BPE vocabularies reserve, so a model pretrained with any of them
already has embedding rows for them and fine-tuning needs no vocabulary change. Text never encodes
to them (writing "<|user|>" in a prompt gives its characters); only the chat template
(lm/data/sft.py) inserts them, by id, from `tokenizer.chat_ids` ({'system', 'user', 'assistant',
'end'} -> id, or None for a vocabulary without them). `decode` drops them like the other special
ids. An imported `hf` tokenizer is the exception: like `transformers`, it matches the text of its
special tokens.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re

import numpy as np

from lm import metrics as metrics_lib
from lm.errors import UserError

TOKENIZER_JSON = 'tokenizer.json'
SP_MODEL_FILE = 'tokenizer.model'
HF_TOKENIZER_FILE = 'hf_tokenizer.json'
# SentencePiece ids 0..3 and the pieces every model has besides the learned ones.
_SP_SPECIALS = 4
CHAT_ROLES = ('system', 'user', 'assistant', 'end')
CHAT_TOKENS = tuple(f'<|{r}|>' for r in CHAT_ROLES)
_SP_USER_SYMBOLS = ['\n', '\t']
SP_MIN_VOCAB = _SP_SPECIALS + len(CHAT_TOKENS) + 256 + len(_SP_USER_SYMBOLS)
# SentencePiece escapes spaces as U+2581; a literal one in the text must bypass that escaping.
_SPACE_MARK = '\u2581'


class Tokenizer:
  """The common interface; subclasses set name, vocab_size, bos_id, eos_id and pad_id."""
  name: str
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  chat_ids: dict | None = None

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    """Encodes several texts (subclasses batch this where the library can)."""
    return [np.asarray(self.encode(t), np.int64) for t in texts]

  def settings(self) -> dict:
    raise NotImplementedError

  def _hash_extra(self) -> bytes:
    return b''

  @property
  def hash(self) -> str:
    h = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode('utf-8'))
    h.update(self._hash_extra())
    return h.hexdigest()

  def save(self, directory: str) -> None:
    """Writes tokenizer.json (and any model file) into directory."""
    os.makedirs(directory, exist_ok=True)
    meta = dict(self.settings(), hash=self.hash)
    _write_file(os.path.join(directory, TOKENIZER_JSON),
                (json.dumps(meta, indent=2, sort_keys=True) + '\n').encode('utf-8'))

  def _check_ids(self, ids) -> list[int]:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f'token id {i} is outside the {self.name} vocabulary of {self.vocab_size}')
    return ids


def _write_file(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes 0..255, then BOS, EOS, PAD, then (unless chat=False) the four chat tokens."""
  name = 'bytes'
  bos_id, eos_id, pad_id = 256, 257, 258

  def __init__(self, chat: bool = True):
    self.chat = chat
    self.vocab_size = 259 + (len(CHAT_TOKENS) if chat else 0)
    self.chat_ids = dict(zip(CHAT_ROLES, range(259, 263))) if chat else None

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode('utf-8'), np.uint8) for t in texts]

  def decode(self, ids) -> str:
    data = bytes(i for i in self._check_ids(ids) if i < 256)
    return data.decode('utf-8', errors='replace')

  def settings(self) -> dict:
    # A vocabulary without chat tokens keeps the settings (and hash) it had before they existed.
    return {'type': 'bytes', 'vocab_size': self.vocab_size}


class SymbolTokenizer(Tokenizer):
  """Identity over `n_symbols` synthetic symbols, then BOS, EOS, PAD; text is decimal ids."""
  name = 'symbols'

  def __init__(self, n_symbols: int):
    self.n_symbols = n_symbols
    self.vocab_size = n_symbols + 3
    self.bos_id, self.eos_id, self.pad_id = n_symbols, n_symbols + 1, n_symbols + 2

  def encode(self, text: str) -> list[int]:
    try:
      ids = [int(w) for w in text.split()]
    except ValueError:
      raise ValueError('symbol text must be decimal ids separated by spaces') from None
    if any(not 0 <= i < self.n_symbols for i in ids):
      raise ValueError(f'symbol ids must lie in [0, {self.n_symbols})')
    return ids

  def decode(self, ids) -> str:
    return ' '.join(str(i) for i in self._check_ids(ids) if i < self.n_symbols)

  def settings(self) -> dict:
    return {'type': 'symbols', 'n_symbols': self.n_symbols, 'vocab_size': self.vocab_size}


class SentencePieceTokenizer(Tokenizer):
  """A trained SentencePiece model (serialized proto bytes) with exact round trips."""
  name = 'sentencepiece'

  def __init__(self, model_proto: bytes, model_type: str):
    import sentencepiece as spm
    self.model_proto = bytes(model_proto)
    self.model_type = model_type
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id, self.pad_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()
    # Bytes each id stands for; decoding joins these, so it never re-interprets U+2581 as a space.
    table = []
    for i in range(self.vocab_size):
      piece = self._sp.id_to_piece(i)
      if self._sp.is_byte(i):
        table.append(bytes([int(piece[3:5], 16)]))
      elif self._sp.is_control(i) or self._sp.is_unknown(i):
        table.append(b'')
      else:
        table.append(piece.replace(_SPACE_MARK, ' ').encode('utf-8'))
    self._bytes = table
    self._mark_ids = [self._sp.piece_to_id(f'<0x{b:02X}>') for b in _SPACE_MARK.encode('utf-8')]
    ids = [self._sp.piece_to_id(t) for t in CHAT_TOKENS]
    known = all(self._sp.is_control(i) and i != self._sp.unk_id() for i in ids)
    self.chat_ids = dict(zip(CHAT_ROLES, ids)) if known else None

  def encode(self, text: str) -> list[int]:
    if _SPACE_MARK not in text:
      return self._sp.encode(text)
    parts = text.split(_SPACE_MARK)
    ids = list(self._sp.encode(parts[0]))
    for part in parts[1:]:
      ids += self._mark_ids
      ids += self._sp.encode(part)
    return ids

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    plain = [i for i, t in enumerate(texts) if _SPACE_MARK not in t]
    out: list = [None] * len(texts)
    if plain:
      # A tokenizing worker process (lm/data/build.py) sets LM_TOKENIZER_THREADS=1: its siblings
      # already use the other cores.
      threads = int(os.environ.get('LM_TOKENIZER_THREADS') or os.cpu_count() or 1)
      encoded = self._sp.encode([texts[i] for i in plain], num_threads=threads)
      for i, ids in zip(plain, encoded):
        out[i] = np.asarray(ids, np.int64)
    for i, t in enumerate(texts):
      if out[i] is None:
        out[i] = np.asarray(self.encode(t), np.int64)
    return out

  def decode(self, ids) -> str:
    table = self._bytes
    return b''.join(table[i] for i in self._check_ids(ids)).decode('utf-8', errors='replace')

  def settings(self) -> dict:
    return {'type': 'sentencepiece', 'model_type': self.model_type, 'vocab_size': self.vocab_size}

  def _hash_extra(self) -> bytes:
    return self.model_proto

  def save(self, directory: str) -> None:
    super().save(directory)
    _write_file(os.path.join(directory, SP_MODEL_FILE), self.model_proto)


def train_sentencepiece(texts: list[str], *, vocab_size: int, model_type: str,
                        max_train_bytes: int, seed: int = 0,
                        chat: bool = True) -> SentencePieceTokenizer:
  """Trains on the lines of texts; above max_train_bytes a seeded random subset of lines is used."""
  import sentencepiece as spm
  if vocab_size < SP_MIN_VOCAB:
    raise UserError(f'data.vocab_size={vocab_size} is too small for sentencepiece with byte '
                    f'fallback (it needs at least {SP_MIN_VOCAB} plus the characters of the text); '
                    'raise --config.data.vocab_size')
  # Training sentences are lines: newlines are their own piece, so pieces never span lines.
  lines = [ln for t in texts for ln in t.split('\n') if ln]
  if not lines:
    raise UserError('the training split has no text to train sentencepiece on; add text to the '
                    'corpus')
  sizes = np.fromiter((len(ln.encode('utf-8')) for ln in lines), np.int64, len(lines))
  if max_train_bytes and sizes.sum() > max_train_bytes:
    order = np.random.default_rng(seed).permutation(len(lines))
    keep = np.sort(order[np.cumsum(sizes[order]) <= max_train_bytes])
    lines = [lines[i] for i in keep]
  longest = int(sizes.max())
  proto = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto,
        vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, character_coverage=0.9995,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=False,
        user_defined_symbols=_SP_USER_SYMBOLS, control_symbols=list(CHAT_TOKENS) if chat else [],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        max_sentence_length=max(4192, min(longest, 1 << 20)),
        input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    raise UserError(_vocab_error(vocab_size, str(e))) from None
  tok = SentencePieceTokenizer(proto.getvalue(), model_type)
  if tok.vocab_size != vocab_size:
    raise UserError(f'sentencepiece built {tok.vocab_size} pieces, not '
                    f'data.vocab_size={vocab_size}; choose another --config.data.vocab_size')
  return tok


def _vocab_error(vocab_size: int, message: str) -> str:
  """One sentence from SentencePiece's training error (it states the reachable bound)."""
  low = re.search(r'smaller than required_chars\. \d+ vs (\d+)', message)
  if low:
    return (f'data.vocab_size={vocab_size} is too small for this text: sentencepiece needs at '
            f'least {low.group(1)} for its byte, special and character pieces; raise '
            '--config.data.vocab_size')
  high = re.search(r'Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)', message)
  if high:
    return (f'data.vocab_size={vocab_size} is more than sentencepiece can learn from this text '
            f'(at most {high.group(1)}); lower --config.data.vocab_size or use more text')
  return (f'sentencepiece cannot build a vocabulary of data.vocab_size={vocab_size} from this text '
          f'({message.strip()}); choose another --config.data.vocab_size')


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` tokenizer (its tokenizer.json text) with the model's special ids.

  `trained` names how the project trained it ('bpe': `train_bpe`), None for an imported one. A
  trained one encodes the text of its special tokens as ordinary text (so `decode(encode(s)) == s`
  for every s); an imported one matches it to the special ids, as `transformers` does.
  """
  name = 'hf'

  def __init__(self, json_text: str, bos_id: int, eos_id: int, pad_id: int,
               trained: str | None = None):
    from tokenizers import Tokenizer as _Tok
    self.json_text = json_text
    self.trained = trained
    self._tok = _Tok.from_str(json_text)
    # A runtime switch of the library, not part of tokenizer.json: json_text stays as trained.
    self._tok.encode_special_tokens = trained is not None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.pad_id = int(bos_id), int(eos_id), int(pad_id)
    ids = [self._tok.token_to_id(t) for t in CHAT_TOKENS]
    self.chat_ids = dict(zip(CHAT_ROLES, ids)) if None not in ids else None

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    # encode_batch_fast (tokenizers >= 0.21) skips the offsets: 2.6x the throughput on one core.
    encode = getattr(self._tok, 'encode_batch_fast', self._tok.encode_batch)
    return [np.asarray(e.ids, np.int64) for e in encode(texts, add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

  def with_chat_tokens(self) -> 'HFTokenizer':
    """This tokenizer with the four chat tokens added as special tokens (new ids at the end)."""
    from tokenizers import AddedToken, Tokenizer as _Tok
    t = _Tok.from_str(self.json_text)
    t.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in CHAT_TOKENS])
    return HFTokenizer(t.to_str(), self.bos_id, self.eos_id, self.pad_id, self.trained)

  def settings(self) -> dict:
    out = {'type': 'hf', 'vocab_size': self.vocab_size, 'bos_id': self.bos_id,
           'eos_id': self.eos_id, 'pad_id': self.pad_id}
    if self.trained is not None:    # an imported tokenizer keeps the settings (and hash) it had
      out['trained'] = self.trained
    return out

  def _hash_extra(self) -> bytes:
    return self.json_text.encode('utf-8')

  def save(self, directory: str) -> None:
    super().save(directory)
    _write_file(os.path.join(directory, HF_TOKENIZER_FILE), self.json_text.encode('utf-8'))


def _byte_chars() -> list[str]:
  """The printable character GPT-2's byte-level scheme gives each byte 0..255: printable Latin-1
  bytes stand for themselves, the others take the code points 256, 257, ... in byte order."""
  keep = set(range(ord('!'), ord('~') + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
  chars, extra = [], 0
  for b in range(256):
    if b in keep:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


BYTE_SPECIALS = ('<|bos|>', '<|eos|>', '<|pad|>')


def _byte_tokenizer_json(tok: 'ByteTokenizer') -> str:
  """The byte vocabulary as a `tokenizers` byte-level model with no merges: byte b is id b."""
  from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers
  vocab = {c: b for b, c in enumerate(_byte_chars())}
  t = _Tok(models.BPE(vocab=vocab, merges=[]))
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  t.decoder = decoders.ByteLevel()
  names = list(BYTE_SPECIALS) + (list(CHAT_TOKENS) if tok.chat_ids else [])
  t.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
  assert t.get_vocab_size(with_added_tokens=True) == tok.vocab_size
  return t.to_str()


def train_bpe(texts, *, vocab_size: int, chat: bool) -> HFTokenizer:
  """A byte-level BPE (GPT-2's scheme) trained by the `tokenizers` library on texts, an iterable
  of str (documents: each is split into words by GPT-2's pattern, so merges never cross a word).

  vocab_size counts every id: BYTE_SPECIALS (ids 0..2), the chat tokens when chat (3..6), the 256
  bytes, then the merges. The result's json_text is the trained tokenizer.json, which `export_hf`
  writes as it is. Training is deterministic: the trainer counts every pair before it merges and
  breaks ties between equally frequent pairs by their ids, so neither its thread count nor the
  order of the texts changes the result (tests/test_bpe.py trains twice and compares). Exported,
  it encodes to the same ids in `tokenizers` and `transformers`, except text that holds a special
  token's text, which they match to its id.
  """
  from tokenizers import AddedToken, Tokenizer as _Tok, decoders, models, pre_tokenizers, trainers
  specials = list(BYTE_SPECIALS) + (list(CHAT_TOKENS) if chat else [])
  minimum = 256 + len(specials)
  if vocab_size < minimum:
    raise UserError(f'data.vocab_size={vocab_size} is too small for a byte-level BPE (it needs at '
                    f'least {minimum}: 256 bytes and {len(specials)} special tokens); raise '
                    '--config.data.vocab_size')
  t = _Tok(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, show_progress=False,
      special_tokens=[AddedToken(n, special=True, normalized=False) for n in specials],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  chars = 0

  def counted():
    nonlocal chars
    for text in texts:
      chars += len(text)
      yield text

  t.train_from_iterator(counted(), trainer)
  if not chars:
    raise UserError('there is no text to train the BPE tokenizer on; add text to the corpus')
  learned = t.get_vocab_size(with_added_tokens=True)
  if learned != vocab_size:
    raise UserError(f'data.vocab_size={vocab_size} is more than BPE can learn from this text (at '
                    f'most {learned}); lower --config.data.vocab_size or use more text')
  ids = [t.token_to_id(n) for n in specials]
  assert ids == list(range(len(specials))), ids
  return HFTokenizer(t.to_str(), ids[0], ids[1], ids[2], trained='bpe')


def _sp_tokenizer_json(tok: 'SentencePieceTokenizer') -> str:
  """The SentencePiece model as a `tokenizers` pipeline that encodes text to the same ids.

  Spaces become U+2581 and the text splits into words before each run of them (as SentencePiece
  splits by whitespace); newline and tab are pieces of their own; a BPE model merges in the
  order of its pieces' scores, a unigram model keeps its scores; both fall back to the byte
  pieces. The control pieces (<unk>, BOS, EOS, PAD, the chat tokens) are special tokens.
  Known difference: a literal U+2581 in the text reads as a space here.
  """
  from tokenizers import AddedToken, Regex, Tokenizer as _Tok, decoders, models, normalizers
  from tokenizers import pre_tokenizers
  sp = tok._sp
  pieces = [sp.id_to_piece(i) for i in range(tok.vocab_size)]
  scores = [sp.get_score(i) for i in range(tok.vocab_size)]
  special = [i for i in range(tok.vocab_size) if sp.is_control(i) or sp.is_unknown(i)]
  user = [i for i, p in enumerate(pieces) if p in _SP_USER_SYMBOLS]
  if tok.model_type == 'unigram':
    vocab = [(p, scores[i] if i not in special else -1e9) for i, p in enumerate(pieces)]
    model = models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=True)
  else:
    vocab = {p: i for i, p in enumerate(pieces)}
    ranked = sorted((i for i in range(tok.vocab_size)
                     if i not in special and i not in user and not sp.is_byte(i)
                     and len(pieces[i]) > 1), key=lambda i: (-scores[i], i))
    merges = []
    for i in ranked:
      p = pieces[i]
      merges += [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
    model = models.BPE(vocab=vocab, merges=merges, unk_token=pieces[sp.unk_id()],
                       byte_fallback=True, fuse_unk=False)
  t = _Tok(model)
  t.normalizer = normalizers.Replace(' ', _SPACE_MARK)
  t.pre_tokenizer = pre_tokenizers.Split(Regex(f'{_SPACE_MARK}*[^{_SPACE_MARK}]+'), 'isolated')
  t.decoder = decoders.Sequence([decoders.Replace(_SPACE_MARK, ' '), decoders.ByteFallback(),
                                 decoders.Fuse()])
  t.add_tokens([AddedToken(pieces[i], special=False, normalized=False) for i in user])
  t.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
  return t.to_str()


def export_hf(tok: Tokenizer, out: str) -> list[str]:
  """Writes tokenizer.json and tokenizer_config.json that `transformers` loads
  (PreTrainedTokenizerFast); returns the file names ([] for a tokenizer with no such form)."""
  if isinstance(tok, ByteTokenizer):
    text = _byte_tokenizer_json(tok)
  elif isinstance(tok, HFTokenizer):
    text = tok.json_text
  elif isinstance(tok, SentencePieceTokenizer):
    text = _sp_tokenizer_json(tok)
  else:
    return []
  from tokenizers import Tokenizer as _Tok
  t = _Tok.from_str(text)
  names = {i: t.id_to_token(i) for i in (tok.bos_id, tok.eos_id, tok.pad_id)}
  _write_file(os.path.join(out, 'tokenizer.json'), text.encode('utf-8'))
  conf = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': names[tok.bos_id],
          'eos_token': names[tok.eos_id], 'pad_token': names[tok.pad_id],
          'add_bos_token': False, 'add_eos_token': False, 'clean_up_tokenization_spaces': False,
          'model_max_length': 1 << 30}
  _write_file(os.path.join(out, 'tokenizer_config.json'),
              (json.dumps(conf, indent=2) + '\n').encode('utf-8'))
  return ['tokenizer.json', 'tokenizer_config.json']


def import_hf(hf_dir: str, hf_config: dict) -> HFTokenizer:
  """The tokenizer of a Hugging Face model folder (its tokenizer.json), with the special ids
  named by tokenizer_config.json or, failing that, config.json."""
  path = os.path.join(hf_dir, 'tokenizer.json')
  if not os.path.isfile(path):
    raise UserError(f'{hf_dir} has no tokenizer.json; save the tokenizer there with transformers '
                    '(AutoTokenizer.from_pretrained(...).save_pretrained(folder)) and import again.')
  from tokenizers import Tokenizer as _Tok
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
    t = _Tok.from_str(text)
  except Exception as e:  # the library raises its own exception type for a malformed file
    raise UserError(f'cannot read {path} as a tokenizers file ({e}); the folder is damaged.') \
        from None
  conf = {}
  conf_path = os.path.join(hf_dir, 'tokenizer_config.json')
  if os.path.isfile(conf_path):
    conf = metrics_lib.read_json_object(conf_path, 'the folder is damaged, fetch or copy the '
                                        'model again')

  def special(name: str):
    tok = conf.get(name + '_token')
    if isinstance(tok, dict):
      tok = tok.get('content')
    if isinstance(tok, str) and t.token_to_id(tok) is not None:
      return t.token_to_id(tok)
    v = hf_config.get(name + '_token_id')
    return v[0] if isinstance(v, list) and v else v

  eos, bos, pad = special('eos'), special('bos'), special('pad')
  if eos is None:
    eos = bos
  if eos is None:
    raise UserError(f'{hf_dir} names no end-of-text token (eos_token in tokenizer_config.json or '
                    'eos_token_id in config.json); add one and import again.')
  bos = eos if bos is None else bos
  pad = eos if pad is None else pad
  return HFTokenizer(text, bos, eos, pad)


def load_tokenizer(directory: str) -> Tokenizer:
  """The tokenizer that `Tokenizer.save(directory)` wrote, or that of a Hugging Face tokenizer
  folder (a tokenizer.json of the `tokenizers` library, which has a "model" and no "type"; special
  ids as `import_hf` finds them, with the folder's config.json if it has one)."""
  path = os.path.join(directory, TOKENIZER_JSON)
  try:
    with open(path, encoding='utf-8') as f:
      meta = json.load(f)
  except FileNotFoundError:
    raise UserError(f'no {TOKENIZER_JSON} in {directory}; point at a folder a run or data '
                    'preparation wrote') from None
  except (OSError, ValueError) as e:    # ValueError: JSONDecodeError, UnicodeDecodeError
    raise UserError(f'cannot read {path} ({type(e).__name__}: {e}); prepare the data again') \
        from None
  if not isinstance(meta, dict):
    raise UserError(f'cannot read {path} (it holds no JSON object); prepare the data again')
  if 'type' not in meta and 'model' in meta:
    conf_path = os.path.join(directory, 'config.json')
    config = (metrics_lib.read_json_object(conf_path, 'the folder is damaged, fetch or copy the '
                                           'model again') if os.path.isfile(conf_path) else {})
    return import_hf(directory, config)
  kind = meta.get('type')
  if kind == 'bytes':
    tok: Tokenizer = ByteTokenizer(chat=int(meta.get('vocab_size', 263)) != 259)
  elif kind == 'symbols':
    tok = SymbolTokenizer(int(meta['n_symbols']))
  elif kind == 'hf':
    try:
      with open(os.path.join(directory, HF_TOKENIZER_FILE), encoding='utf-8') as f:
        text = f.read()
    except OSError as e:
      raise UserError(f'cannot read {HF_TOKENIZER_FILE} in {directory} ({e.strerror}); import the '
                      'model again') from None
    tok = HFTokenizer(text, meta['bos_id'], meta['eos_id'], meta['pad_id'], meta.get('trained'))
  elif kind == 'sentencepiece':
    try:
      with open(os.path.join(directory, SP_MODEL_FILE), 'rb') as f:
        proto = f.read()
    except OSError as e:
      raise UserError(f'cannot read {SP_MODEL_FILE} in {directory} ({e.strerror}); prepare the '
                      'data again') from None
    tok = SentencePieceTokenizer(proto, meta['model_type'])
  else:
    raise UserError(f'{path} names an unknown tokenizer type {kind!r}; prepare the data again')
  if meta.get('hash') not in (None, tok.hash):
    raise UserError(f'the tokenizer in {directory} does not match its {TOKENIZER_JSON} hash; '
                    'prepare the data again')
  return tok
