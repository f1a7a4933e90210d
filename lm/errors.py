"""The exception type that reaches the user as a single sentence, and the record of a SIGTERM stop
that run.py turns into its own exit status."""

# run.py's exit status when a SIGTERM stopped the work before it finished: the checkpoints are
# saved and rerunning the same command resumes (1 is a crash, 2 a refusal, 0 finished).
STOPPED_EXIT = 3

_signal_stops: list[str] = []


class UserError(Exception):
  """Bad input (config value, corpus, checkpoint): the message names the problem and the fix.

  run.py prints the message alone (no traceback) and exits with status 2.
  """


def record_signal_stop(where: str) -> None:
  """A run or sweep in `where` stopped early because this process got SIGTERM (the training loop
  and the sweep driver call this; the commands still return their partial summaries)."""
  _signal_stops.append(where)


def signal_stops() -> list[str]:
  """The folders whose work a SIGTERM stopped in this process, in order."""
  return list(_signal_stops)
