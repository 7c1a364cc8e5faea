"""Launches an lmjax config on a Cloud TPU VM (single host or a multi-host pod slice).

  python tools/launch_tpu.py --name=my-v4 --zone=us-central2-b --accelerator=v4-32 \\
      --config=configs/pretrain_tiny.py --workdir=/mnt/runs/tiny [--config.KEY=VALUE ...] \\
      [--bucket=my-bucket] [--queued] [--spot] [--project=P] [--steps=create,install,run] \\
      [--dry-run]

Steps (each a `gcloud compute tpus ...` command; --dry-run prints them, runs nothing):
  create   the TPU VM (`tpu-vm create`), or with --queued a queued resource
           (`queued-resources create`; it is granted when capacity frees up: run
           --steps=create first, then --steps=install,run once `describe` says ACTIVE).
  install  on every worker (--worker=all): copy this checkout (a `git archive` tarball, so
           exactly the committed code), `pip install -e .` it, and with --bucket mount the
           bucket with gcsfuse at /mnt/<bucket> (every worker must see the same workdir:
           checkpoints are written jointly; --rename-dir-limit lets Orbax commit).
  run      start `python -m lmjax.train --config=... --workdir=... <overrides>` on every
           worker with the same arguments, in the background, logging to ~/lmjax_train.log.
           JAX finds the other workers itself (lmjax.distributed: TPU VM detection).
  logs     tail the log of worker 0.
  delete   delete the VM (or the queued resource).
The default --steps is create,install,run. The config and overrides are checked here
first: bad input prints one line, `error: <reason>`, exit code 2 (--verbose: with the
traceback).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys

from lmjax import cli

DEFAULT_STEPS = ('create', 'install', 'run')
ALL_STEPS = ('create', 'install', 'run', 'logs', 'delete')
LOG = '~/lmjax_train.log'
TARBALL = 'lmjax_src.tar.gz'
GCSFUSE_INSTALL = (  # Google's apt repository for gcsfuse (not in the TPU VM images)
    'echo "deb https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" | '
    'sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s '
    'https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && '
    'sudo apt-get update -q && sudo apt-get install -y -q gcsfuse')


def _gcloud(args, *extra) -> list[str]:
  cmd = ['gcloud', 'compute', 'tpus', *extra, f'--zone={args.zone}']
  if args.project:
    cmd.append(f'--project={args.project}')
  return cmd


def _ssh(args, command: str, worker: str = 'all') -> list[str]:
  return _gcloud(args, 'tpu-vm', 'ssh', args.name) + [f'--worker={worker}',
                                                      f'--command={command}']


def commands(args, overrides: list[str]) -> list[tuple[str, list[str]]]:
  """(step, argv) for each command of args.steps, in order."""
  out = []
  for step in args.steps:
    if step == 'create' and args.queued:
      cmd = _gcloud(args, 'queued-resources', 'create', f'{args.name}-qr') + [
          f'--node-id={args.name}', f'--accelerator-type={args.accelerator}',
          f'--runtime-version={args.version}']
      cmd += ['--spot'] if args.spot else []
      out.append((step, cmd))
      out.append((step, _gcloud(args, 'queued-resources', 'describe', f'{args.name}-qr')
                  + ['--format=value(state.state)']))
    elif step == 'create':
      cmd = _gcloud(args, 'tpu-vm', 'create', args.name) + [
          f'--accelerator-type={args.accelerator}', f'--version={args.version}']
      cmd += ['--spot'] if args.spot else []
      out.append((step, cmd))
    elif step == 'install':
      out.append((step, ['git', '-C', args.source, 'archive', '--format=tar.gz',
                         f'--output={TARBALL}', 'HEAD']))
      out.append((step, _gcloud(args, 'tpu-vm', 'scp', TARBALL, f'{args.name}:~/')
                  + ['--worker=all']))
      setup = (f'mkdir -p ~/lmjax && tar -xzf ~/{TARBALL} -C ~/lmjax && '
               f'pip install -q -e ~/lmjax "jax[tpu]"')
      if args.bucket:
        mount = f'/mnt/{args.bucket}'
        setup += (f' && (command -v gcsfuse || {GCSFUSE_INSTALL}) && sudo mkdir -p {mount} && '
                  f'sudo chown $USER {mount} && '
                  f'gcsfuse --implicit-dirs --rename-dir-limit=200000 {args.bucket} {mount}')
      out.append((step, _ssh(args, setup)))
    elif step == 'run':
      train = ['python', '-m', 'lmjax.train', f'--config={args.config}',
               f'--workdir={args.workdir}', '--config.train.progress_bar=False', *overrides]
      command = (f'cd ~/lmjax && nohup {" ".join(shlex.quote(a) for a in train)} '
                 f'> {LOG} 2>&1 &')
      out.append((step, _ssh(args, command)))
    elif step == 'logs':
      out.append((step, _ssh(args, f'tail -n 50 {LOG}', worker='0')))
    elif step == 'delete':
      if args.queued:
        out.append((step, _gcloud(args, 'queued-resources', 'delete', f'{args.name}-qr')
                    + ['--force', '--quiet']))
      else:
        out.append((step, _gcloud(args, 'tpu-vm', 'delete', args.name) + ['--quiet']))
  return out


def parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--name', required=True, help='TPU VM name')
  parser.add_argument('--zone', required=True)
  parser.add_argument('--project', default='')
  parser.add_argument('--accelerator', default='v4-8', help='e.g. v4-32, v5litepod-16')
  parser.add_argument('--version', default='tpu-ubuntu2204-base',
                      help='TPU VM runtime version (software image)')
  parser.add_argument('--queued', action='store_true', help='use queued-resources')
  parser.add_argument('--spot', action='store_true', help='spot (preemptible) capacity')
  parser.add_argument('--bucket', default='', help='mount gs://BUCKET at /mnt/BUCKET')
  parser.add_argument('--source', default='.', help='the lmjax checkout to ship')
  parser.add_argument('--config', default='configs/pretrain_tiny.py')
  parser.add_argument('--workdir', default='')
  parser.add_argument('--steps', default=','.join(DEFAULT_STEPS),
                      help=f'comma-separated, of {",".join(ALL_STEPS)}')
  parser.add_argument('--dry-run', action='store_true', help='print the commands only')
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  bad = [a for a in rest if not a.startswith('--config.') or '=' not in a]
  if bad:
    parser.error(f'unexpected arguments {bad} (config overrides are --config.KEY=VALUE)')
  args.steps = [s for s in args.steps.split(',') if s]
  unknown = [s for s in args.steps if s not in ALL_STEPS]
  if unknown:
    parser.error(f'--steps: unknown {unknown}; known: {list(ALL_STEPS)}')
  if 'run' in args.steps and not args.workdir:
    parser.error('--workdir is required for the run step (a path every worker sees, e.g. '
                 '/mnt/<bucket>/runs/NAME with --bucket)')
  return args, rest


@cli.main
def main(argv) -> int:
  args, overrides = parse(argv)
  if 'run' in args.steps:  # the config and overrides are checked here, not on the VM
    from lmjax import config as config_lib  # pylint: disable=import-outside-toplevel
    config_lib.load(args.config, flags=overrides)
  for step, cmd in commands(args, overrides):
    print(f'[{step}] {shlex.join(cmd)}', flush=True)
    if not args.dry_run:
      proc = subprocess.run(cmd, check=False)
      if proc.returncode:
        print(f'launch_tpu: step {step!r} failed (exit {proc.returncode})', file=sys.stderr)
        return proc.returncode
  return 0


if __name__ == '__main__':
  sys.exit(main())
