"""Writes the built-in synthetic SFT task as JSONL (messages format).

    python tools/make_sft_task.py --out /tmp/sft_task --seed 0 --train 20000
    # -> /tmp/sft_task/{train,validation,test}.jsonl; train with sft.path='/tmp/sft_task/{split}.jsonl'
"""

import argparse
import os
import sys

from lmjax import cli
from lmjax.data import sft_task


@cli.main
def main(argv) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--train', type=int, default=20000)
  p.add_argument('--validation', type=int, default=500)
  p.add_argument('--test', type=int, default=500)
  p.add_argument('--tasks', default=','.join(sft_task.TASKS),
                 help=f'comma-separated subset of {",".join(sft_task.TASKS)}')
  cli.add_verbose_flag(p)
  a = p.parse_args(argv)
  tasks = tuple(t.strip() for t in a.tasks.split(',') if t.strip())
  unknown = sorted(set(tasks) - set(sft_task.TASKS))
  if unknown or not tasks:
    p.error(f'unknown tasks {unknown}; known: {sft_task.TASKS}')
  sizes = {'train': a.train, 'validation': a.validation, 'test': a.test}
  root = sft_task.write_task(a.out, a.seed, sizes, tasks)
  for split, n in sizes.items():
    print(f'{os.path.join(root, split + ".jsonl")}: {n} examples')
  return 0


if __name__ == '__main__':
  sys.exit(main())
