"""What this process runs on: its CPU cores, the library versions and the code's git commit."""
import os
import platform
import subprocess
import sys

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint


def host_cores() -> int:
  """The CPU cores this process may run on (its affinity, so `taskset` and pinned sweep
  workers count as what they are given)."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def git_commit() -> str | None:
  """The commit of the checkout this code runs from (None outside a git checkout)."""
  try:
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=5,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return out.stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None


def versions() -> dict:
  """Versions of Python and the libraries that decide a run's numbers (manifest.json)."""
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jax.lib.__version__ if hasattr(jax.lib, '__version__') else None,
          'flax': flax.__version__, 'optax': optax.__version__,
          'orbax_checkpoint': orbax.checkpoint.__version__, 'numpy': np.__version__}


def device_manifest(mesh=None) -> dict:
  """The part of every run's manifest.json that says where and with what it ran: versions, git
  commit, command line, device kind and counts, and the mesh's axis sizes when there is one."""
  dev = jax.devices()[0]
  out = {'versions': versions(), 'git_commit': git_commit(), 'command': sys.argv,
         'device_kind': dev.device_kind, 'platform': dev.platform,
         'device_count': jax.device_count(), 'process_count': jax.process_count()}
  if mesh is not None:
    out['mesh'] = dict(zip(mesh.axis_names, mesh.devices.shape))
  return out
