"""The AI-feedback loop on the tiny recipe, measured: an AI judge labels the SFT model's own
answers, and DPO (or KTO) on those labels, with no human (or task) label in the loop.

  python experiments/recipe_tiny.py --root=/tmp/lmjax_recipe --stages=pretrain,sft
  python experiments/ai_feedback_tiny.py --root=/tmp/lmjax_recipe     # ~13 min, 2 cores
  python experiments/ai_feedback_tiny.py --root=/tmp/r --smoke        # ~1 min (CI)

1. judge: lmjax fine-tunes the judge (full SFT of the SFT model, configs/sft_lora_tiny.py
   with lora.enabled=False, 800 steps; --judge_lora=1 for LoRA) on judge prompts of
   configs/constitution_tiny.json (ai_feedback.judge_sft_examples): the built-in task's
   train-split questions, the right answer and a plausible wrong one (data/sft_task.py
   `make_pairs`) in a random order, the right one's option the answer.
   (--judge_data=policy adds pairs of the SFT model's own samples, one right and one
   wrong, on train questions.) Its agreement with the truth is measured on test-split
   questions it never saw.
2. label: the SFT model (the policy) answers each train / validation question twice
   (temperature 1); the judge compares the two answers under --principles principles, both
   orderings (tools/ai_feedback.py judge). Pairs with one right and one wrong answer
   measure the judge's agreement on the policy's own answers.
3. align: DPO with dpo.soft_labels (configs/dpo_tiny.py, the labels as its data) or KTO
   (configs/kto_tiny.py; liked iff p > 0.5, weight |2p - 1|), from the SFT model.
4. The SFT and aligned models' greedy exact match on the test split, before and after.
Writes <root>/ai_feedback.json and prints a table. Stages whose output exists are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import recipe_tiny  # experiments/: the recipe whose SFT model this loop starts from

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTITUTION = os.path.join(ROOT, 'configs', 'constitution_tiny.json')
SFT = {'template': 'chatml', 'path': 'builtin:synthetic', 'source': 'jsonl'}


def _train(config: str, arg: str, workdir: str, overrides: dict) -> float:
  from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from lmjax.train import loop  # pylint: disable=import-outside-toplevel
  cfg = config_lib.build(os.path.join(ROOT, config), arg)
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  if recipe_tiny.finished(workdir, cfg.train.steps):
    print(f'{workdir}: done, not retrained', flush=True)
    return 0.0
  t0 = time.perf_counter()
  loop.train(cfg, workdir)
  return time.perf_counter() - t0


def _agreement(judge, pairs) -> float:
  """The share of (prompt, right, wrong) pairs the judge prefers the right answer of."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  res = judge.compare([p for p, _, _ in pairs], [r for _, r, _ in pairs],
                      [w for _, _, w in pairs], seed=1)
  return float(np.mean(res.p > 0.5))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--root', default='/tmp/lmjax_recipe',
                      help='holds <root>/sft (experiments/recipe_tiny.py)')
  parser.add_argument('--smoke', action='store_true', help='short runs (what CI runs)')
  parser.add_argument('--objective', default='dpo', choices=('dpo', 'kto'))
  parser.add_argument('--principles', type=int, default=2, help='per comparison (K)')
  parser.add_argument('--judge_steps', type=int, default=800)
  parser.add_argument('--judge_lr', type=float, default=1e-3)
  parser.add_argument('--judge_batch', type=int, default=32)
  parser.add_argument('--judge_lora', type=int, default=0, help='1: LoRA SFT, 0: full')
  parser.add_argument('--judge_data', default='task', choices=('task', 'policy'),
                      help="task: right vs plausible wrong answers; policy: plus the SFT "
                      "model's own pairs of one right and one wrong sample (train split)")
  parser.add_argument('--questions', type=int, default=2000, help='train questions labelled')
  parser.add_argument('--min_confidence', type=float, default=0.0)
  args = parser.parse_args(argv)
  smoke = args.smoke
  if smoke:
    args.judge_steps, args.questions, args.judge_batch = 10, 32, 16
  root = os.path.abspath(args.root)
  sft_dir = os.path.join(root, 'sft')
  if not os.path.isdir(sft_dir):
    print(f'=== {sft_dir} missing: running the recipe\'s pretrain and sft stages', flush=True)
    subprocess.run([sys.executable, os.path.join(ROOT, 'experiments', 'recipe_tiny.py'),
                    f'--root={root}', '--stages=pretrain,sft'] + (['--smoke'] if smoke else []),
                   check=True)

  import lmjax  # pylint: disable=import-outside-toplevel
  from lmjax import ai_feedback  # pylint: disable=import-outside-toplevel
  from lmjax.data import sft_task  # pylint: disable=import-outside-toplevel
  constitution = ai_feedback.Constitution.load(CONSTITUTION)
  out = {'objective': args.objective, 'principles': args.principles, 'smoke': smoke}

  # 1. The judge.
  print(f'\n=== 1. judge: {"LoRA" if args.judge_lora else "full"} SFT of the SFT model on '
        'judge prompts', flush=True)
  name = (f'{"lora" if args.judge_lora else "full"}{args.judge_steps}'
          + ('_policy' if args.judge_data == 'policy' else ''))
  data = os.path.join(root, f'judge_data_{name}')
  as_triples = lambda pairs: [(p['prompt'][0]['content'], p['chosen'][0]['content'],
                               p['rejected'][0]['content']) for p in pairs]
  sizes = {'train': 400 if smoke else 8000, 'validation': 64}
  for split, n in sizes.items():
    triples = as_triples(sft_task.make_pairs(n, seed=7, split=split))
    if args.judge_data == 'policy' and split == 'train':  # the policy's own mistakes
      policy = lmjax.load(sft_dir)
      records = [(p['messages'][:1], p['messages'][1]['content'])
                 for p in sft_task.make_examples(n, seed=5, split='train')]
      a, b, _, _ = ai_feedback.sample_pairs(policy, [r[0] for r in records], seed=5,
                                            max_new_tokens=16, template='chatml')
      own = [(q[0]['content'], x, y) if x.strip() == ans else (q[0]['content'], y, x)
             for (q, ans), x, y in zip(records, a, b) if (x.strip() == ans) != (y.strip() == ans)]
      print(f'judge data: {len(own)} pairs of the policy\'s samples, one right', flush=True)
      triples += own
    ai_feedback.write_jsonl(os.path.join(data, f'{split}.jsonl'), ai_feedback.judge_sft_examples(
        constitution, triples, seed=7))
  judge_dir = os.path.join(root, f'judge_{name}')
  out['judge_train_s'] = _train('configs/sft_lora_tiny.py', ('smoke:' if smoke else '') + sft_dir,
                                judge_dir, {
                                    'sft.path': os.path.join(data, '{split}.jsonl'),
                                    'sft.eval_examples': 0, 'data.seq_len': 128,
                                    'train.steps': args.judge_steps,
                                    'optim.lr': args.judge_lr,
                                    'train.global_batch': args.judge_batch,
                                    'lora.enabled': bool(args.judge_lora),
                                    'train.eval_every': max(args.judge_steps // 2, 1),
                                    'train.sample_at_end': False})
  judge = ai_feedback.Judge(lmjax.load(judge_dir), constitution,
                            principles_per_comparison=args.principles)
  test_pairs = as_triples(sft_task.make_pairs(100 if smoke else 500, seed=3, split='test'))
  out['judge_agreement_test_pairs'] = _agreement(judge, test_pairs)
  print(f'judge agreement with the right answer, {len(test_pairs)} held-out test pairs: '
        f'{out["judge_agreement_test_pairs"]:.3f}', flush=True)

  # 2. Labels of the policy's own answers.
  print('\n=== 2. label: the SFT model answers twice, the judge compares', flush=True)
  policy = lmjax.load(sft_dir)
  labels = os.path.join(root, f'ai_labels_{name}_k{args.principles}')
  stats = {}
  for split, n in (('train', args.questions), ('validation', max(args.questions // 10, 32))):
    records = ai_feedback.read_prompts('builtin:synthetic', split=split, limit=n)
    prompts = [p for p, _ in records]
    a, b, n_tok, gen_s = ai_feedback.sample_pairs(policy, prompts, seed=11, max_new_tokens=16,
                                                  temperature=1.0, template='chatml')
    res = judge.compare(prompts, a, b, seed=11)
    recs, counts = ai_feedback.label_records(prompts, a, b, res.p,
                                             columns=[c for _, c in records],
                                             min_confidence=args.min_confidence)
    ai_feedback.write_jsonl(os.path.join(labels, f'{split}.jsonl'), recs)
    right = lambda text, c: text.strip() == c['answer'].strip()
    decisive = [(i, right(a[i], c)) for i, (_, c) in enumerate(records)
                if right(a[i], c) != right(b[i], c)]
    agree = sum((res.p[i] > 0.5) == a_right for i, a_right in decisive)
    stats[split] = dict(counts, generated_tokens_per_s=n_tok / gen_s,
                        comparisons_per_s=res.p_first.size / res.seconds,
                        position_bias=res.position_bias, decisive_pairs=len(decisive),
                        judge_agreement_policy_pairs=agree / max(len(decisive), 1))
    print(f'{split}: {counts["kept"]} pairs labelled ({counts["identical"]} identical '
          f'answers dropped); {len(decisive)} with one right answer, the judge picks it in '
          f'{agree / max(len(decisive), 1):.3f}; {n_tok / gen_s:,.0f} generated tokens/s, '
          f'{res.p_first.size / res.seconds:,.1f} comparisons/s, position bias '
          f'{res.position_bias:+.3f}', flush=True)
  out['labels'] = stats

  # 3. Align on the labels.
  print(f'\n=== 3. {args.objective} on the judge\'s labels', flush=True)
  aligned = os.path.join(root, f'ai_{args.objective}_{name}_k{args.principles}')
  path = os.path.join(labels, '{split}.jsonl')
  if args.objective == 'dpo':
    overrides = {'dpo.path': path, 'dpo.soft_labels': True}
  else:
    overrides = {'kto.path': path}
  out['align_train_s'] = _train(f'configs/{args.objective}_tiny.py',
                                ('smoke:' if smoke else '') + sft_dir, aligned, overrides)

  # 4. Before and after.
  print('\n=== 4. test exact match (greedy)', flush=True)
  limit = 24 if smoke else None
  for stage, workdir in (('sft', sft_dir), (args.objective, aligned)):
    em = lmjax.load(workdir).exact_match('test', limit=limit, sft=SFT)
    out[f'test_exact_match_{stage}'] = em['accuracy']
    out['test_n'] = em['n']
    print(f'{stage}: {em["accuracy"]:.3f} ({em["correct"]}/{em["n"]})', flush=True)

  tr = stats['train']
  print('\n| judge agreement (held-out pairs) | judge agreement (policy pairs, train) '
        f'| labelled pairs | test EM sft | test EM {args.objective} |\n|---|---|---|---|---|\n'
        f'| {out["judge_agreement_test_pairs"]:.3f} | {tr["judge_agreement_policy_pairs"]:.3f} '
        f'({tr["decisive_pairs"]}) | {tr["kept"]} | {out["test_exact_match_sft"]:.3f} | '
        f'{out[f"test_exact_match_{args.objective}"]:.3f} |')
  with open(os.path.join(root, 'ai_feedback.json'), 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=2)
  return 0


if __name__ == '__main__':
  sys.exit(main())
