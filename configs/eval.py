"""`python run.py eval --workdir=RUN`: what to evaluate (lm/eval/evaluate.py, lm/eval/tasks.py).

Override any key on the command line, e.g.
  python run.py eval --workdir=runs/tiny --config=configs/eval.py \
      --config.eval.corpora='notes.txt,books/*.txt' --config.eval.tasks=arith2,arith3 \
      --config.eval.shots=5
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  e = c.eval = ml_collections.ConfigDict()
  e.val = True              # the validation split of the run's pretraining corpus
  e.corpora = ''            # more text: comma-separated files, folders, globs or .jsonl files
  e.text_field = 'text'     # the field read from .jsonl lines
  e.max_tokens = 131072     # tokens per corpus (whole documents in order; 0 = all)
  e.seq_len = 0             # window length; 0 = the run's pretraining train.seq_len
  e.tasks = 'auto'          # comma-separated tasks or suites (arith, arith1-4, instruct), '' for
                            # none; auto = instruct for fine-tuned runs, arith and instruct otherwise
                            # (auto leaves out a task whose prompts do not fit model.max_len)
  e.format = 'auto'         # auto | fewshot | chat (auto: chat for fine-tuned runs)
  e.shots = -1              # demonstrations per prompt; -1 = 0 in chat format, 3 in few-shot
  e.examples = 200          # held-out examples per task (instruct: spread over its 8 families)
  e.batch_size = 64
  e.seed = 0
  # EleutherAI lm-evaluation-harness (pip install -r requirements-eval.txt; docs/evaluation.md):
  e.harness = ''            # its tasks, comma-separated, e.g. 'hellaswag,arc_easy,lambada_openai'
  e.harness_shots = -1      # demonstrations per prompt; -1 = each task's own default
  e.harness_limit = 0       # examples per task; 0 = all
  e.harness_include = ''    # folders of task YAML files (local data; works offline)
  e.harness_chat = False    # a fine-tuned run answers in its chat template
  return c
