"""Bad input gets one clear line naming the field or file, and nothing is lost. This file
is the index; docs/errors.md is the table of what the user sees. Tested elsewhere:
- configs and the command line: typos in overrides (test_config.py); a missing or failing
  --config file, one line and exit code 2 for lmjax's errors, the traceback with --verbose
  or LMJAX_VERBOSE, a second Ctrl-C (test_cli.py); a mesh or batch the devices do not
  divide (test_step.py); train.wandb without wandb installed (test_tracking.py);
- data: pretraining corpora's bad records, empty shards, truncated files and a missing
  zstandard, failing with file:line / row or skipped and counted (test_corpora.py);
  malformed JSONL lines (test_formats.py, test_preference.py); an unset SFT/DPO path, a
  path without {split}, an eval split overlapping train, degenerate records (identical pairs, empty
  completions or assistant turns, no room for an answer) counted, dropped, warned or
  refused before compiling (test_data_check.py); tokenizer vs model vocab (test_data.py,
  test_hf.py); chat templates that cannot mark assistant tokens (test_tokenizers.py);
- models and checkpoints: a resume with another model (test_train_loop.py) or other LoRA
  settings (test_sft.py); init_from another architecture (test_dapt.py) or a model without
  a tokenizer (test_api.py); truncated, corrupt or non-safetensors files, malformed
  config.json or index, a failed import leaving nothing behind (test_hf.py); PEFT
  adapters with other settings (test_lora.py); inputs past a sliding window (an error) or
  the trained length (a warning) (test_api.py);
- faults: SIGTERM, a first Ctrl-C, kill -9 mid-save (test_preemption.py); a non-finite
  loss (test_train_loop.py); a resume from an earlier checkpoint in metrics.jsonl
  (test_train_loop.py).
Here: missing and corrupted checkpoint files, an empty dataset, sequences that cannot fit
data.seq_len, and a workdir that is a file or not writable."""

import glob
import os
import shutil

import pytest

import lmjax
from lmjax import checkpoint as ckpt_lib
from lmjax.data import formats, sources
from lmjax.data import tokenizer as tokenizer_lib
from lmjax.train import loop
from util import pretrain_cfg, sft_tokenizer


@pytest.fixture
def copy_of_base(base, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(base[1], workdir)
  (step,) = ckpt_lib.Checkpointer(workdir, None, read_only=True).all_steps()
  return workdir, os.path.join(workdir, 'checkpoints', str(step))


def test_missing_checkpoint_item_names_the_path(copy_of_base):
  workdir, step_dir = copy_of_base
  shutil.rmtree(os.path.join(step_dir, 'state'))
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=rf"{step_dir} is unreadable: its 'state' item \(FileNotFoundError: "
                     rf"{step_dir}/state is missing\); there is no earlier checkpoint"):
    lmjax.load(workdir)


def test_truncated_array_file_is_reported_not_a_traceback(copy_of_base):
  workdir, step_dir = copy_of_base
  # Every array data file (which one holds the params varies with the write order).
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(min(100, os.path.getsize(path) // 2))
  with pytest.raises(ckpt_lib.CheckpointError, match=rf"{step_dir} is unreadable: its "
                     r"'state' item"):
    lmjax.load(workdir)


def test_corrupt_config_json(copy_of_base, base):
  workdir, step_dir = copy_of_base
  with open(os.path.join(step_dir, 'config', 'metadata'), 'w') as f:
    f.write('{"model": ')
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=rf"{step_dir} is unreadable: its 'config' item \(JSONDecodeError"):
    loop.train(pretrain_cfg(base[0]), workdir)  # a resume reads it first


def test_empty_dataset(tmp_path):
  (tmp_path / 'text').mkdir()
  for i in range(3):
    (tmp_path / 'text' / f'{i}.txt').write_text('')
  cfg = pretrain_cfg(tmp_path)
  with pytest.raises(sources.DataError, match=r"data.text_glob '.*text/\*.txt': none of its "
                     r'3 files is non-empty UTF-8 text \(0 not UTF-8, 3 empty\)'):
    tokenizer_lib.load_tokenizer(cfg)


def test_sequences_that_cannot_fit_seq_len(tmp_path):
  cfg = pretrain_cfg(tmp_path)
  cfg.stage = 'sft'
  cfg.sft.update(path='builtin:synthetic', task_sizes=dict(train=50, validation=10, test=10),
                 overlong='drop')
  cfg.data.update(seq_len=8, data_dir=str(tmp_path / 'tfds'))
  tok = sft_tokenizer(tmp_path)
  it = formats.make_sft_iterator(cfg, tok, 'train', batch_size=2)
  with pytest.raises(sources.DataError, match=r'train.jsonl: 50 examples in a row are longer '
                     r"than data.seq_len=8 \(sft.overlong='drop'.*raise data.seq_len"):
    next(it)
  it.close()


def test_unusable_workdir_fails_before_anything_expensive(tmp_path, monkeypatch):
  cfg = pretrain_cfg(tmp_path)
  (tmp_path / 'afile').write_text('x')
  with pytest.raises(loop.WorkdirError, match=r'--workdir .*afile is a file, not a directory'):
    loop.train(cfg, str(tmp_path / 'afile'))

  def read_only(*args, **kwargs):  # the tests may run as root, which ignores permissions
    raise OSError(30, 'Read-only file system')
  monkeypatch.setattr(loop.tempfile, 'NamedTemporaryFile', read_only)
  with pytest.raises(loop.WorkdirError, match=r'--workdir .*ro is not writable \(Read-only '
                     r'file system\); choose a writable directory'):
    loop.train(cfg, str(tmp_path / 'ro'))
  assert not (tmp_path / 'tfds').exists()  # nothing was built before the check
