"""A real-format checkpoint end to end: a random tiny Llama-3-style model saved by
transformers with a trained byte-level BPE tokenizer.json and a chat template, then
lmjax.load -> chat; continued pretraining on a text corpus; LoRA SFT on chat JSONL with
the model's own template; export; transformers reloads the export and applies its chat
template; generations, logits and token ids agree."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import lmjax  # noqa: E402
from hf_tokenizers import CONVERSATIONS, make_bpe_dir  # noqa: E402
from lmjax import config as config_lib  # noqa: E402
from lmjax import hf, weights  # noqa: E402
from lmjax.train import loop  # noqa: E402
from util import tiny_config, write_corpus  # noqa: E402

pytestmark = pytest.mark.slow

QUESTIONS = [[{'role': 'system', 'content': 'Answer briefly.'},
              {'role': 'user', 'content': 'What is 2 + 2?'}],
             [{'role': 'user', 'content': 'Write code.'}]]


def _hf_model(path, vocab_size):
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      rope_parameters=dict(rope_type='llama3', rope_theta=500000.0, factor=8.0,
                           low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=64),
      tie_word_embeddings=True, bos_token_id=0, eos_token_id=4, pad_token_id=5)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_((1.0 + 0.2 * torch.randn_like(p)) if 'norm' in name else 0.15 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


def _hf_answer(model, tok, conversation, new):
  """transformers' greedy answer to a conversation: its template, its generation prompt."""
  ids = tok.apply_chat_template(conversation, add_generation_prompt=True, return_dict=True,
                                return_tensors='pt')['input_ids']
  eos = [tok.convert_tokens_to_ids('<|eot_id|>')]
  with torch.no_grad():
    out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
  return tok.decode([t for t in out if t not in eos]), ids[0].tolist()


def _train_cfg(src, root, **overrides):
  """A tiny training config for the model in `src` (its tokenizer, its architecture)."""
  base = tiny_config()
  base.data.update(seq_len=128, data_dir=str(root / 'tfds'), text_glob=write_corpus(
      root / 'text', n_files=20), val_fraction=0.1)
  base.train.update(steps=4, global_batch=8)
  base.mesh.update(data=-1)  # 8 CPU devices
  cfg = hf.config_from_hf(str(src), base)
  config_lib.apply_overrides(cfg, overrides)
  return cfg


def test_llama3_style_checkpoint_end_to_end(tmp_path):
  src = tmp_path / 'hf'
  ref_tok = make_bpe_dir(src, 'llama3')
  model = _hf_model(src, len(ref_tok))
  new = 12

  # 1. lmjax.load -> chat, as transformers answers.
  m = lmjax.load(str(src))
  assert m.tokenizer.kind == 'huggingface' and m.tokenizer.chat_template
  for conv in QUESTIONS:
    want, want_ids = _hf_answer(model, ref_tok, conv, new)
    assert m.chat(conv, max_new_tokens=new) == want
  assert m.chat(QUESTIONS, max_new_tokens=new) == [m.chat(c, max_new_tokens=new)
                                                   for c in QUESTIONS]
  ids = ref_tok('def f(x): return x', add_special_tokens=True)['input_ids']
  with torch.no_grad():
    ref_logits = model(torch.tensor([ids])).logits[0].numpy()
  assert np.abs(m.logits(ids) - ref_logits).max() < 1e-4
  assert m.encode('def f(x): return x') == ids  # BOS + text, as transformers' tokenizer(...)

  # 2. Continued pretraining (DAPT) from the Hugging Face directory, its tokenizer.
  dapt = tmp_path / 'dapt'
  cfg = _train_cfg(src, tmp_path, **{'init_from.path': str(src), 'optim.lr': 1e-3})
  result = loop.train(cfg, str(dapt))
  assert result.tokenizer.kind == 'huggingface'
  assert result.history[-1]['loss'] < 20 and np.isfinite(result.history[-1]['loss'])

  # 3. LoRA SFT on chat JSONL from the DAPT run, with the model's own template ('auto').
  data = tmp_path / 'chat'
  data.mkdir()
  for split in ('train', 'validation'):
    with open(data / f'{split}.jsonl', 'w') as f:
      for conv in CONVERSATIONS * 4:
        f.write(json.dumps({'messages': conv}) + '\n')
  sft = tmp_path / 'sft'
  cfg = _train_cfg(src, tmp_path, **{
      'stage': 'sft', 'init_from.path': str(dapt), 'lora.enabled': True, 'lora.rank': 4,
      'lora.targets': 'q,v', 'sft.path': str(data / '{split}.jsonl'), 'sft.eval_examples': 2,
      'sft.allow_overlap': True,  # both splits hold the same conversations: a smoke run
      'sft.eval_max_new_tokens': 4, 'train.eval_every': 4, 'optim.lr': 1e-2,
      'train.sample_at_end': True, 'sample.max_new_tokens': 4, 'sample.temperature': 0.0})
  result = loop.train(cfg, str(sft))
  tuned = lmjax.load(str(sft))
  assert tuned.tokenizer.chat_template == ref_tok.chat_template
  # The end-of-run sample (greedy) is the tuned model's answer to the prompt as a user turn.
  assert result.sample == tuned.chat([{'role': 'user', 'content': cfg.sample.prompt}],
                                     max_new_tokens=4)
  assert result.evals[-1]['eval/exact_match'] == tuned.exact_match(
      'validation', limit=2, max_new_tokens=4)['accuracy']

  # DPO on chat-message pairs from the SFT run (LoRA, reference = adapters off).
  with open(data / 'pairs_train.jsonl', 'w') as f:
    for conv in CONVERSATIONS * 4:
      f.write(json.dumps({'prompt': conv[:-1], 'chosen': conv[-1:], 'rejected': [
          {'role': 'assistant', 'content': 'No.'}]}) + '\n')
  cfg = _train_cfg(src, tmp_path, **{
      'stage': 'dpo', 'init_from.path': str(sft), 'lora.enabled': True, 'lora.rank': 4,
      'dpo.path': str(data / 'pairs_{split}.jsonl'), 'train.eval_every': 0,
      'sft.eval_examples': 0})
  result = loop.train(cfg, str(tmp_path / 'dpo'))
  assert abs(result.history[0]['loss'] - np.log(2)) < 1e-3  # policy == reference at step 0

  # 4. Export, reload in transformers, apply its chat template.
  out = tmp_path / 'export'
  weights.export_workdir(str(sft), str(out))
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    assert os.path.exists(out / name), name
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  out_tok = transformers.AutoTokenizer.from_pretrained(str(out))
  assert out_tok.chat_template == ref_tok.chat_template
  config = json.loads((out / 'config.json').read_text())
  assert (config['bos_token_id'], config['eos_token_id']) == (0, 4)

  # 5. Generations, logits and token ids agree between lmjax and the export.
  for conv in QUESTIONS:
    want, want_ids = _hf_answer(reloaded, out_tok, conv, new)
    from lmjax.data import formats
    prompt = formats.render_prompt(conv + [{'role': 'assistant', 'content': ''}], 'auto',
                                   tuned.tokenizer)
    assert formats.prompt_ids(prompt, tuned.tokenizer, 'auto') == want_ids
    assert tuned.chat(conv, max_new_tokens=new) == want
  with torch.no_grad():
    ref_logits = reloaded(torch.tensor([ids])).logits[0].numpy()
  assert np.abs(tuned.logits(ids) - ref_logits).max() < 1e-4
  # The fine-tuning changed the model (the comparison is not of two copies of the base).
  assert np.abs(tuned.logits(ids) - m.logits(ids)).max() > 1e-3
