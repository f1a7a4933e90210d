"""One writer per folder: the advisory lock file (`.lock`) that every command writing a run, sweep
or pipeline folder holds while it writes (`with lock.hold(folder): ...`).

The file is a JSON object: host, pid, the process's start time and boot id (Linux, from /proc: a
pid reused by another process, or a lock from before a reboot, is not taken for its holder), the
command line and when it was taken. It appears atomically and complete: a temporary file is
hard-linked into place (O_CREAT|O_EXCL where the filesystem has no hard links), so exactly one of
two processes starting at once gets it and nobody reads half a lock.

A second writer is refused in one sentence naming the holder (host, pid, command) and what to do.
A lock whose process is gone on this host is taken over, with a note on stderr. A holder on
another host cannot be checked from here, so it is refused too, with the way out (delete the
file if that process is gone). An unreadable lock file is refused the same way.

Locks are per folder, so a sweep holds its folder while each of its runs holds its own run
folder (in this process or in a worker process), and a pipeline holds its folder while each
stage holds the stage's. A process that already holds a folder may take it again (nested
holds count; the file goes when the outermost one ends). Locks are released on exit from the
`with` block, on exceptions too; a process killed outright leaves its lock, which the next
writer on the same host takes over.
"""
import contextlib
import datetime
import json
import os
import secrets
import socket
import sys
import time

from lm.errors import UserError

NAME = '.lock'

_held = {}   # real path of a folder -> [Lock, depth], for this process


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state letter, start time in clock ticks since boot) of a process, from /proc; None where
  there is no /proc or no such process."""
  try:
    with open(f'/proc/{pid}/stat', 'rb') as f:
      text = f.read().decode('ascii', 'replace')
  except OSError:
    return None
  fields = text[text.rfind(')') + 2:].split()   # after the command name, which may hold spaces
  try:
    return fields[0], int(fields[19])
  except (IndexError, ValueError):
    return None


def _boot_id() -> str | None:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip() or None
  except OSError:
    return None


def _me() -> dict:
  stat = _proc_stat(os.getpid())
  command = ' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'start_ticks': stat[1] if stat else None, 'boot_id': _boot_id(),
          'command': command[:300], 'since': time.time(), 'token': secrets.token_hex(8)}


def _alive(holder: dict) -> bool:
  """Whether the process a lock on this host names still runs (a zombie does not, nor a
  process that reuses the pid, nor anything from before a reboot)."""
  boot = _boot_id()
  if boot and holder.get('boot_id') and holder['boot_id'] != boot:
    return False
  pid = holder['pid']
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's process
    pass
  except OSError:
    return False
  stat = _proc_stat(pid)
  if stat is None:
    return True   # no /proc to look closer: the pid runs
  state, start = stat
  if state == 'Z':
    return False
  return holder.get('start_ticks') in (None, start)


def _describe(holder: dict) -> str:
  since = holder.get('since')
  when = (datetime.datetime.fromtimestamp(since).strftime('%Y-%m-%d %H:%M:%S')
          if isinstance(since, (int, float)) else 'an unknown time')
  command = ' '.join(str(holder.get('command') or 'an unknown command').split())
  if len(command) > 80:
    command = command[:77] + '...'
  return f"pid {holder['pid']} on host {holder['host']}, running `{command}` since {when}"


def _read(path: str) -> tuple[dict | None, bytes | None]:
  """(holder, raw bytes) of a lock file; (None, raw) when it does not hold a lock's JSON, (None,
  None) when it is gone. A lock being written without hard links may be empty for a moment: an
  unreadable one is read again for up to half a second."""
  for attempt in range(6):
    try:
      with open(path, 'rb') as f:
        raw = f.read()
    except FileNotFoundError:
      return None, None
    except OSError:   # a folder named .lock, no permission ...
      return None, b''
    try:
      holder = json.loads(raw.decode('utf-8'))
      pid = holder.get('pid') if isinstance(holder, dict) else None
      if (isinstance(pid, int) and not isinstance(pid, bool) and pid > 0
          and isinstance(holder.get('host'), str)):
        return holder, raw
    except (UnicodeDecodeError, ValueError):
      pass
    if attempt < 5:
      time.sleep(0.1)
  return None, raw


def _create(path: str, me: dict) -> bool:
  """Writes the lock file if there is none; False if one exists."""
  data = (json.dumps(me, sort_keys=True) + '\n').encode()
  tmp = f'{path}.{me["pid"]}.{me["token"]}.tmp'
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    try:
      os.link(tmp, path)
      return True
    except FileExistsError:
      return False
    except OSError:   # a filesystem without hard links: O_EXCL, then the content
      pass
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return True


def _take_over(path: str, raw: bytes) -> bool:
  """Removes the dead holder's lock file if it still is the one read (`raw`); another process
  taking it over at the same moment makes one of the two find a different file and put it
  back. True if removed."""
  aside = f'{path}.{os.getpid()}.{secrets.token_hex(4)}.stale'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  try:
    with open(aside, 'rb') as f:
      moved = f.read()
  except OSError:
    moved = None
  if moved == raw:
    os.unlink(aside)
    return True
  try:   # someone else's fresh lock: back into place (unless a third has taken the name)
    os.link(aside, path)
  except OSError:
    pass
  os.unlink(aside)
  return False


class Lock:
  """A held lock: the file and the token that proves it is this process's."""

  def __init__(self, folder: str, path: str, me: dict, created: list[str]):
    self.folder, self.path, self.me = folder, path, me
    self.created = created   # the folders acquire() made, deepest first

  def release(self) -> None:
    key = os.path.realpath(self.folder)
    entry = _held.get(key)
    if entry and entry[0] is self:
      entry[1] -= 1
      if entry[1] > 0:
        return
      del _held[key]
    holder, _ = _read(self.path)
    if holder is not None and holder.get('token') == self.me['token']:
      with contextlib.suppress(OSError):
        os.unlink(self.path)
    for d in self.created:   # a command refused before it wrote anything leaves no folder
      try:
        os.rmdir(d)
      except OSError:
        break


def acquire(folder: str) -> Lock:
  """Takes the lock of `folder` (created if missing), or refuses in one sentence (UserError)."""
  folder = os.path.abspath(folder)
  key = os.path.realpath(folder)
  entry = _held.get(key)
  if entry and entry[0].me['pid'] == os.getpid():
    entry[1] += 1
    return entry[0]
  created, d = [], folder
  while not os.path.isdir(d) and d != os.path.dirname(d):
    created.append(d)
    d = os.path.dirname(d)
  try:
    os.makedirs(folder, exist_ok=True)
  except FileExistsError:
    raise UserError(f'{folder} exists and is not a folder; name a folder to write the run '
                    'into.') from None
  except OSError as e:
    raise UserError(f'{folder} cannot be created ({e.strerror}); name a folder you can '
                    'write to.') from None
  path = os.path.join(folder, NAME)
  me = _me()
  for _ in range(20):
    try:
      if _create(path, me):
        _held[key] = [Lock(folder, path, me, created), 1]
        return _held[key][0]
    except OSError as e:
      raise UserError(f'the lock file {path} cannot be written ({e.strerror}); {folder} must be '
                      'writable for this command.') from None
    holder, raw = _read(path)
    if raw is None:   # gone in the meantime: try again
      continue
    if holder is None:
      raise UserError(f'{path} is not a lock file this program can read, so it cannot tell '
                      f'whether another process is writing {folder}; delete {path} if none is, '
                      'then run the command again.')
    if holder['host'] != me['host']:
      raise UserError(f'{folder} is in use by {_describe(holder)}, which cannot be checked '
                      f'from host {me["host"]}; wait for it to finish, or delete {path} if that '
                      'process is gone.')
    if holder['pid'] != os.getpid() and _alive(holder):   # own pid: a lock this process lost
      raise UserError(f'{folder} is in use by another process ({_describe(holder)}); wait for '
                      f'it to finish, or delete {path} if that process is gone.')
    if _take_over(path, raw):
      print(f'note: took over the lock of {folder} from pid {holder["pid"]}, which is no longer '
            'running.', file=sys.stderr, flush=True)
  raise UserError(f'the lock of {folder} changed hands too often to be taken; run the command '
                  'again.')


def wait_until_free(folder: str, timeout_s: float = 300.0, poll_s: float = 1.0) -> bool:
  """Waits while `folder` is locked by a live process on this host (a run's earlier attempt still
  saving its checkpoint, say). True when free (no lock, or its holder gone, or on another host:
  nothing here can tell), False after timeout_s."""
  path = os.path.join(os.path.abspath(folder), NAME)
  deadline = time.time() + timeout_s
  while True:
    holder, _ = _read(path)
    if (holder is None or holder['host'] != socket.gethostname() or holder['pid'] == os.getpid()
        or not _alive(holder)):
      return True
    if time.time() >= deadline:
      return False
    time.sleep(poll_s)


def lock_holder(folder: str) -> dict | None:
  """The holder of `folder`'s lock as its file names it (host, pid, command ...), or None."""
  return _read(os.path.join(os.path.abspath(folder), NAME))[0]


@contextlib.contextmanager
def hold(folder: str, enabled: bool = True):
  """`with hold(folder):` the lock of `folder` for the block (nothing when not enabled: the
  processes of a multi-host job other than the first, which share its folders)."""
  if not enabled:
    yield None
    return
  lock = acquire(folder)
  try:
    yield lock
  finally:
    lock.release()
