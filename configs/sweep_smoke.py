"""The default sweep: two IsoFLOP budgets on the Python stdlib, byte tokenizer.

`python run.py` trains this config with its budgets (and the smallest budget's seeds) chosen for
10 minutes on the machine it finds (`--minutes`, lm/scaling/budget.py); `python run.py sweep
--config=configs/sweep_smoke.py` trains the budgets below: 2e13 FLOPs in all; 8 min 4 s on 2 CPU
cores (measured). It shows the machinery end to end (runs, IsoFLOP curves, the three Chinchilla
approaches, plots, report) but two budgets a factor 3 apart cannot pin the exponent, and report.md
says so in its first paragraph. What a redesign within this cost achieved, and what it did not:
docs/results/default_sweep. The exponent itself: configs/sweep_exponent.py
(docs/results/exponent_cpu).
"""
import ml_collections

from configs import base


def get_config():
  c = ml_collections.ConfigDict()
  b = c.base = base.get_config()
  b.data.corpus, b.data.tokenizer, b.data.max_bytes = 'pystdlib', 'bytes', 8_000_000
  b.model.pos, b.model.norm, b.model.mlp, b.model.max_len = 'rope', 'rmsnorm', 'gelu', 128
  t = b.train
  t.batch_size, t.seq_len = 16, 128
  t.schedule, t.final_lr_fraction, t.b2 = 'cosine', 0.1, 0.99
  t.eval_batches, t.keep_checkpoints, t.log_every = 8, 1, 100

  s = c.sweep = ml_collections.ConfigDict()
  # isoflop | grid | wsd (grid as warmup-stable-decay branches) | isoflop_wsd (IsoFLOP runs as
  # WSD branches of one trunk per size: configs/sweep_exponent_wsd.py)
  s.mode = 'isoflop'
  s.budgets = (1e12, 3e12)        # FLOPs per run (Chinchilla App. F count)
  s.sizes_per_budget = 5
  s.span = 4.0                    # sizes from N*/span to N*·span around the predicted optimum
  # The predicted optimum N* = sqrt(C / (k · tokens_per_param)). Chinchilla's ~20 holds at
  # 1e20+ FLOPs. Byte-level models of 1e4-1e6 parameters measured here sit near 40-170 at this
  # fixed batch (the small budgets' large models are short of steps), and near 45 at every
  # budget with the batch rule of configs/sweep_exponent.py (docs/results/exponent_cpu).
  s.tokens_per_param = 80.0
  s.grid_params = (100_000.0,)     # grid mode: target N values ...
  s.grid_tokens = (2_000_000.0,)   # ... times these token counts
  s.cooldown = 0.2                # wsd mode: each run's last 20% decays; the rest is its trunk's
  s.head_dim = 16
  s.aspect = 32.0                 # d_model / n_layers kept near this
  s.lr = 3e-3                     # at d_model = lr_ref_width; scaled by (ref / d_model)^power
  s.lr_ref_width = 128
  s.lr_width_power = 0.5
  s.warmup_fraction = 0.05
  s.warmup_max = 100
  s.seeds = 1
  s.seeds_smallest_budgets = 1    # how many of the smallest budgets get sweep.seeds_smallest seeds
  s.only = ''                     # a regex: train only the runs it matches (and their trunks)
  s.evals_per_run = 4             # evaluations (and eval rows) spread over each run
  # Validation windows every run is scored on (the same windows for every batch size);
  # 0: base.train.eval_batches x base.train.batch_size (8 x 16 = 128 here).
  s.eval_rows = 0
  s.checkpoints_per_run = 4
  s.max_attempts = 3
  # Runs at once, each in its own process on an equal share of the GPUs or CPU cores
  # (lm/scaling/parallel.py); 1 runs them one after another in the sweep's own process.
  s.parallel = 1
  # K > 1: runs differing only in seed trained K at a time in one vmapped program
  # (lm/scaling/packed.py): for accelerators; on a CPU it measured no faster than runs alone.
  s.pack = 1
  # Where the runs train (docs/cluster.md): 'local' (this machine, as above), 'ray' (each run a
  # Ray task on a cluster) or 'slurm' (each run a SLURM job through submitit). The sweep folder
  # must then be on storage every node mounts. Needs `pip install -r requirements-cluster.txt`.
  s.backend = 'local'
  s.max_in_flight = 0             # ray/slurm: runs at once at most; 0: as many as the cluster takes
  s.ray_address = ''              # '' this machine's Ray (or a new one), 'auto', or 'HOST:PORT'
  s.ray_num_cpus = 1.0            # each run's Ray task asks for these ...
  s.ray_num_gpus = 0.0
  s.ray_resources = ''            # ... and these custom resources, e.g. 'TPU-v4-8-head:1'
  s.slurm_executor = 'auto'       # 'slurm', 'local' (processes here, to try a set-up) or 'auto'
  s.slurm_partition = ''
  s.slurm_time_min = 240          # each job's limit; a run past it resumes in its next job
  s.slurm_cpus = 4
  s.slurm_gpus = 0
  # lm-evaluation-harness tasks every finished run is scored on (pip install -r
  # requirements-eval.txt): harness.csv and task_vs_compute.png beside the fit.
  s.harness = ''
  s.harness_limit = 0             # examples per task; 0: all
  s.harness_include = ''          # folders of task YAML files (local data)
  # 'mup': every run under μP (lm/model/parametrization.py) with base width lr_ref_width, all at
  # sweep.lr (lr_width_power must be 0): one learning-rate scan at the base width serves every size.
  s.parametrization = 'sp'
  s.bootstrap = 100
  return c
