"""The one exception type that reaches the user as a single sentence."""


class UserError(Exception):
  """Bad input (config value, corpus, checkpoint): the message names the problem and the fix.

  run.py prints the message alone (no traceback) and exits with status 2.
  """
