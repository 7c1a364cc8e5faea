"""The notebook API and evaluation: lmjax.load of a workdir (resharded onto other devices)
and of a Hugging Face dir, generate/score against transformers, perplexity, exact match,
and a PEFT adapter merged on load."""

import math
import os

import jax
import numpy as np
import pytest

import lmjax
from lmjax import evaluate, generate
from lmjax.train import loop
from util import tiny_config, write_corpus

VOCAB = 384


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A short pretraining run on 8 devices (data parallel)."""
  root = tmp_path_factory.mktemp('api')
  cfg = tiny_config(vocab_size=VOCAB)
  cfg.data.update(source='local_text', text_glob=write_corpus(root / 'text', n_files=40),
                  data_dir=str(root / 'tfds'), val_fraction=0.1)
  cfg.tokenizer.update(vocab_size=VOCAB, max_sentences=20_000)
  cfg.train.update(steps=30, log_every=10, eval_every=30, eval_batches=2)
  cfg.optim.update(lr=3e-3, warmup_steps=2)
  cfg.checkpoint.update(every=10, keep=5, async_save=False)
  cfg.mesh.update(data=-1)
  workdir = str(root / 'run')
  return workdir, loop.train(cfg, workdir)


def test_load_workdir_on_one_device_equals_trained_params(run):
  workdir, result = run
  m = lmjax.load(workdir, devices=jax.devices()[:1])
  assert m.step == 30 and m.mesh.devices.size == 1
  trained = jax.device_get(result.state['params'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(m.params), trained)
  assert m.tokenizer.path == result.tokenizer.path
  assert m.config.model.vocab_size == VOCAB
  # An earlier step, on all 8 devices FSDP-sharded, differs from the last.
  m10 = lmjax.load(workdir, step=10)
  assert m10.step == 10 and m10.mesh.shape['fsdp'] == 8
  emb = m10.params['embed']
  assert len(emb.sharding.device_set) == 8
  assert not np.array_equal(np.asarray(emb), trained['embed'])
  with pytest.raises(Exception, match='step 7'):
    lmjax.load(workdir, step=7)


def test_generate_and_score_agree(run):
  workdir, _ = run
  m = lmjax.load(workdir)
  prompts = ['def f_', 'the model', 'return x *']
  texts = m.generate(prompts, max_new_tokens=12)
  assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
  assert m.generate('def f_', max_new_tokens=12) == texts[0]  # str in, str out, batch-free
  # Greedy: each generated token is the argmax under score's per-token log-probs, i.e.
  # score and generate see the same model.
  ids = [m.encode(p) for p in prompts]
  out = m.generate_ids(ids, max_new_tokens=6)
  for i, p in enumerate(ids):
    gen = out.ids()[i]
    full = p + gen
    lp = m.score_ids([full])[0]
    # log p(gen token | prefix) equals the max log-prob at that position.
    logits_max = _max_logprob_per_position(m, full)
    np.testing.assert_allclose(lp[len(p) - 1:], logits_max[len(p) - 1:], atol=1e-5)
  scored = m.score(['def f_1(x):\n    return x'])[0]
  assert len(scored.tokens) == len(scored.pieces) == len(scored.logprobs)
  assert np.all(scored.logprobs <= 0) and scored.total == pytest.approx(scored.logprobs.sum())


def _max_logprob_per_position(m, seq):
  from flax import nnx
  logits = nnx.merge(m.graphdef, m.params)(np.asarray([seq], np.int32))[0]
  return np.asarray(jax.nn.log_softmax(logits, axis=-1).max(-1))[:-1]


def test_perplexity_and_training_eval_agree(run):
  workdir, result = run
  m = lmjax.load(workdir)
  ppl = m.perplexity(max_batches=2)
  assert ppl['batches'] == 2 and ppl['tokens'] > 0
  assert ppl['ppl'] == pytest.approx(math.exp(ppl['loss']))
  # Same split, batches and params as the loop's final eval -> same loss.
  assert ppl['loss'] == pytest.approx(result.evals[-1]['eval_loss'], rel=1e-5)
  # The trained model beats the step-10 one on held-out text.
  assert ppl['loss'] < lmjax.load(workdir, step=10).perplexity(max_batches=2)['loss']


def test_exact_match_harness():
  answers = {'1+1=': '2', '2+2=': '4', '3+3=': '6'}
  fake = lambda prompts: [answers[p] + '\nmore text' if p != '3+3=' else ' 7' for p in prompts]
  examples = [{'prompt': p, 'answer': a} for p, a in answers.items()]
  out = evaluate.exact_match(fake, examples, batch_size=2)
  assert out['correct'] == 2 and out['n'] == 3 and out['accuracy'] == pytest.approx(2 / 3)
  assert out['samples'][2] == ('3+3=', '6', ' 7', False)
  with pytest.raises(ValueError, match='answer'):
    evaluate.exact_match(fake, [{'prompt': 'x'}])


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a directory'):
    lmjax.load(str(tmp_path / 'missing'))
  with pytest.raises(Exception, match='neither checkpoints'):
    lmjax.load(str(tmp_path))


# ---- Against transformers ---------------------------------------------------------------

def _hf_model(path, arch='Llama', vocab_size=128, **kwargs):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = getattr(transformers, f'{arch}Config')(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      bos_token_id=1, eos_token_id=2, pad_token_id=0, **kwargs)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():  # large random weights: confident, varied next tokens
    for name, p in model.named_parameters():
      p.copy_((1.0 + 0.2 * torch.randn_like(p)) if 'norm' in name else 0.15 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def test_hf_greedy_generation_matches_transformers(tmp_path):
  torch = pytest.importorskip('torch')
  hf_model = _hf_model(tmp_path / 'hf')
  m = lmjax.load(str(tmp_path / 'hf'))
  assert m.tokenizer is None
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 128, n).tolist() for n in (5, 11, 3)]
  new = 16
  out = m.generate_ids(prompts, max_new_tokens=new)
  # transformers, one prompt at a time (no padding), never stopping early.
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = hf_model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
    assert out.tokens[i].tolist() == ref, f'prompt {i}'
  # Left-padded batch in transformers gives the same tokens too.
  width = max(map(len, prompts))
  ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    ref = hf_model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                            eos_token_id=None, pad_token_id=0)[:, width:].numpy()
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)
  # score: per-token log-probs equal transformers' log_softmax.
  seq = prompts[1] + out.tokens[1].tolist()
  with torch.no_grad():
    logp = torch.log_softmax(hf_model(torch.tensor([seq])).logits[0].float(), -1).numpy()
  ref_lp = logp[np.arange(len(seq) - 1), seq[1:]]
  np.testing.assert_allclose(m.score_ids([seq])[0], ref_lp, atol=1e-4)


def test_generate_module_api_is_usable_without_a_model_object(run):
  workdir, result = run
  m = lmjax.load(workdir, devices=jax.devices()[:1])
  a = generate.generate(m.graphdef, m.params, [m.encode('def f_')], max_new_tokens=5)
  b = m.generate_ids([m.encode('def f_')], max_new_tokens=5)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))


# ---- PEFT adapters ----------------------------------------------------------------------

def _peft_adapter(base_dir, out, **lora_kw):
  """A PEFT LoRA adapter on the HF model in `base_dir`, saved to `out`; the PeftModel."""
  pytest.importorskip('peft')
  import transformers
  from util import peft_adapter
  base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir)).float().eval()
  return peft_adapter(base, out, **lora_kw)


def test_load_hf_with_peft_adapter_equals_peft_merged(tmp_path):
  torch = pytest.importorskip('torch')
  _hf_model(tmp_path / 'hf')
  pm = _peft_adapter(tmp_path / 'hf', tmp_path / 'adapter', r=4, lora_alpha=32,
                     target_modules=['q_proj', 'v_proj', 'down_proj'])
  tokens = np.random.default_rng(0).integers(3, 128, (2, 12))
  with torch.no_grad():
    ref = pm.merge_and_unload()(torch.tensor(tokens)).logits.float().numpy()
  m = lmjax.load(str(tmp_path / 'hf'), adapter=str(tmp_path / 'adapter'))
  assert 'adapter' in repr(m) and m.mesh.devices.size == 8
  from flax import nnx
  ours = np.asarray(nnx.merge(m.graphdef, m.params)(tokens))
  assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
  base = lmjax.load(str(tmp_path / 'hf'), devices=jax.devices()[:1])
  assert np.abs(np.asarray(nnx.merge(base.graphdef, base.params)(tokens)) - ref).max() > 1e-2
  # score sees the adapter: per-token log-probs equal PEFT's.
  lp = torch.log_softmax(torch.from_numpy(ref[0]), -1).numpy()
  np.testing.assert_allclose(m.score_ids([tokens[0].tolist()])[0],
                             lp[np.arange(11), tokens[0, 1:]], atol=1e-4)


def test_load_workdir_with_peft_adapter(run, tmp_path):
  from lmjax.models import lora
  workdir, result = run
  base = lmjax.load(workdir, devices=jax.devices()[:1])
  cfg = base.config.copy_and_resolve_references()
  cfg.lora.update(rank=2, alpha=6.0, targets='o,up')
  ad = jax.tree.map(lambda x: x + 0.05, lora.init_adapters(jax.random.key(0), cfg))
  lora.save_peft_adapter(ad, cfg, str(tmp_path / 'adapter'))
  m = lmjax.load(workdir, adapter=str(tmp_path / 'adapter'))
  want = lora.merge(jax.device_get(result.state['params']), ad, cfg)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6),
               jax.device_get(m.params), jax.device_get(want))
  assert m.tokenizer.path == base.tokenizer.path
  # An adapter of another architecture (the HF model's d_ff 96, not 128): a clear error.
  _hf_model(tmp_path / 'hf')
  _peft_adapter(tmp_path / 'hf', tmp_path / 'hf_adapter', r=4, target_modules=['down_proj'])
  with pytest.raises(lora.LoraError, match=r'down_proj.lora_A has shape \(4, 96\), '
                                           r'expected \(4, 128\).*different base'):
    lmjax.load(workdir, adapter=str(tmp_path / 'hf_adapter'))


def test_inputs_past_the_trained_length_warn(run):
  workdir, _ = run
  m = lmjax.load(workdir)
  assert m.trained_len == 32  # the run's data.seq_len
  with pytest.warns(UserWarning, match=r'prompt plus max_new_tokens of 44 tokens is longer '
                    r'than the 32 it was trained on'):
    m.generate_ids([[1] + [5] * 39], max_new_tokens=4)
  with pytest.warns(UserWarning, match='an input of 40 tokens'):
    m.logits([[5] * 40])
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    m.generate_ids([[1, 5, 6]], max_new_tokens=4)  # within it: no warning


def test_logits_agree_with_score(run):
  workdir, _ = run
  m = lmjax.load(workdir)
  text = 'def f_1(x):\n    return x'
  logits = m.logits(text)
  ids = m.encode(text)
  assert logits.shape == (len(ids), VOCAB) and logits.dtype == np.float32
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  np.testing.assert_allclose(logp[np.arange(len(ids) - 1), ids[1:]], m.score(text)[0].logprobs,
                             atol=1e-5)
  both = m.logits([text, ids[:5]])  # a text and a list of ids
  np.testing.assert_allclose(both[0], logits, atol=1e-6)
  np.testing.assert_allclose(both[1], logits[:5], atol=1e-5)
  # chat with a tokenizer that has no template: the built-in ChatML prompt.
  answer = m.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=4)
  plain = m.generate('<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n',
                     max_new_tokens=4)
  assert answer == plain.split('<|im_end|>')[0]
  with pytest.raises(ValueError, match='ends with an assistant turn'):
    m.chat([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}])


def test_imported_workdirs_are_self_contained(tmp_path):
  """import_hf then lmjax.load: no phantom tokenizer for a model without one; a model's
  tokenizer.json and chat template copied into the workdir, usable once the source is
  gone."""
  import shutil
  from hf_tokenizers import make_bpe_dir
  from lmjax import hf
  bare = tmp_path / 'bare'
  _hf_model(bare)
  hf.import_hf(str(bare), str(tmp_path / 'wd_bare'))
  m = lmjax.load(str(tmp_path / 'wd_bare'))
  assert m.tokenizer is None
  assert m.generate_ids([[1, 5, 6]], max_new_tokens=3).tokens.shape == (1, 3)
  with pytest.raises(ValueError, match='no tokenizer'):
    m.generate('hi')
  cfg = hf.config_from_hf(str(bare), tiny_config())  # a run from it must name a tokenizer
  cfg.init_from.path, cfg.mesh.data = str(tmp_path / 'wd_bare'), -1
  from lmjax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match='has no tokenizer .* set tokenizer.path'):
    loop.train(cfg, str(tmp_path / 'dapt'))

  src = tmp_path / 'src'
  ref = make_bpe_dir(src, 'chatml')
  _hf_model(src, 'Qwen2', vocab_size=len(ref))
  hf.import_hf(str(src), str(tmp_path / 'wd'))
  assert sorted(os.listdir(tmp_path / 'wd' / 'tokenizer')) == sorted(
      f for f in os.listdir(src) if not f.endswith(('.safetensors', 'config.json'))
      or f in ('tokenizer_config.json', 'generation_config.json'))
  shutil.rmtree(src)
  m = lmjax.load(str(tmp_path / 'wd'))
  assert m.tokenizer.kind == 'huggingface' and m.tokenizer.chat_template == ref.chat_template
  assert m.tokenizer.bos == [] and m.encode('hi there') == ref('hi there')['input_ids']
  assert m.tokenizer.piece_to_id('<|im_end|>') in m.tokenizer.stop_ids
  prompt = ref.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=True,
                                   add_generation_prompt=True, return_dict=True)['input_ids']
  out = m.generate_ids([prompt], max_new_tokens=3, stop_tokens=m.tokenizer.stop_ids)
  want = m.tokenizer.decode(out.tokens[0, :out.lengths[0]])
  assert m.chat([{'role': 'user', 'content': 'hi'}], max_new_tokens=3) == want


def test_sliding_window_model_loads_at_its_window(tmp_path):
  from lmjax import hf
  _hf_model(tmp_path, 'Mistral', sliding_window=32)
  m = lmjax.load(str(tmp_path))  # the base config's seq_len (256) would exceed the window
  assert m.max_len == 32 and m.config.data.seq_len == 32
  assert m.trained_len == 256  # max_position_embeddings
  m.generate_ids([[1, 2, 3]], max_new_tokens=20)
  with pytest.raises(ValueError, match='sliding attention window'):
    m.generate_ids([[1] * 20], max_new_tokens=20)
  with pytest.raises(ValueError, match='sliding attention window'):
    m.logits([[1] * 40])
  assert lmjax.load(str(tmp_path), seq_len=16).config.data.seq_len == 16
  with pytest.raises(hf.HFError, match=r'seq_len=N'):
    lmjax.load(str(tmp_path), seq_len=64)
