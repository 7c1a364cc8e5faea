"""Task accuracy (greedy exact match) of a model on an SFT dataset's split, per task.

  python tools/eval_sft.py --workdir=/tmp/lmjax_sft [--split=test] [--limit=N] [--step=N]
  python tools/eval_sft.py --workdir=/tmp/lmjax_tiny          # the base model: "before"

The model is an lmjax workdir (a LoRA run loads merged with its base) or a Hugging Face
model dir. The data is the run's cfg.sft (the built-in synthetic task unless it names
JSONL or TFDS data); --sft.KEY=VALUE overrides a field (e.g. --sft.path=my/{split}.jsonl,
--sft.template=llama3; a run whose sft.path has no '{split}' holds no held-out split:
--sft.eval_path=held.jsonl --split=validation). Prints overall and per-task accuracy and
a few answers; --json writes the result. Bad input: one line, `error: <reason>`, exit
code 2 (--verbose: with the traceback).
"""

import argparse
import ast
import json
import sys

from lmjax import cli


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--workdir', required=True, help='lmjax workdir or HF model dir')
  parser.add_argument('--split', default='test')
  parser.add_argument('--limit', type=int, default=None, help='first N examples only')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default latest)')
  parser.add_argument('--max_new_tokens', type=int, default=16)
  parser.add_argument('--json', default=None, help='write the result here')
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  sft = {}
  for item in rest:
    key, eq, value = item.partition('=')
    if not key.startswith('--sft.') or not eq:
      parser.error(f'unrecognized argument {item!r} (only --sft.KEY=VALUE)')
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    sft[key[len('--sft.'):]] = value

  import lmjax
  model = lmjax.load(args.workdir, args.step)
  res = model.exact_match(args.split, limit=args.limit, max_new_tokens=args.max_new_tokens,
                          sft=sft, keep=6)
  print(f'{model}\nexact match on {args.split}: {res["accuracy"]:.3f} '
        f'({res["correct"]}/{res["n"]})')
  for task, acc in res['by_task'].items():
    print(f'  {task:12s} {acc:.3f}')
  for prompt, answer, output, ok in res['samples']:
    question = prompt.strip().splitlines()[-2] if '\n' in prompt.strip() else prompt
    print(f'  {"ok " if ok else "BAD"} {question!r}: want {answer!r}, got {output[:40]!r}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({k: v for k, v in res.items() if k != 'samples'}, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
