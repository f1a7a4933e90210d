"""Every config key with its typed default. Other config files are diffs from this one."""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The transformer (lm/model/transformer.py; validated in lm/config.py).
  m = c.model = ml_collections.ConfigDict()
  m.n_layers = 2
  m.d_model = 128
  m.n_heads = 4
  m.n_kv_heads = 0          # 0 means n_heads (plain multi-head attention).
  m.d_ff = 0                # 0 means 4 * d_model (gelu) or the 8/3 rule rounded to 64 (swiglu).
  m.max_len = 256
  m.vocab_size = 0          # 0 means "take it from the tokenizer".
  m.pos = 'rope'            # learned | sinusoidal | rope | alibi | none
  m.rope_base = 10000.0
  m.norm = 'rmsnorm'        # layernorm | rmsnorm
  m.norm_eps = 1e-5
  m.mlp = 'gelu'            # gelu | swiglu
  m.block = 'prenorm'       # prenorm | postnorm
  m.use_bias = False
  m.tie_embeddings = True
  m.dropout = 0.0
  m.dtype = 'float32'       # compute dtype: float32 | bfloat16
  m.param_dtype = 'float32' # stored weights: float32 | bfloat16 (half the bytes; see docs/configuration.md)
  m.remat = False
  m.scan_layers = False
  m.attention_impl = 'auto'  # auto | xla | cudnn (passed to jax.nn.dot_product_attention)
  m.init_std = 0.02
  m.qk_norm = False         # RMSNorm (learned scale) on each head's queries and keys before RoPE
  m.parametrization = 'sp'  # sp | mup: μP's init, per-layer rates and multipliers (docs/recipes.md)
  m.mup_base_width = 0      # μP: the d_model the learning rate and init were tuned at
  m.mup_base_head_dim = 0   # μP: attention is 1/sqrt(H) at this head dim, sqrt(it)/H elsewhere (0: H)

  # Corpus, tokenizer, token files and batches (lm/data/tokens.py).
  d = c.data = ml_collections.ConfigDict()
  d.corpus = 'pystdlib'     # pystdlib | text | hf | synthetic
  d.path = ''               # file, folder or glob (.txt .jsonl .jsonl.gz .jsonl.zst .parquet)
  d.text_field = 'text'     # the JSON field or parquet/dataset column that holds the text
  d.tokenizer = 'bytes'     # bytes | sentencepiece | bpe | file (the tokenizer in tokenizer_path)
  d.tokenizer_path = ''     # data.tokenizer=file: a tokenizer folder, such as a run's tokenizer/
  d.vocab_size = 4096       # sentencepiece/bpe vocabulary size (bytes is always 256 + specials)
  d.sp_model_type = 'bpe'   # bpe | unigram
  d.val_fraction = 0.05     # share of files (or documents) held out for validation
  d.max_bytes = 0           # 0 = the whole corpus; else read at most this many bytes
  d.cache_dir = ''          # '' means $LM_CACHE_DIR or ~/.cache/lm
  d.sp_train_bytes = 20_000_000  # sentencepiece trains on a seeded sample this big (0 = all)
  d.chat_tokens = True      # reserve <|system|> <|user|> <|assistant|> <|end|> ids (lm/data/tokenizer.py)
  d.arith_fraction = 0.0    # share of generated "a+b=c" lines mixed into a text corpus (lm/eval/tasks.py)
  d.arith_digits = 4        # their largest operand digit count (1-4)
  d.hf_dataset = ''         # a Hugging Face dataset: save_to_disk folder, local data folder or hub name
  d.hf_config = ''          # its configuration name ('' = the default)
  d.hf_split = 'train'      # its split
  d.hf_streaming = False    # stream it instead of preparing Arrow files first
  d.workers = 0             # tokenizing processes (0 = one per core)
  d.max_chunk_bytes = 16 << 20  # the most text one tokenizing process holds at a time
  d.sources = ()            # a weighted mixture: ({'path': ..., 'weight': 0.7}, {'hf_dataset': ...})
  d.synthetic_vocab = 64
  d.synthetic_order = 1
  d.synthetic_branching = 4  # nonzero next-symbol choices per context (sparsity)
  d.synthetic_concentration = 1.0  # Dirichlet concentration of those choices
  d.synthetic_tokens = 2_000_000
  d.synthetic_seed = 1234

  # Optimisation, evaluation, checkpoints (lm/stages/pretrain.py).
  t = c.train = ml_collections.ConfigDict()
  t.steps = 200
  t.batch_size = 16
  t.seq_len = 128
  t.lr = 3e-3
  t.warmup_steps = 20
  t.schedule = 'cosine'     # cosine | wsd | constant
  t.final_lr_fraction = 0.1
  t.decay_fraction = 0.2    # wsd: the share of steps spent decaying
  t.b1 = 0.9
  t.b2 = 0.99
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.decay_embeddings = False
  t.grad_clip = 1.0
  t.grad_accum = 1
  # On a CPU a step runs its forward and backward over micro-batches of about this many tokens
  # (whole rows, gradients summed): 10-30% faster from cache, the same gradient up to float
  # rounding (lm.training.optim.micro_batches, benchmarks/README.md). 0: off. Accelerators ignore it.
  t.micro_batch_tokens = 512
  t.eval_every = 100
  t.eval_batches = 8
  t.log_every = 10
  t.checkpoint_every = 100
  t.keep_checkpoints = 2
  t.async_checkpoint = True  # checkpoints written in the background while training goes on
  t.peak_flops = 0.0        # FLOP/s for MFU; 0 means look the device up in lm/model/flops.py
  t.progress = 'auto'       # auto | bar | log | none
  # Weights & Biases (pip install -r requirements-eval.txt; lm/tracking.py): the metrics rows,
  # the resolved config and the manifest; WANDB_MODE=offline logs into RUN/wandb/ for a later sync.
  t.wandb = False
  t.wandb_project = 'lm'
  t.wandb_group = ''        # a sweep sets it to the sweep's folder name
  t.wandb_tags = ''         # comma-separated; a sweep adds N=, D=, C=
  t.init_from = ''          # continued pretraining: a run (or an imported model) whose weights,
                            # shape and tokenizer this run starts from, with a fresh optimizer
  t.eval_tasks = ''         # task suites scored few-shot at evaluations, e.g. 'arith' (lm/eval/tasks.py)
  t.eval_tasks_every = 0    # every this many steps (a multiple of eval_every); 0: every evaluation
  t.eval_task_examples = 100  # held-out problems per task
  t.eval_shots = 3          # demonstrations in each prompt
  t.eval_harness = ''       # lm-evaluation-harness tasks scored at those evaluations too, e.g.
                            # 'lambada_openai' (pip install -r requirements-eval.txt; docs/evaluation.md)
  t.eval_harness_limit = 100  # examples per harness task (0: all)
  t.eval_harness_include = ''  # folders of harness task YAML files (local data)
  t.opt_dtype = 'float32'   # AdamW moments: float32 | bfloat16 (half the optimizer state)
  t.optimizer = 'adamw'     # adamw | muon (Muon on the hidden matrices, AdamW on the rest)
  t.z_loss = 0.0            # pretraining: + z_loss * mean(logsumexp(logits)^2) (PaLM: 1e-4)
  t.profile_steps = ''      # 'A:B' writes a jax.profiler trace of steps A+1..B to workdir/profile

  # Device mesh (lm/model/sharding.py). -1 means "the rest of the devices".
  mesh = c.mesh = ml_collections.ConfigDict()
  mesh.data = -1
  mesh.fsdp = 1
  mesh.tensor = 1
  mesh.distributed = False  # call jax.distributed.initialize() (multi-host)
  mesh.cpu_devices = 0      # CPU only: split the host into this many devices; 0: one per core
  return c

