"""Bad input gets a clear error naming the field or file (issue 7). The cases tested
elsewhere: config typos (test_config.py), malformed JSONL lines skip/fail with file:line
(test_formats.py, test_preference.py), tokenizer vs model vocab (test_data.py, test_hf.py),
a mesh that does not divide the devices and a batch not divisible by the data-parallel
size (test_step.py), a resume with another model (test_train_loop.py), NaN loss
(test_train_loop.py), truncated, corrupt or non-safetensors model files and a malformed
config.json or index (test_hf.py), and how the command line reports all of these: one
line and exit code 2, the traceback with --verbose, a missing or failing --config file
(test_cli.py). Here: missing and corrupted checkpoint files, an empty dataset,
sequences that cannot fit data.seq_len, and pairs whose prompt fills seq_len (test_preference.py)."""

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
  cfg.sft.update(task_sizes=dict(train=50, validation=10, test=10), overlong='drop')
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
