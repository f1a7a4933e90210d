"""The byte-level BPE the project trains (lm/data/tokenizer.py: train_bpe): exact round trips,
determinism, the vocabulary-size refusals, save and load, export to Hugging Face without
conversion, and load_tokenizer on a plain Hugging Face tokenizer folder."""
import glob
import json
import os

import pytest

from lm.data import tokenizer as tokenizer_lib
from lm.errors import UserError

STDLIB = os.path.dirname(json.__file__)
# Strings a round trip must keep: whitespace runs, line ends, emoji (with joiners and modifiers),
# combining marks, right-to-left text, noncharacters, private use, the last code point, NUL,
# SentencePiece's space mark and the special tokens' text.
HARD = ['', ' ', '\n', '\n\n\n', '\t\tx = 1\n', 'a   b  ', 'CRLF\r\nline\r', '\x00\x01\x7f',
        'héllo wörld ✓ 日本語', '👩‍👩‍👧 👍🏽 🇺🇳 🙂', 'e\u0301\u0308 \u200b\u200d\ufeff',
        'שלום عربى', '\ufffe\uffff\ufdd0 \ue000 \U0010ffff \U0001fffe', '\ufffd',
        '\u2581x \u2581', '<|bos|> <|eos|><|pad|> <|user|>x<|end|>', '<|', '    return x\n']


def _texts():
  """Tiny training text: the json package's source and a few unicode lines."""
  out = [open(f, encoding='utf-8').read() for f in sorted(glob.glob(os.path.join(STDLIB, '*.py')))]
  return out + ['héllo wörld ✓ 日本語 🙂\n' * 3, 'naïve café\tdéjà vu\n']


@pytest.fixture(scope='module')
def bpe():
  return tokenizer_lib.train_bpe(_texts(), vocab_size=500, chat=False)


@pytest.fixture(scope='module')
def bpe_chat():
  return tokenizer_lib.train_bpe(_texts(), vocab_size=520, chat=True)


def _samples():
  """HARD, then lines of the training text."""
  lines = '\n'.join(_texts()).split('\n')
  return HARD + ['\n'.join(lines[i:i + 3]) for i in range(0, len(lines), 97)]


def test_train_and_round_trip(bpe):
  assert bpe.vocab_size == 500 and bpe.settings()['trained'] == 'bpe'
  assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 1, 2) and bpe.chat_ids is None
  samples = _samples()
  for s, many in zip(samples, bpe.encode_many(samples)):
    ids = bpe.encode(s)
    assert bpe.decode(ids) == s, repr(s)
    assert list(many) == ids
    assert all(i > 2 for i in ids), repr(s)    # text never encodes to a special id
  assert bpe.encode('') == []
  text = '\n'.join(_texts())
  assert len(bpe.encode(text)) < len(text.encode('utf-8')) / 2    # it learned merges


def test_deterministic(bpe):
  again = tokenizer_lib.train_bpe(_texts(), vocab_size=500, chat=False)
  assert again.json_text == bpe.json_text and again.hash == bpe.hash
  backwards = tokenizer_lib.train_bpe(_texts()[::-1], vocab_size=500, chat=False)
  assert backwards.json_text == bpe.json_text


def test_vocab_size_refusals():
  for chat, minimum in ((False, 259), (True, 263)):
    with pytest.raises(UserError, match=f'data.vocab_size={minimum - 1} .*at least {minimum}'):
      tokenizer_lib.train_bpe(['some text'], vocab_size=minimum - 1, chat=chat)
    tok = tokenizer_lib.train_bpe(['some text'], vocab_size=minimum, chat=chat)    # bytes only
    assert tok.vocab_size == minimum and tok.decode(tok.encode('ok ✓')) == 'ok ✓'
  with pytest.raises(UserError, match='data.vocab_size=600 is more than BPE can learn'):
    tokenizer_lib.train_bpe(['some text'], vocab_size=600, chat=False)
  with pytest.raises(UserError, match='no text'):
    tokenizer_lib.train_bpe(iter([]), vocab_size=300, chat=False)


def test_chat_tokens_are_single_special_ids(bpe_chat):
  tok = bpe_chat
  assert tok.vocab_size == 520 and (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
  assert tok.chat_ids == dict(zip(tokenizer_lib.CHAT_ROLES, range(3, 7)))
  for role, name in zip(tokenizer_lib.CHAT_ROLES, tokenizer_lib.CHAT_TOKENS):
    assert tok._tok.token_to_id(name) == tok.chat_ids[role]
    assert tok.chat_ids[role] not in tok.encode(name) and tok.decode(tok.encode(name)) == name
  ids = [tok.chat_ids['user']] + tok.encode('hi') + [tok.chat_ids['end'], tok.eos_id]
  assert tok.decode(ids) == 'hi'


def test_save_and_load(bpe_chat, tmp_path):
  bpe_chat.save(str(tmp_path))
  with open(tmp_path / 'tokenizer.json') as f:
    assert json.load(f)['trained'] == 'bpe'
  back = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert isinstance(back, tokenizer_lib.HFTokenizer) and back.trained == 'bpe'
  assert back.hash == bpe_chat.hash and back.json_text == bpe_chat.json_text
  assert back.chat_ids == bpe_chat.chat_ids
  for s in _samples():
    assert back.encode(s) == bpe_chat.encode(s), repr(s)


def test_export_hf_writes_the_trained_file(bpe_chat, tmp_path):
  from tokenizers import Tokenizer
  assert tokenizer_lib.export_hf(bpe_chat, str(tmp_path)) == ['tokenizer.json',
                                                              'tokenizer_config.json']
  assert (tmp_path / 'tokenizer.json').read_text(encoding='utf-8') == bpe_chat.json_text
  theirs = Tokenizer.from_file(str(tmp_path / 'tokenizer.json'))
  for s in _samples():
    if '<|' not in s:
      assert theirs.encode(s, add_special_tokens=False).ids == bpe_chat.encode(s), repr(s)
  # The documented difference: the library matches a special token's text to its id.
  assert theirs.encode('<|user|>', add_special_tokens=False).ids == [bpe_chat.chat_ids['user']]


@pytest.mark.parametrize('which', ['bpe', 'bytes'])
def test_load_a_hugging_face_folder(bpe_chat, tmp_path, which):
  ours = bpe_chat if which == 'bpe' else tokenizer_lib.ByteTokenizer()
  tokenizer_lib.export_hf(ours, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['tokenizer.json', 'tokenizer_config.json']
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert isinstance(tok, tokenizer_lib.HFTokenizer) and tok.trained is None
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ours.bos_id, ours.eos_id, ours.pad_id)
  assert tok.vocab_size == ours.vocab_size and tok.chat_ids == ours.chat_ids
  for s in _samples():
    if '<|' not in s:
      assert tok.encode(s) == ours.encode(s), repr(s)
      assert tok.decode(tok.encode(s)) == s


def test_load_a_hugging_face_folder_with_config_json(bpe, tmp_path):
  (tmp_path / 'tokenizer.json').write_text(bpe.json_text, encoding='utf-8')
  with pytest.raises(UserError, match='names no end-of-text token'):
    tokenizer_lib.load_tokenizer(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps({'eos_token_id': 1, 'bos_token_id': 0}))
  tok = tokenizer_lib.load_tokenizer(str(tmp_path))
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
  assert tok.encode('def f(x):\n  return x') == bpe.encode('def f(x):\n  return x')
  # A project folder's meta file without a type is still refused as before.
  (tmp_path / 'tokenizer.json').write_text(json.dumps({'vocab_size': 3}))
  with pytest.raises(UserError, match='unknown tokenizer type None'):
    tokenizer_lib.load_tokenizer(str(tmp_path))


def test_transformers_loads_the_exported_folder(bpe_chat, tmp_path):
  transformers = pytest.importorskip('transformers')
  tokenizer_lib.export_hf(bpe_chat, str(tmp_path))
  theirs = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  assert theirs.eos_token_id == bpe_chat.eos_id and theirs.pad_token_id == bpe_chat.pad_id
  for s in _samples():
    if '<|' not in s:
      ids = theirs.encode(s, add_special_tokens=False)
      assert ids == bpe_chat.encode(s), repr(s)
      assert theirs.decode(ids) == s, repr(s)
