"""The AI judge's scorer speed: evaluate.choice_logprobs (one forward pass per judge prompt,
the vocabulary projection at the last position only) on a config's model, random weights.

  python tools/bench_judge.py --config=configs/bench/llama_125m.py --prompts=4096 --len=256 --batch=256
  python tools/bench_judge.py --config=configs/pretrain_tiny.py --prompts=256 --len=128 --batch=32
  python tools/bench_judge.py --config=configs/bench/llama_1b.py --config.model.dtype=float32

Prompts are random tokens of between len/2 and len tokens (a judge prompt: the template,
the question, two answers); the timed pass follows one that compiles every length bucket.
Prints comparisons/s (one comparison = one prompt: an ordering under a principle) and
tokens/s on this machine's default device (params as the config stores them, compute in
its model.dtype). Bad input: one line, `error: <reason>`, exit code 2.
"""

import argparse
import sys
import time

from lmjax import cli


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', required=True, help='an lmjax config file (its model)')
  parser.add_argument('--prompts', type=int, default=1024)
  parser.add_argument('--len', type=int, default=256, help='longest prompt, tokens')
  parser.add_argument('--batch', type=int, default=64, help='prompts per forward pass')
  parser.add_argument('--seed', type=int, default=0)
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)  # the rest: --config.KEY=VALUE
  if args.len < 2 or args.prompts < 1 or args.batch < 1:
    parser.error('--len must be >= 2, --prompts and --batch >= 1')

  import jax
  import ml_collections
  import numpy as np
  from flax import nnx
  from lmjax import config as config_lib
  from lmjax import evaluate
  from lmjax.models import transformer
  cfg = config_lib.load(args.config, flags=rest)
  graphdef, params = nnx.split(transformer.build(ml_collections.FrozenConfigDict(cfg.model)))
  params = jax.device_put(params)
  rng = np.random.default_rng(args.seed)
  vocab = cfg.model.vocab_size
  seqs = [rng.integers(3, vocab, int(rng.integers(args.len // 2, args.len + 1))).tolist()
          for _ in range(args.prompts)]
  choices = [[3, 4]] * args.prompts
  evaluate.choice_logprobs(graphdef, params, seqs, choices, batch_size=args.batch)
  t0 = time.perf_counter()
  out = evaluate.choice_logprobs(graphdef, params, seqs, choices, batch_size=args.batch)
  seconds = time.perf_counter() - t0
  if not np.all(np.isfinite(out)):
    print('error: non-finite log-probs', file=sys.stderr)
    return 1
  tokens = sum(map(len, seqs))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f'{jax.devices()[0].device_kind} | {args.config}: {n_params / 1e6:,.1f}M params | '
        f'{args.prompts} prompts of {args.len // 2}-{args.len} tokens ({tokens:,}), batch '
        f'{args.batch}: {seconds:.2f} s, {args.prompts / seconds:,.0f} comparisons/s, '
        f'{tokens / seconds:,.0f} tokens/s')
  return 0


if __name__ == '__main__':
  sys.exit(main())
