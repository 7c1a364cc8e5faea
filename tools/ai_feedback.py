"""AI feedback from a written constitution (Constitutional AI): critique-and-revise SFT data,
and AI preference labels for a reward model, DPO or KTO.

  # supervised stage: answer, critique under a principle, revise (N rounds)
  python tools/ai_feedback.py revise --policy=/tmp/lmjax_recipe/sft \\
      --constitution=configs/constitution_tiny.json --prompts=builtin:synthetic \\
      --split=train --limit=256 --rounds=1 --out=/tmp/cai/revised.jsonl
  # preference stage: sample two answers per prompt, the judge labels them
  python tools/ai_feedback.py judge --judge=/tmp/judge --policy=/tmp/lmjax_recipe/sft \\
      --constitution=configs/constitution_tiny.json --prompts=builtin:synthetic \\
      --split=train --limit=1024 --principles=2 --out=/tmp/cai/labels.jsonl
  # ... or label existing pairs ({prompt, chosen, rejected}), keeping their orientation
  python tools/ai_feedback.py judge --judge=/tmp/judge --pairs=pairs.jsonl \\
      --constitution=configs/constitution_tiny.json --out=/tmp/cai/labels.jsonl

Models (--policy, --judge) are lmjax workdirs or Hugging Face directories (lmjax.load:
all of this machine's devices, parameters FSDP-sharded). Prompts: a JSONL file of prompt
records ({"prompt": str | messages} or {"messages": [..., assistant]}; other fields are
kept as columns) or builtin:synthetic (the built-in task's --split questions).

revise writes {prompt, messages, chosen, rejected, revisions} a prompt: messages and
chosen end with the final revision, rejected with the first answer (SFT reads messages,
DPO and KTO the pair). judge writes {prompt, chosen, rejected, p} a pair, p = p(chosen >
rejected) averaged over both orderings and --principles principles; sampled pairs are
oriented so the judge's pick is chosen, identical answers are dropped; --min_confidence
drops near-ties (max(p, 1 - p) below it) and --clamp=0.4,0.6 clamps p (after the drop).
The labels train a soft-label reward model (p is the label), DPO with
--config.dpo.soft_labels=True, and KTO (liked iff p > 0.5, weight |2p - 1|) as they are.
A fixed --seed gives the same file. Prints comparisons/s and generated tokens/s. Bad
input: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

import argparse
import sys

from lmjax import cli


def _clamp(text):
  try:
    lo, hi = (float(x) for x in text.split(','))
  except ValueError:
    raise argparse.ArgumentTypeError(f'--clamp takes LO,HI (e.g. 0.4,0.6), got {text!r}')
  return lo, hi


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  sub = parser.add_subparsers(dest='command', required=True)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--constitution', required=True, help='constitution JSON file')
  common.add_argument('--out', required=True, help='JSONL file to write')
  common.add_argument('--prompts', default=None,
                      help='prompt records (JSONL) or builtin:synthetic')
  common.add_argument('--split', default='train', help='builtin:synthetic split')
  common.add_argument('--limit', type=int, default=None, help='first N prompts / pairs')
  common.add_argument('--seed', type=int, default=0)
  common.add_argument('--max_new_tokens', type=int, default=64)
  common.add_argument('--temperature', type=float, default=1.0)
  common.add_argument('--top_p', type=float, default=1.0)
  common.add_argument('--top_k', type=int, default=0)
  common.add_argument('--batch_size', type=int, default=64,
                      help='sequences per generation / scoring call')
  common.add_argument('--template', default=None,
                      help="chat template (default: each model's sft.template)")
  cli.add_verbose_flag(common)
  rev = sub.add_parser('revise', parents=[common], help='critique-and-revise SFT data')
  rev.add_argument('--policy', required=True, help='lmjax workdir or HF model dir')
  rev.add_argument('--rounds', type=int, default=1, help='critique-revision rounds')
  jud = sub.add_parser('judge', parents=[common], help='AI preference labels')
  jud.add_argument('--judge', required=True, help='lmjax workdir or HF model dir')
  jud.add_argument('--policy', default=None, help='samples two answers per prompt')
  jud.add_argument('--pairs', default=None, help='JSONL pairs to label instead')
  jud.add_argument('--principles', type=int, default=1,
                   help='principles per comparison (K)')
  jud.add_argument('--clamp', type=_clamp, default=None, help='LO,HI: clamp p, e.g. 0.4,0.6')
  jud.add_argument('--min_confidence', type=float, default=0.0,
                   help='drop pairs with max(p, 1 - p) below this')
  args = parser.parse_args(argv)

  import lmjax
  from lmjax import ai_feedback
  constitution = ai_feedback.Constitution.load(args.constitution)
  gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_k=args.top_k, top_p=args.top_p, template=args.template,
             batch_size=args.batch_size)
  if args.command == 'revise':
    if not args.prompts:
      parser.error('revise needs --prompts')
    records = ai_feedback.read_prompts(args.prompts, split=args.split, limit=args.limit)
    policy = lmjax.load(args.policy)
    print(f'policy {policy}\n{len(records)} prompts, {args.rounds} round(s) of critique and '
          f'revision under {len(constitution.principles)} principles', flush=True)
    progress = lambda r, n: print(f'  round {r}/{n} done', flush=True)
    out = ai_feedback.revise(policy, constitution, [p for p, _ in records], rounds=args.rounds,
                             seed=args.seed, progress=progress, **gen)
    for rec, (_, cols) in zip(out.records, records):
      rec.update((k, v) for k, v in cols.items() if k not in ai_feedback.RESERVED)
    ai_feedback.write_jsonl(args.out, out.records)
    changed = sum(r['chosen'][-1]['content'] != r['rejected'][-1]['content']
                  for r in out.records)
    print(f'wrote {len(out.records)} records to {args.out} ({changed} revised answers differ '
          f'from the first); generated {out.generated_tokens:,} tokens in {out.seconds:.1f} s: '
          f'{out.generated_tokens / max(out.seconds, 1e-9):,.0f} tokens/s')
    return 0

  if (args.pairs is None) == (args.prompts is None):
    parser.error('judge needs --prompts (with --policy: two answers are sampled) or --pairs')
  judge = ai_feedback.Judge(lmjax.load(args.judge), constitution,
                            principles_per_comparison=args.principles,
                            template=args.template, batch_size=args.batch_size)
  print(f'judge {judge.model}', flush=True)
  if args.pairs:
    pairs = ai_feedback.read_pair_records(args.pairs, limit=args.limit)
    prompts = [p if not (len(p) == 1 and isinstance(rec.get('prompt'), str))
               else p[0]['content'] for p, _, _, rec in pairs]
    a, b = [x[1] for x in pairs], [x[2] for x in pairs]
    columns, orient = [rec for *_, rec in pairs], False
  else:
    if not args.policy:
      parser.error('judge --prompts needs --policy to sample the two answers')
    records = ai_feedback.read_prompts(args.prompts, split=args.split, limit=args.limit)
    policy = lmjax.load(args.policy)
    print(f'policy {policy}: sampling 2 answers to each of {len(records)} prompts', flush=True)
    prompts = [p for p, _ in records]
    a, b, n_tok, secs = ai_feedback.sample_pairs(policy, prompts, seed=args.seed, **gen)
    print(f'generated {n_tok:,} tokens in {secs:.1f} s: {n_tok / max(secs, 1e-9):,.0f} '
          'tokens/s', flush=True)
    columns, orient = [c for _, c in records], True
  res = judge.compare(prompts, a, b, seed=args.seed)
  n_cmp = res.p_first.size
  print(f'judged {len(prompts)} pairs x {args.principles} principle(s) x 2 orderings = '
        f'{n_cmp} forward passes in {res.seconds:.1f} s: {n_cmp / max(res.seconds, 1e-9):,.1f} '
        f'comparisons/s; position bias {res.position_bias:+.3f}', flush=True)
  out, counts = ai_feedback.label_records(prompts, a, b, res.p, columns=columns,
                                          orient=orient, clamp=args.clamp,
                                          min_confidence=args.min_confidence,
                                          keep_records=bool(args.pairs))
  ai_feedback.write_jsonl(args.out, out)
  agree = ''
  if args.pairs:
    agree = f'; the judge agrees with the file\'s chosen on {float((res.p > 0.5).mean()):.3f}'
  print(f'wrote {counts["kept"]} labelled pairs to {args.out} (of {counts["pairs"]}: '
        f'{counts["identical"]} identical answers and {counts["near_ties"]} near-ties '
        f'dropped){agree}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
