"""Writes a LoRA run's adapters merged into its base as a full lmjax checkpoint, and/or
the adapters alone in PEFT's format.

  python tools/merge_lora.py --workdir=/tmp/lmjax_sft --out=/tmp/lmjax_sft_merged [--step=N]
  python tools/merge_lora.py --workdir=/tmp/lmjax_sft --peft_dir=/tmp/sft_adapter

The merged checkpoint (W + s·A@B in the base's dtype, params only) loads with
lmjax.load(out) and as init_from of a later run (e.g. DPO), without the base model; a LoRA
workdir works as either of those too (merged on the fly). For a Hugging Face model of the
merged weights: python tools/convert_hf.py export --workdir=<this run> --out_dir=PATH.
The PEFT dir (adapter_model.safetensors + adapter_config.json) loads with
peft.PeftModel.from_pretrained(<the base exported to HF>, peft_dir).
Bad input: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

import argparse
import sys

from lmjax import cli


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--workdir', required=True, help='the LoRA run directory')
  parser.add_argument('--out', default=None, help='new lmjax workdir for the merged model')
  parser.add_argument('--peft_dir', default=None, help='directory for the PEFT adapter')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  cli.add_verbose_flag(parser)
  args = parser.parse_args(argv)
  if not args.out and not args.peft_dir:
    parser.error('give --out and/or --peft_dir')

  from lmjax import weights
  from lmjax.models import lora
  if args.out:
    step = weights.write_merged(args.workdir, args.out, args.step)
    print(f'merged step {step} of {args.workdir} -> {args.out}')
  if args.peft_dir:
    adapters, cfg, meta, step = weights.load_adapters(args.workdir, args.step)
    base = (meta.get('init_from') or {}).get('path')
    paths = lora.save_peft_adapter(adapters, cfg, args.peft_dir, base_model_name_or_path=base)
    print(f'adapters of step {step} ({lora.describe(cfg)}) -> {", ".join(paths)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
