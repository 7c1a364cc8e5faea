import glob
import subprocess
import sys

import pytest

from lmjax import config as config_lib

TINY = 'configs/pretrain_tiny.py'


def test_every_config_loads_and_validates():
  """Training configs validate; configs/data/ holds corpus-cleaning configs
  (tools/prepare_data.py), which build lmjax.data.quality's fields."""
  from lmjax.data import quality
  paths = sorted(glob.glob('configs/**/*.py', recursive=True))
  assert TINY in paths
  for path in paths:
    if path.startswith('configs/data/'):
      cfg = config_lib.build(path)
      assert set(cfg) == set(quality.default_config()), path
      continue
    cfg = config_lib.load(path)
    assert cfg.is_locked


def test_python_overrides_and_arg():
  cfg = config_lib.load(TINY, overrides={'optim.lr': 1e-3, 'train.steps': 7,
                                         'rules.length': 'tensor'})
  assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.rules.length == 'tensor'
  smoke = config_lib.load(TINY + ':smoke')
  assert smoke.train.steps == 20


@pytest.mark.parametrize('overrides, message', [
    ({'optim.lrr': 1.0}, r"unknown config key 'optim.lrr' \(did you mean \"lr\" instead"),
    ({'modle.d_model': 8}, r"unknown config key 'modle.d_model' \(did you mean \"model\""),
    ({'optim.lr': 'fast'}, r"config key 'optim.lr'"),
    ({'model.n_kv_heads': 3}, r'model.n_heads \(4\) must be a multiple of model.n_kv_heads \(3\)'),
    ({'model.remat': 'some'}, r"model.remat' must be one of"),
    ({'train.grad_accum': 3}, r'train.global_batch \(16\) must be divisible by train.grad_accum'),
    ({'mesh.data': 0}, r'mesh.data must be a positive size or -1'),
    ({'rules.mlp': 'model'}, r"rules.mlp names mesh axis 'model'"),
    ({'data.source': 'tfds'}, r"data.tfds_name must be set"),
])
def test_bad_overrides_name_the_key(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.load(TINY, overrides=overrides)


def test_config_file_with_unknown_field(tmp_path):
  p = tmp_path / 'bad.py'
  p.write_text('from lmjax import config\n'
               'def get_config(arg=None):\n'
               '  c = config.base_config()\n'
               '  c.train.stesp = 3\n'
               '  return c\n')
  # The locked base refuses the field in the config file itself: the file's line is named.
  with pytest.raises(config_lib.ConfigError, match=r'bad.py, line 4: get_config\(None\) '
                     r'raised AttributeError: Key "stesp" does not exist.* Did you mean '
                     r'"steps" instead of "stesp"\?$'):
    config_lib.load(str(p))
  with pytest.raises(config_lib.ConfigError, match='config file not found'):
    config_lib.load(str(tmp_path / 'missing.py'))


def test_round_trip_through_dict():
  cfg = config_lib.load(TINY)
  again = config_lib.from_dict(cfg.to_dict())
  assert again == cfg
  assert again.rules.batch == ('data', 'fsdp', 'expert')


def test_saved_configs_with_an_empty_data_path_meant_the_builtin_task():
  """Runs saved when an empty sft.path / dpo.path meant the built-in task still load."""
  for stage in ('sft', 'dpo'):
    d = config_lib.base_config().to_dict()
    d['stage'] = stage
    d[stage]['path'] = ''
    d['init_from']['path'] = '/runs/sft'
    assert config_lib.from_dict(d)[stage].path == 'builtin:synthetic'
  cfg = config_lib.base_config()
  cfg.stage, cfg.sft.path = 'sft', ''
  with pytest.raises(config_lib.ConfigError, match='sft.path'):
    config_lib.validate(cfg)  # a config the user writes must name it


@pytest.mark.parametrize('flag, message', [
    ('--config.optim.lrr=1', "unknown config key 'optim.lrr'"),
    ('--config.optim.lr=abc', "could not convert string to float: 'abc'"),
    ('--config.model.n_kv_heads=3', 'must be a multiple of model.n_kv_heads'),
])
def test_cli_rejects_bad_flags_before_starting(flag, message, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'lmjax.train', f'--config={TINY}', flag,
                        f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and 'Traceback' not in out.stderr
  assert out.stderr.startswith('error: ') and message in out.stderr
  assert not (tmp_path / 'checkpoints').exists()


def test_vocab_size_follows_the_tokenizer_unless_set():
  """model.vocab_size is a FieldReference to tokenizer.vocab_size: one override sets both;
  setting model.vocab_size itself (a padded embedding) unties them; saved resolved."""
  cfg = config_lib.load(TINY, flags=['--config.tokenizer.vocab_size=512'])
  assert cfg.tokenizer.vocab_size == cfg.model.vocab_size == 512
  cfg = config_lib.load(TINY, flags=['--config.tokenizer.vocab_size=500',
                                     '--config.model.vocab_size=512'])
  assert (cfg.tokenizer.vocab_size, cfg.model.vocab_size) == (500, 512)
  cfg.tokenizer.vocab_size = 256  # untied: the model keeps its own
  assert cfg.model.vocab_size == 512
  again = config_lib.from_dict(cfg.to_dict())
  assert again.is_locked and again.to_dict() == cfg.to_dict()


def test_command_line_values_are_parsed_by_their_field_type():
  cfg = config_lib.load(TINY, flags=['--config.train.progress_bar=false',
                                     '--config.rules.length=tensor',  # a placeholder(str)
                                     "--config.rules.batch=('data',)",
                                     '--config.optim.lr=1e-2', '--config.data.text_glob=a*.py'])
  assert cfg.train.progress_bar is False and cfg.rules.length == 'tensor'
  assert cfg.rules.batch == ('data',) and cfg.optim.lr == 0.01 and cfg.data.text_glob == 'a*.py'
  for flags, message in (
      (['--config.train.steps=1.5'], r"flag --config.train.steps=1.5: invalid literal for int"),
      (['--config.rules.length=3'], r"rules.length names mesh axis '3'"),  # a str: a name
      (['--config.optim.lrr=1'], r"unknown config key 'optim.lrr' \(did you mean \"lr\""),
      (['--workdir=x'], r"unexpected argument '--workdir=x'")):
    with pytest.raises(config_lib.ConfigError, match=message):
      config_lib.load(TINY, flags=flags)
