"""Where the documents of a text corpus come from: shard files and Hugging Face datasets, cut into
work units that are read in a stream.

A source is one of
  * `pystdlib`: the .py files of the running interpreter's standard library;
  * `text`: data.path, a file, a folder (searched recursively) or a glob, of .txt, .jsonl,
    .jsonl.gz, .jsonl.zst and .parquet files (a .txt file is one document; a JSON line or a parquet
    row is one document, its text in the column data.text_field);
  * `hf`: data.hf_dataset, read through the Hugging Face `datasets` library: a `save_to_disk`
    folder (`load_from_disk`), else `load_dataset(name, hf_config, split=hf_split)`: a local folder
    of parquet/json files, a dataset in the local hub cache, or one downloaded when the machine is
    online; with data.hf_streaming the dataset is streamed instead of prepared as Arrow files first.

Listing is cheap (file names, sizes, parquet footers); documents are read by `read_unit`, one work
unit at a time, in chunks of at most data.max_chunk_bytes of text, so the memory that reading takes
does not grow with the corpus. Units are formed from the listing alone (never from the number of
workers), in corpus order: files sorted by relative path, row groups and byte ranges in file order.
A .txt file larger than max_chunk_bytes is read as pieces that end at a newline (or, in a line that
long, at a character boundary); the pieces of one file form one document, the end-of-text token
follows the last.

Document ids: the relative path for a whole-file document; `stem:n` for the n-th record (from 1;
a JSON file's line number) of a record file, the stem being its path without the format suffix
(so data/a.jsonl.zst and data/a.parquet holding the same records give the same ids, hence the same
split); `shard<k>:<n>` for the n-th record of stream shard k.

A bad shard (unreadable file, corrupt compression, no such column) is refused with its path and the
reason. A record that cannot be read (a line that is not JSON, a missing or null text field) is
counted and the first few are kept with their reasons; the builder refuses a corpus in which more
than MAX_BAD_FRACTION of the records are bad (that is a wrong data.text_field, not noise).
"""
from __future__ import annotations

import dataclasses
import glob
import gzip
import io
import json
import os

from lm.data import corpus as corpus_lib
from lm.errors import UserError

SUFFIXES = ('.txt', '.jsonl', '.jsonl.gz', '.jsonl.zst', '.json.gz', '.json.zst', '.parquet')
# Compressed shards named .json.* (Dolma, FineWeb's raw dumps) hold JSON lines too.
_ALIASES = {'json.gz': 'jsonl.gz', 'json.zst': 'jsonl.zst'}
# Work units are about this big (file bytes): big enough to amortise a worker's start, small enough
# that resuming loses little and that several workers share a medium corpus.
UNIT_BYTES = 32 << 20
MAX_BAD_FRACTION = 0.01
# Examples of bad records kept for the message and info.json.
MAX_BAD_EXAMPLES = 5


def record_stem(relpath: str) -> str:
  """A record file's path without its format's suffix: the ids of its records, so the same
  documents get the same ids (and split) whether stored as JSON lines, compressed or parquet."""
  for suffix in SUFFIXES:
    if relpath.endswith(suffix):
      return relpath[:-len(suffix)]
  return relpath


def kind_of(name: str) -> str | None:
  """The reader a file name calls for, or None when it is not a corpus file."""
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return _ALIASES.get(suffix[1:], suffix[1:])
  return None


@dataclasses.dataclass(frozen=True)
class Piece:
  """Part of one shard that a unit reads: a byte range [start, stop) of a text file, row groups
  [start, stop) of a parquet file, or the whole file (start = stop = 0) for the other kinds.
  `split` forces the split of every document in the piece ('' = by document id)."""
  file: corpus_lib.SourceFile
  kind: str
  start: int = 0
  stop: int = 0
  last: bool = True    # text: the piece that ends its range (it ends exactly there; EOS follows)
  split: str = ''
  first: bool = True   # text: the piece that begins its range (it begins exactly there)
  limit: int = 0       # text: the end of the piece's range (newline searches stop there)


@dataclasses.dataclass(frozen=True)
class Unit:
  """One task of the builder: pieces read in order."""
  index: int
  pieces: tuple
  est_bytes: int       # an estimate of its text bytes (progress bar, sampling)
  stream: dict | None = None   # a Hugging Face streaming shard: {spec..., 'shard', 'shards'}


@dataclasses.dataclass(frozen=True)
class Listing:
  """A source's units and what its token files depend on (the key material)."""
  units: tuple
  key: dict
  describe: str


# ---------------------------------------------------------------------------------------------
# Listing.

def corpus_files(path: str) -> list[corpus_lib.SourceFile]:
  """The corpus files data.path names (a file, a folder searched recursively, or a glob)."""
  if not path:
    raise UserError('data.corpus=text needs a file, folder or glob; set --config.data.path=...')
  path = os.path.expanduser(path)
  if glob.has_magic(path):
    matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not matches:
      raise UserError(f'data.path glob {path!r} matches no files; fix --config.data.path')
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in matches])
    files = [corpus_lib.stat_file(p, os.path.relpath(os.path.abspath(p), root)) for p in matches]
    odd = [f.relpath for f in files if kind_of(f.relpath) is None]
    if odd:
      raise UserError(f'data.path glob {path!r} matches {odd[0]!r}, which is not one of '
                      f'{", ".join(SUFFIXES)}; narrow the glob')
  elif os.path.isdir(path):
    files = []
    for dirpath, dirnames, filenames in os.walk(path):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
      for f in filenames:
        if kind_of(f) and not f.startswith('.'):
          p = os.path.join(dirpath, f)
          files.append(corpus_lib.stat_file(p, os.path.relpath(p, path)))
    if not files:
      raise UserError(f'data.path folder {path!r} holds no {", ".join("*" + s for s in SUFFIXES)} '
                      'files; fix --config.data.path')
  elif os.path.isfile(path):
    if kind_of(path) is None:
      raise UserError(f'data.path {path!r} is not one of {", ".join(SUFFIXES)}; convert it or '
                      'name another file')
    files = [corpus_lib.stat_file(path, os.path.basename(path))]
  elif os.path.exists(path):
    raise UserError(f'data.path {path!r} is neither a file nor a folder; fix --config.data.path')
  else:
    raise UserError(f'data.path {path!r} does not exist; fix --config.data.path')
  files.sort(key=lambda s: s.relpath)
  return files


def _parquet_file(path: str):
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(path)
  except Exception as e:   # pyarrow raises ArrowInvalid, OSError, ... for a damaged file
    raise UserError(f'the parquet shard {path} cannot be read ({_reason(e)}); replace or remove '
                    'that file') from None


def _reason(e: BaseException) -> str:
  text = str(e).strip().split('\n')[0]
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


def _parquet_units(f, text_field: str) -> list[tuple[Piece, int]]:
  """(piece, text bytes) per row group of a parquet file; a missing column is refused."""
  pf = _parquet_file(f.path)
  names = pf.schema_arrow.names
  if text_field not in names:
    raise UserError(f'the parquet shard {f.path} has no column {text_field!r} (its columns: '
                    f'{", ".join(names[:12])}); set --config.data.text_field')
  col = names.index(text_field)
  out = []
  for g in range(pf.metadata.num_row_groups):
    rg = pf.metadata.row_group(g)
    size = rg.column(col).total_uncompressed_size if col < rg.num_columns else rg.total_byte_size
    out.append((Piece(f, 'parquet', g, g + 1), int(size)))
  return out


def _text_pieces(f, chunk: int, split: str = '', start: int = 0,
                 stop: int | None = None) -> list[Piece]:
  """The pieces of bytes [start, stop) of a text file: nominal ranges of `chunk` bytes, whose
  boundaries `read_unit` moves forward to the next newline."""
  stop = f.size if stop is None else stop
  cuts = list(range(start, stop, chunk)) or [start]
  return [Piece(f, 'txt', a, min(a + chunk, stop) if i + 1 < len(cuts) else stop,
                last=i + 1 == len(cuts), split=split, first=i == 0, limit=stop)
          for i, a in enumerate(cuts)]


def _group(items: list[tuple[Piece, int]]) -> list[Unit]:
  """Consecutive pieces packed into units of about UNIT_BYTES."""
  units, cur, size = [], [], 0
  for piece, n in items:
    if cur and size + n > UNIT_BYTES:
      units.append(Unit(len(units), tuple(cur), size))
      cur, size = [], 0
    cur.append(piece)
    size += n
  if cur:
    units.append(Unit(len(units), tuple(cur), size))
  return units


# A compressed JSON-lines file holds about this many times its size in text (an estimate for the
# progress bar and the tokenizer's sample, never for the data).
_COMPRESSION_GUESS = 4


def file_units(files, text_field: str, max_chunk_bytes: int,
               val_fraction: float | None) -> list[Unit]:
  """The units of a list of corpus files (pystdlib's .py files count as text files); with
  val_fraction None a single text file is read whole, not cut into its two splits."""
  items: list[tuple[Piece, int]] = []
  single = (val_fraction is not None and len(files) == 1
            and kind_of(files[0].relpath) in ('txt', None))
  for f in files:
    kind = kind_of(f.relpath) or 'txt'
    if kind == 'parquet':
      items += _parquet_units(f, text_field)
    elif kind == 'txt' and single:
      # A corpus of one document: its head trains, its last val_fraction of bytes validates.
      cut = f.size - max(1, int(round(f.size * val_fraction)))
      for split, a, b in (('train', 0, cut), ('val', cut, f.size)):
        items += [(p, p.stop - p.start) for p in
                  _text_pieces(f, max_chunk_bytes, split, a, b)]
    elif kind == 'txt':
      items += [(p, p.stop - p.start) for p in _text_pieces(f, max_chunk_bytes)]
    else:
      guess = _COMPRESSION_GUESS if kind != 'jsonl' else 1
      items.append((Piece(f, kind), f.size * guess))
  return _group(items)


def list_source(corpus: str, path: str, text_field: str, max_chunk_bytes: int,
                val_fraction: float, hf: dict | None = None) -> Listing:
  """The Listing of one source (cheap: names, sizes and parquet footers, no documents)."""
  if corpus == 'hf':
    return _hf_listing(hf, text_field)
  files = corpus_lib.stdlib_files() if corpus == 'pystdlib' else corpus_files(path)
  units = file_units(files, text_field, max_chunk_bytes, val_fraction)
  key: dict = {'files': [[f.relpath, f.size, f.mtime_ns] for f in files]}
  if any(kind_of(f.relpath) not in ('txt', None) for f in files):
    key['text_field'] = text_field
  if any(f.size > max_chunk_bytes and kind_of(f.relpath) in ('txt', None) for f in files):
    key['max_chunk_bytes'] = max_chunk_bytes   # where text pieces are cut
  where = 'the standard library' if corpus == 'pystdlib' else repr(path)
  return Listing(tuple(units), key, where)


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets.

def _require_datasets():
  try:
    import datasets
  except ImportError:
    raise UserError('data.hf_dataset needs the Hugging Face datasets library; install it with '
                    '`pip install datasets`') from None
  return datasets


def is_saved_dataset(path: str) -> bool:
  """True for a folder that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, n)) for n in ('state.json', 'dataset_dict.json'))


def open_hf(hf: dict):
  """The `datasets` Dataset (or IterableDataset, when streaming) that an hf spec names."""
  datasets = _require_datasets()
  name, split = hf['dataset'], hf['split'] or 'train'
  path = os.path.expanduser(name)
  try:
    if is_saved_dataset(path):
      ds = datasets.load_from_disk(path)
      if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
          raise UserError(f'the saved dataset {name} has no split {split!r} (it has '
                          f'{", ".join(ds)}); set --config.data.hf_split')
        ds = ds[split]
      return ds
    return datasets.load_dataset(path if os.path.exists(path) else name, hf['config'] or None,
                                 split=split, streaming=bool(hf['streaming']))
  except UserError:
    raise
  except Exception as e:   # the library raises many types (FileNotFoundError, ValueError, ...)
    raise UserError(f'the Hugging Face dataset {name!r} (config {hf["config"] or "default"!r}, '
                    f'split {split!r}) cannot be opened ({_reason(e)}); check data.hf_dataset, '
                    'data.hf_config and data.hf_split (offline, only saved folders, local files '
                    'and datasets already in the hub cache can be read)') from None


def _hf_listing(hf: dict, text_field: str) -> Listing:
  datasets = _require_datasets()
  ds = open_hf(hf)
  name = hf['dataset']
  columns = ds.column_names
  if columns is not None and text_field not in columns:
    raise UserError(f'the Hugging Face dataset {name!r} has no column {text_field!r} (its '
                    f'columns: {", ".join(columns[:12])}); set --config.data.text_field')
  spec = {k: hf[k] for k in ('dataset', 'config', 'split', 'streaming')}
  if isinstance(ds, datasets.IterableDataset):
    shards = max(1, int(getattr(ds, 'num_shards', 1) or 1))
    units = tuple(Unit(i, (), UNIT_BYTES, dict(spec, shard=i, shards=shards))
                  for i in range(shards))
    key = {'hf': spec, 'text_field': text_field, 'shards': shards}
    return Listing(units, key, f'the streamed dataset {name!r}')
  if getattr(ds, '_indices', None) is not None:
    raise UserError(f'the Hugging Face dataset {name!r} is a selection or shuffle of another '
                    '(it has an indices mapping); save it with ds.flatten_indices().save_to_disk(...) '
                    'and point data.hf_dataset at that folder')
  paths = [c['filename'] for c in ds.cache_files]
  if not paths:
    raise UserError(f'the Hugging Face dataset {name!r} is held in memory, not in Arrow files; '
                    'save it with save_to_disk and point data.hf_dataset at that folder')
  root = os.path.commonpath([os.path.dirname(p) for p in paths])
  files = [corpus_lib.stat_file(p, os.path.relpath(p, root)) for p in paths]
  units = _group([(Piece(f, 'arrow'), f.size) for f in files])
  key = {'hf': spec, 'text_field': text_field,
         'files': [[f.relpath, f.size, f.mtime_ns] for f in files]}
  return Listing(tuple(units), key, f'the dataset {name!r}')


# ---------------------------------------------------------------------------------------------
# Reading.

class Bad:
  """Records that could not be read: how many, and the first few with their reasons."""

  def __init__(self):
    self.count = 0
    self.examples: list[str] = []

  def add(self, where: str, why: str) -> None:
    self.count += 1
    if len(self.examples) < MAX_BAD_EXAMPLES:
      self.examples.append(f'{where} {why}')


@dataclasses.dataclass
class Doc:
  """A document, or a piece of one: its id, text, split ('' = by id) and whether EOS follows."""
  id: str
  text: str
  split: str = ''
  eos: bool = True
  file: str = ''       # the relative path of its shard


def read_unit(unit: Unit, text_field: str, max_chunk_bytes: int, bad: Bad, stats: dict):
  """Yields lists of Docs holding at most about max_chunk_bytes of text each (a single document
  larger than that comes alone). `stats` gains 'replaced_chars' and 'skipped_files'; bad records go to
  `bad`."""
  buf, size = [], 0
  for doc in _unit_docs(unit, text_field, max_chunk_bytes, bad, stats):
    n = len(doc.text)
    if buf and size + n > max_chunk_bytes:
      yield buf
      buf, size = [], 0
    buf.append(doc)
    size += n
  if buf:
    yield buf


def _unit_docs(unit, text_field, chunk, bad, stats):
  if unit.stream is not None:
    yield from _stream_docs(unit.stream, text_field, bad)
    return
  for piece in unit.pieces:
    if piece.kind == 'txt':
      yield from _text_docs(piece, stats)
    elif piece.kind == 'parquet':
      yield from _parquet_docs(piece, text_field, chunk, bad)
    elif piece.kind == 'arrow':
      yield from _arrow_docs(piece, text_field, bad)
    else:
      yield from _jsonl_docs(piece, text_field, bad, stats)


def _boundary(fh, pos: int, end: int) -> int:
  """Where a text piece that nominally starts at pos really starts: just after the first newline
  at or after pos - 1 (so a piece never starts mid-line), searched up to end; failing that, the
  start of the UTF-8 character that pos falls in."""
  fh.seek(pos - 1)
  at = pos - 1
  while at < end:
    block = fh.read(min(1 << 16, end - at))
    if not block:
      break
    nl = block.find(b'\n')
    if nl >= 0:
      return min(at + nl + 1, end)
    at += len(block)
  return _char_boundary(fh, pos)


def _char_boundary(fh, pos: int) -> int:
  """pos moved back to the start of the UTF-8 character it falls in."""
  if pos <= 0:
    return 0
  lo = max(0, pos - 3)
  fh.seek(lo)
  head = fh.read(pos - lo + 1)
  while pos > lo and pos - lo < len(head) and (head[pos - lo] & 0xC0) == 0x80:
    pos -= 1
  return pos


def _text_docs(piece, stats):
  """The piece of a text file (bytes between its boundaries) as one Doc."""
  f = piece.file
  try:
    with open(f.path, 'rb') as fh:
      a = (_char_boundary(fh, piece.start) if piece.first
           else _boundary(fh, piece.start, piece.limit))
      b = (_char_boundary(fh, piece.stop) if piece.last
           else _boundary(fh, piece.stop, piece.limit))
      fh.seek(a)
      raw = fh.read(max(0, b - a))
  except OSError as e:
    raise UserError(f'cannot read the corpus file {f.path} ({e.strerror}); fix its permissions '
                    'or remove it') from None
  if f.relpath.endswith('.py') and b'\x00' in raw:
    stats['skipped_files'] = stats.get('skipped_files', 0) + 1   # binary data named .py
    return
  text, replaced = corpus_lib.decode_text(raw)
  stats['replaced_chars'] = stats.get('replaced_chars', 0) + replaced
  if a == 0 and text.startswith(corpus_lib.BOM):
    text = text[1:]
  doc_id = f.relpath + (f'#{piece.split}' if piece.split else '')
  if text or (piece.last and not piece.first):   # an empty last piece still ends its document
    yield Doc(doc_id, text, piece.split, piece.last, f.relpath)


def _open_lines(piece):
  f = piece.file
  if piece.kind == 'jsonl.gz':
    return io.TextIOWrapper(gzip.open(f.path, 'rb'), encoding='utf-8', errors='surrogateescape',
                            newline='')
  if piece.kind == 'jsonl.zst':
    import zstandard
    raw = open(f.path, 'rb')
    stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.TextIOWrapper(stream, encoding='utf-8', errors='surrogateescape', newline='')
  return open(f.path, encoding='utf-8', errors='surrogateescape', newline='')


def _jsonl_docs(piece, text_field, bad, stats):
  f = piece.file
  try:
    with _open_lines(piece) as lines:
      for i, line in enumerate(lines, start=1):
        if not line.strip():
          continue
        line, replaced = corpus_lib.clean_text(line)
        stats['replaced_chars'] = stats.get('replaced_chars', 0) + replaced
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          bad.add(f'{f.path} line {i}', f'is not valid JSON ({e.msg})')
          continue
        text = obj.get(text_field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
          why = (f'has no {text_field!r} field' if not isinstance(obj, dict) or text_field not in obj
                 else f'has a value of type {type(text).__name__} in field {text_field!r}, not a '
                 'string')
          bad.add(f'{f.path} line {i}', why)
          continue
        if text:
          yield Doc(f'{record_stem(f.relpath)}:{i}', text, file=f.relpath)
  except UserError:
    raise
  except Exception as e:   # corrupt gzip/zstd streams (zlib.error, ZstdError, EOFError), OSError
    raise UserError(f'the corpus shard {f.path} cannot be read ({_reason(e)}); replace or remove '
                    'that file') from None


def _column_docs(columns, first_row: int, f, id_stem: str, text_field: str, bad):
  """Docs of the text column's values, batch by batch (rows numbered from first_row + 1); a null
  or a value that is not a string is a bad record."""
  row = first_row
  for values in columns:
    for text in values:
      row += 1
      if not isinstance(text, str):
        what = 'null' if text is None else f'value of type {type(text).__name__}'
        bad.add(f'{f.path}:{row}', f'has a {what} in column {text_field!r}, not a string')
      elif text:
        yield Doc(f'{id_stem}:{row}', text, file=f.relpath)


def _parquet_docs(piece, text_field, chunk, bad):
  f = piece.file
  pf = _parquet_file(f.path)
  first = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
  # Rows per batch so that a batch holds about `chunk` bytes of text.
  rg = pf.metadata.row_group(piece.start)
  per_row = max(1, rg.total_byte_size // max(1, rg.num_rows))
  rows = int(max(16, min(65536, chunk // per_row)))
  try:
    batches = pf.iter_batches(batch_size=rows, row_groups=list(range(piece.start, piece.stop)),
                              columns=[text_field])
    yield from _column_docs((b.column(0).to_pylist() for b in batches), first, f,
                            record_stem(f.relpath), text_field, bad)
  except UserError:
    raise
  except Exception as e:   # pyarrow's errors for damaged pages
    raise UserError(f'the parquet shard {f.path} cannot be read ({_reason(e)}); replace or remove '
                    'that file') from None


def _arrow_docs(piece, text_field, bad):
  import pyarrow as pa
  f = piece.file
  try:
    with pa.memory_map(f.path) as source:
      reader = pa.ipc.open_stream(source)
      col = reader.schema.get_field_index(text_field)
      if col < 0:
        raise UserError(f'the Arrow shard {f.path} has no column {text_field!r}; set '
                        '--config.data.text_field')
      yield from _column_docs((b.column(col).to_pylist() for b in reader), 0, f, f.relpath,
                              text_field, bad)
  except UserError:
    raise
  except Exception as e:
    raise UserError(f'the Arrow shard {f.path} cannot be read ({_reason(e)}); prepare the dataset '
                    'again') from None


def _stream_docs(spec, text_field, bad):
  ds = open_hf(spec)
  if spec['shards'] > 1:
    ds = ds.shard(num_shards=spec['shards'], index=spec['shard'])
  where = f'{spec["dataset"]} shard {spec["shard"]}'
  try:
    for n, example in enumerate(ds, start=1):
      text = example.get(text_field)
      if not isinstance(text, str):
        bad.add(f'{where} record {n}', f'has no string in column {text_field!r}')
      elif text:
        yield Doc(f'shard{spec["shard"]}:{n}', text, file=f'shard{spec["shard"]}')
  except UserError:
    raise
  except Exception as e:
    raise UserError(f'reading {where} failed ({_reason(e)}); check the connection or use a local '
                    'copy') from None
