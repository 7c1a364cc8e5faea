"""Cleans a corpus into a new TFDS dataset: dedup, quality filters, decontamination.

  python tools/prepare_data.py --config=configs/data/prepare_stdlib.py --out=/tmp/stdlib_clean \\
      [--config.workers=4] [--config.near_dedup.threshold=0.7] [--config.quality.enabled=False]
  python tools/prepare_data.py --config=... --out=... --runner=DirectRunner \\
      [--direct_num_workers=2 --direct_running_mode=multi_processing]

--runner runs the analysis and grouping as an Apache Beam pipeline (pip install
"lmjax[beam]"; DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...): every other
--option that is not --config.KEY=VALUE is a Beam pipeline option (--project, --region,
--temp_location, --flink_master, ...). The result is the same as without it.

The config (lmjax.data.quality.default_config() fields: the source as cfg.data, each step's
switch and thresholds, workers) is a Python file like the training configs; --config.KEY=
VALUE overrides a field. Writes <out>/tfds/prepared_text/<name>/1.0.0 (array_record),
<out>/report.json and <out>/report.md (documents and tokens in/out per step, examples of
removed documents, throughput), and prints the summary. Train on the result with
--config.data.source=tfds --config.data.tfds_name=<that directory>. Bad input: one line,
`error: <reason>`, exit code 2 (--verbose: with the traceback).
"""

import argparse
import os
import sys

from lmjax import cli


@cli.main
def main(argv) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split('\n\n', 1)[1])
  parser.add_argument('--config', required=True, help='a preparation config (configs/data/*.py)')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--runner', default='', help='an Apache Beam runner (default: local '
                      'processes, cfg.workers)')
  cli.add_verbose_flag(parser)
  args, rest = parser.parse_known_args(argv)
  from lmjax import config as config_lib
  from lmjax.data import quality
  beam_options = [a for a in rest if not a.startswith('--config.')] if args.runner else []
  cfg = config_lib.apply_flags(config_lib.lock(config_lib.build(args.config)),
                               [a for a in rest if a not in beam_options])
  report = quality.prepare(cfg, os.path.abspath(args.out), args.runner, beam_options)
  print(quality.summary(report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
