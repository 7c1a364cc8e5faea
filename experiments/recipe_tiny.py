"""The whole recipe in one command: pretrain -> LoRA SFT -> DPO on the tiny model.

  python experiments/recipe_tiny.py                       # ~10 min on a 2-core CPU
  python experiments/recipe_tiny.py --smoke --root=/tmp/r # ~2 min: what CI runs

Each stage is a shipped config (configs/pretrain_tiny.py, sft_lora_tiny.py, dpo_tiny.py)
whose init_from is the previous stage's workdir (<root>/pretrain, <root>/sft, <root>/dpo);
a stage whose workdir already holds its final step is not retrained, so a re-run only
completes what is missing (an interrupted stage resumes from its last checkpoint). Then it
measures every stage's model the same way, greedy exact match on the built-in task's test
split, and prints a table of the stage metrics (also written to <root>/recipe.json).

The recipe's config is one ConfigDict with a group per stage, each that stage's shipped
config (pretrain, sft, dpo; init_from set to the previous stage's workdir), so a stage's
field is overridden as for every lmjax program, with the stage's name first:

  --config.STAGE.KEY=VALUE   e.g. --config.sft.train.steps=300 --config.dpo.dpo.beta=0.5

(ml_collections parses each value by its field's type; a typo names the key.) It takes
no --config=FILE: the three stage files are the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = (('pretrain', 'configs/pretrain_tiny.py'), ('sft', 'configs/sft_lora_tiny.py'),
          ('dpo', 'configs/dpo_tiny.py'))


def recipe_config(root: str, smoke: bool, flags: list[str]):
  """{stage name: its config} as one locked ConfigDict, with the --config.STAGE.KEY=VALUE
  overrides in `flags` applied; each stage validated."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  stages, previous = {}, None
  for name, path in STAGES:
    arg = ':'.join(x for x in ('smoke' if smoke else '', previous or '') if x) or None
    stages[name] = config_lib.build(os.path.join(ROOT, path), arg)
    previous = os.path.join(root, name)
  cfg = config_lib.apply_flags(config_lib.lock(ml_collections.ConfigDict(stages)), flags)
  for name, _ in STAGES:
    config_lib.validate(cfg[name])
  return cfg


def summarize(workdir: str) -> dict:
  """The last logged train metrics and the first and last evals of a run."""
  from lmjax.train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  rows = metrics_lib.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if 'eval_loss' in r]
  out = {'steps': train[-1]['step'] if train else 0,
         'train_loss': train[-1]['loss'] if train else None}
  if evals:
    first, last = evals[0], evals[-1]
    out.update(eval_loss_start=first['eval_loss'], eval_loss=last['eval_loss'],
               val_exact_match=last.get('eval/exact_match'),
               reward_accuracy=last.get('eval/rewards/accuracies'),
               reward_margin=last.get('eval/rewards/margins'))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--root', default='/tmp/lmjax_recipe', help='the stages\' workdirs')
  parser.add_argument('--smoke', action='store_true', help='the configs\' short smoke runs')
  parser.add_argument('--test_limit', type=int, default=None,
                      help='exact match on the first N test questions (default: all; '
                      '--smoke: 48)')
  args, flags = parser.parse_known_args(argv)  # the rest: --config.STAGE.KEY=VALUE
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  try:
    stage_configs = recipe_config(args.root, args.smoke, flags)
  except config_lib.ConfigError as e:
    parser.error(str(e))
  limit = args.test_limit if args.test_limit is not None else (48 if args.smoke else None)

  import lmjax  # pylint: disable=import-outside-toplevel
  from lmjax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel

  results = {}
  for name, path in STAGES:
    workdir = os.path.join(args.root, name)
    cfg = stage_configs[name]
    ckpt = Checkpointer(workdir, None, read_only=True) if os.path.isdir(workdir) else None
    done = ckpt is not None and ckpt.latest_step() == cfg.train.steps
    if ckpt is not None:
      ckpt.close()
    print(f'\n=== {name}: {path} -> {workdir}' + (' (done: not retrained)' if done else ''),
          flush=True)
    t0 = time.perf_counter()
    if not done:
      loop.train(cfg, workdir)
    results[name] = {'config': path, 'workdir': workdir,
                     'wall_s': time.perf_counter() - t0 if not done else None,
                     **summarize(workdir)}

  print('\n=== test exact match (greedy, the built-in task)', flush=True)
  for name, _ in STAGES:
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
          '| reward acc (held-out) | test exact match |')
  lines = [head, '|' + '---|' * 8]
  for name, r in results.items():
    wall = '-' if r['wall_s'] is None else f'{r["wall_s"] / 60:.1f} min'
    lines.append(f'| {name} | {r["steps"]} | {wall} | {fmt(r["train_loss"])} | '
                 f'{fmt(r.get("eval_loss_start"))} -> {fmt(r.get("eval_loss"))} | '
                 f'{fmt(r.get("val_exact_match"))} | {fmt(r.get("reward_accuracy"))} | '
                 f'{fmt(r["test_exact_match"])} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  sys.exit(main())
