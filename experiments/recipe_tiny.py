"""The whole recipe in one command: pretrain -> LoRA SFT -> DPO on the tiny model, and,
with --stages, KTO, a reward model and GRPO (online RL) from the same SFT model.

  python experiments/recipe_tiny.py                       # ~10 min on a 2-core CPU
  python experiments/recipe_tiny.py --stages=all          # + KTO, reward model, GRPO
  python experiments/recipe_tiny.py --smoke --root=/tmp/r # ~2 min: what CI runs (--stages=all)

Each stage is a shipped config (configs/pretrain_tiny.py, sft_lora_tiny.py, dpo_tiny.py,
kto_tiny.py, reward_tiny.py, grpo_tiny.py) whose init_from is its parent stage's workdir
(<root>/<stage>): SFT continues pretraining; DPO, KTO, the reward model and GRPO each
start from the SFT model. --stages names the stages to run (default pretrain,sft,dpo; 'all':
every one), each with its parent. A stage whose workdir already holds its final step is
not retrained, so a re-run only completes what is missing (an interrupted stage resumes
from its last checkpoint). Then it measures every generating stage's model the same way,
greedy exact match on the built-in task's test split (a reward model scores answers, it
does not write them: its held-out pair accuracy is in the table), and prints a table of
the stage metrics (also written to <root>/recipe.json).

The recipe's config is one ConfigDict with a group per stage run, each that stage's
shipped config (init_from set to its parent's workdir), so a stage's field is overridden
as for every lmjax program, with the stage's name first:

  --config.STAGE.KEY=VALUE   e.g. --config.sft.train.steps=300 --config.dpo.dpo.beta=0.5

(ml_collections parses each value by its field's type; a typo names the key.) It takes
no --config=FILE: the stage files are the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (config, parent stage: the init_from), in the order they run.
STAGES = {
    'pretrain': ('configs/pretrain_tiny.py', None),
    'sft': ('configs/sft_lora_tiny.py', 'pretrain'),
    'dpo': ('configs/dpo_tiny.py', 'sft'),
    'kto': ('configs/kto_tiny.py', 'sft'),
    'reward': ('configs/reward_tiny.py', 'sft'),
    'grpo': ('configs/grpo_tiny.py', 'sft'),
}
DEFAULT_STAGES = 'pretrain,sft,dpo'
GENERATES = ('pretrain', 'sft', 'dpo', 'kto', 'grpo')  # a reward model scores, not writes


def parse_stages(arg: str) -> list[str]:
  """--stages ('all', or names separated by commas) -> the stages in run order; ValueError
  naming an unknown stage or one whose parent is not run."""
  names = list(STAGES) if arg.strip() == 'all' else [x.strip() for x in arg.split(',')
                                                      if x.strip()]
  for name in names:
    if name not in STAGES:
      raise ValueError(f'--stages: unknown stage {name!r}; choose from {", ".join(STAGES)} '
                       "or 'all'")
    parent = STAGES[name][1]
    if parent is not None and parent not in names:
      raise ValueError(f'--stages: {name} starts from the {parent} stage; add {parent}')
  if not names:
    raise ValueError('--stages: name at least one stage')
  return [name for name in STAGES if name in names]


def recipe_config(root: str, smoke: bool, flags: list[str], stages=tuple(STAGES)[:3]):
  """{stage name: its config} of `stages` as one locked ConfigDict, with the
  --config.STAGE.KEY=VALUE overrides in `flags` applied; each stage validated."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  out = {}
  for name in stages:
    path, parent = STAGES[name]
    parent_dir = os.path.join(root, parent) if parent else ''
    arg = ':'.join(x for x in ('smoke' if smoke else '', parent_dir) if x) or None
    out[name] = config_lib.build(os.path.join(ROOT, path), arg)
  cfg = config_lib.apply_flags(config_lib.lock(ml_collections.ConfigDict(out)), flags)
  for name in stages:
    config_lib.validate(cfg[name])
  return cfg


def finished(workdir: str, steps: int) -> bool:
  """Whether `workdir` holds a run's final checkpoint (step `steps`): not retrained."""
  from lmjax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  if not os.path.isdir(workdir):
    return False
  ckpt = Checkpointer(workdir, None, read_only=True)
  try:
    return ckpt.latest_step() == steps
  finally:
    ckpt.close()


def summarize(workdir: str) -> dict:
  """The last logged train metrics and the first and last evals of a run."""
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if 'eval_loss' in r or 'eval/reward' in r]  # GRPO: no loss
  out = {'steps': train[-1]['step'] if train else 0,
         'train_loss': train[-1]['loss'] if train else None}
  if evals:
    first, last = evals[0], evals[-1]
    out.update(eval_loss_start=first.get('eval_loss'), eval_loss=last.get('eval_loss'),
               # GRPO's greedy held-out completions, scored by its reward functions
               eval_reward_start=first.get('eval/reward'), eval_reward=last.get('eval/reward'),
               val_exact_match=last.get('eval/exact_match'),
               # DPO's implicit rewards (TRL's names), a reward model's own; KTO: no accuracy
               reward_accuracy=last.get('eval/rewards/accuracies', last.get('eval/accuracy')),
               reward_accuracy_start=first.get('eval/rewards/accuracies',
                                               first.get('eval/accuracy')),
               reward_margin=last.get('eval/rewards/margins', last.get('eval/margin')))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--root', default='/tmp/lmjax_recipe', help='the stages\' workdirs')
  parser.add_argument('--smoke', action='store_true', help='the configs\' short smoke runs')
  parser.add_argument('--stages', default=DEFAULT_STAGES,
                      help=f"the stages to run, with their parents: names from "
                      f"{','.join(STAGES)}, or 'all' (default {DEFAULT_STAGES})")
  parser.add_argument('--test_limit', type=int, default=None,
                      help='exact match on the first N test questions (default: all; '
                      '--smoke: 48)')
  args, flags = parser.parse_known_args(argv)  # the rest: --config.STAGE.KEY=VALUE
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:
    stages = parse_stages(args.stages)
    stage_configs = recipe_config(args.root, args.smoke, flags, stages)
  except (ValueError, config_lib.ConfigError) as e:
    parser.error(str(e))
  limit = args.test_limit if args.test_limit is not None else (48 if args.smoke else None)

  import lmjax  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel

  results = {}
  for name in stages:
    path, workdir = STAGES[name][0], os.path.join(args.root, name)
    cfg = stage_configs[name]
    done = finished(workdir, cfg.train.steps)
    print(f'\n=== {name}: {path} -> {workdir}' + (' (done: not retrained)' if done else ''),
          flush=True)
    t0 = time.perf_counter()
    if not done:
      loop.train(cfg, workdir)
    results[name] = {'config': path, 'workdir': workdir,
                     'wall_s': time.perf_counter() - t0 if not done else None,
                     **summarize(workdir)}

  print('\n=== test exact match (greedy, the built-in task)', flush=True)
  for name in (s for s in stages if s in GENERATES):
    em = lmjax.load(results[name]['workdir']).exact_match(
        'test', limit=limit,
        sft={'template': 'chatml', 'path': 'builtin:synthetic', 'source': 'jsonl'})
    results[name]['test_exact_match'] = em['accuracy']
    results[name]['test_n'] = em['n']
    print(f'{name}: {em["accuracy"]:.3f} ({em["correct"]}/{em["n"]})', flush=True)

  print('\n' + table(results))
  with open(os.path.join(args.root, 'recipe.json'), 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  return 0


def table(results: dict) -> str:
  def fmt(v, spec='.3f'):
    return '-' if v is None else format(v, spec)
  head = ('| stage | steps | wall | train loss | eval loss (start -> end) | val exact match '
          '| reward acc (held-out, start -> end) | eval reward (start -> end) '
          '| test exact match |')
  def acc(r, key='reward_accuracy'):
    if r.get(key) is None:
      return '-'
    return f'{fmt(r.get(key + "_start"))} -> {fmt(r[key])}'
  lines = [head, '|' + '---|' * 9]
  for name, r in results.items():
    wall = '-' if r['wall_s'] is None else f'{r["wall_s"] / 60:.1f} min'
    lines.append(f'| {name} | {r["steps"]} | {wall} | {fmt(r["train_loss"])} | '
                 f'{fmt(r.get("eval_loss_start"))} -> {fmt(r.get("eval_loss"))} | '
                 f'{fmt(r.get("val_exact_match"))} | {acc(r)} | {acc(r, "eval_reward")} | '
                 f'{fmt(r.get("test_exact_match"))} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(main())
