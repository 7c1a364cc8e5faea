"""Converts between Hugging Face model directories and lmjax checkpoints.

  # HF (Llama, Mistral, Qwen2; config.json + *.safetensors) -> step-0 lmjax checkpoint:
  python tools/convert_hf.py import --hf_dir=PATH --workdir=DIR \\
      [--config=configs/x.py[:arg]] [--config.KEY=VALUE ...]
  python -m lmjax.train --config=configs/x.py --workdir=DIR   # continues from it

  # lmjax checkpoint (latest, or --step) -> HF directory (loads with transformers):
  python tools/convert_hf.py export --workdir=DIR --out_dir=PATH \\
      [--step=N] [--arch=llama|mistral|qwen2] [--dtype=bfloat16] [--max_shard_gb=4] [--overwrite]
      [--new_config]

import takes the model fields from config.json and everything else from --config (default
lmjax's base config); the model's tokenizer files (tokenizer.json or tokenizer.model,
tokenizer_config.json, the chat template), when it ships them, are copied into
DIR/tokenizer/ and exported back with the model. Params are read tensor by tensor onto
the config's mesh (--config.mesh.fsdp=-1 --config.mesh.data=1 to spread a large model
over the devices).
export of a model that came from Hugging Face (imported, or trained from one through
init_from) writes the source's config.json back unchanged but for its dtype (that of the
files: the source's unless --dtype asks for another), and its generation_config.json;
a model trained from scratch gets a config.json from its model config and tokenizer.
Bad input: one line, `error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

import argparse
import sys

from lmjax import cli

# lmjax.hf.ARCHS (not imported here: argument errors come before jax starts).
ARCHS = ('llama', 'mistral', 'qwen2', 'qwen3', 'mixtral', 'qwen2_moe', 'qwen3_moe')


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  sub = parser.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='HF model dir -> lmjax workdir (step 0)')
  imp.add_argument('--hf_dir', required=True, help='HF model dir (config.json, *.safetensors)')
  imp.add_argument('--workdir', required=True, help='new lmjax run directory')
  imp.add_argument('--config', default=None,
                   help='experiment config for the non-model fields (configs/*.py[:arg])')
  cli.add_verbose_flag(imp)
  exp = sub.add_parser('export', help='lmjax workdir -> HF model dir')
  exp.add_argument('--workdir', required=True, help='lmjax run directory')
  exp.add_argument('--out_dir', required=True, help='HF model dir to write')
  exp.add_argument('--step', type=int, default=None, help='checkpoint step (default: latest)')
  exp.add_argument('--arch', default=None, choices=ARCHS,
                   help="HF architecture (default: the source model's, else the one whose "
                   "network the model is: qwen3(_moe) with QK-norm, qwen2_moe with a shared "
                   "expert, mixtral for other MoE, qwen2 with q/k/v biases, else llama)")
  exp.add_argument('--dtype', default=None, choices=('float32', 'bfloat16', 'float16'),
                   help='dtype of the files (default: the source model\'s, else the params\')')
  exp.add_argument('--max_shard_gb', type=float, default=4.0,
                   help='split model files above this size (GiB)')
  exp.add_argument('--overwrite', action='store_true',
                   help='replace model files already in --out_dir')
  exp.add_argument('--new_config', action='store_true',
                   help='make config.json and generation_config.json from the model config '
                   'and tokenizer, not the source model\'s (for a model that no longer matches it)')
  cli.add_verbose_flag(exp)
  args, rest = parser.parse_known_args(argv)
  if rest and args.command != 'import':
    parser.error(f'unexpected arguments {rest}')
  return args, rest


@cli.main
def main(argv) -> int:
  args, flags = _parse(argv)
  from lmjax import config as config_lib
  if args.command == 'import':
    if args.config:
      base = config_lib.load(args.config, flags=flags)
    else:
      base = config_lib.apply_flags(config_lib.base_config(), flags)
  # Imported once the arguments and the config are checked: their errors come before jax
  # starts.
  from lmjax import hf, weights
  if args.command == 'import':
    cfg = hf.import_hf(args.hf_dir, args.workdir, base_cfg=base)
    m = cfg.model
    print(f'imported {args.hf_dir} -> {args.workdir} (step 0): {m.n_layers} layers, '
          f'd_model {m.d_model}, vocab {m.vocab_size}, tokenizer '
          f'{cfg.tokenizer.path or "none (set tokenizer.path)"}')
  else:
    written = weights.export_workdir(args.workdir, args.out_dir, step=args.step,
                                     arch=args.arch, dtype=args.dtype,
                                     overwrite=args.overwrite,
                                     source_config=not args.new_config,
                                     max_shard_bytes=int(args.max_shard_gb * 2**30))
    print(f'exported {args.workdir} -> {args.out_dir}: '
          + ', '.join(sorted(p.rsplit('/', 1)[-1] for p in written)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
