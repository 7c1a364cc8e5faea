"""Tokenizers and chat templates against transformers: token ids of a byte-level BPE
tokenizer.json (built here with the `tokenizers` library) and of a sentencepiece model,
special tokens from tokenizer_config.json, and the model's own chat template rendered and
masked as `apply_chat_template(..., return_assistant_tokens_mask=True)` does."""

import json
import os
import pickle

import numpy as np
import pytest

transformers = pytest.importorskip('transformers')

from hf_tokenizers import (CHATML_PLAIN, CONVERSATIONS, LLAMA3_PLAIN, TEXTS,  # noqa: E402
                           make_bpe_dir)
from lmjax.data import chat_template, formats, preference  # noqa: E402
from lmjax.data import tokenizer as tokenizer_lib  # noqa: E402
from lmjax.data.sources import DataError  # noqa: E402

SPECIAL_TEXTS = TEXTS + ['x <s> y </s> z <unk> <pad>']


@pytest.fixture(scope='module', params=['llama3', 'chatml'])
def bpe(request, tmp_path_factory):
  """(transformers tokenizer, lmjax tokenizer, directory) of a saved BPE tokenizer."""
  path = tmp_path_factory.mktemp(f'bpe_{request.param}')
  make_bpe_dir(path, request.param)
  ref = transformers.AutoTokenizer.from_pretrained(str(path))
  return ref, tokenizer_lib.from_path(str(path)), path


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  from hf_tokenizers import CORPUS
  path = tmp_path_factory.mktemp('sp') / 'sp.model'
  return tokenizer_lib.train_sentencepiece(CORPUS, str(path), 320)


# ---- Token ids -------------------------------------------------------------------------

def test_bpe_ids_and_text_equal_transformers(bpe):
  ref, tok, _ = bpe
  assert tok.kind == 'huggingface' and tok.vocab_size == len(ref)
  for text in SPECIAL_TEXTS:
    want = ref(text, add_special_tokens=False)['input_ids']
    assert tok.encode(text, specials=True) == want, text
    assert tok.decode(want, skip_special=False) == ref.decode(want)
    assert tok.decode(want) == ref.decode(want, skip_special_tokens=True)
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == want and len(offsets) == len(ids)
  # Plain encoding (documents) keeps special-token text as text.
  text = 'a <|im_end|> b <|eot_id|> c <|begin_of_text|>'
  plain = tok.encode(text)
  assert not any(tok.is_special(i) for i in plain)
  assert tok.decode(plain) == text
  assert any(tok.is_special(i) for i in tok.encode(text, specials=True))


def test_bpe_special_tokens_from_tokenizer_config(bpe):
  ref, tok, _ = bpe
  assert tok.bos_id == ref.bos_token_id and tok.eos_id == ref.eos_token_id
  assert tok.pad_id == ref.pad_token_id
  assert tok.bos == ([] if ref.bos_token_id is None else [ref.bos_token_id])
  assert tok.chat_template == ref.chat_template
  assert tok.special_tokens['eos_token'] == ref.eos_token


def test_sentencepiece_ids_equal_transformers(sp_model):
  from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
  ref = SentencePieceBackend(vocab_file=sp_model.path, legacy=True, bos_token='<s>',
                             eos_token='</s>', unk_token='<unk>', pad_token='<pad>')
  for text in SPECIAL_TEXTS:
    want = ref(text, add_special_tokens=False)['input_ids']
    assert sp_model.encode(text, specials=True) == want, text
  assert (sp_model.bos_id, sp_model.eos_id, sp_model.pad_id) == (2, 3, 0)
  assert sp_model.encode('x <s> y') != sp_model.encode('x <s> y', specials=True)
  assert sp_model.decode(sp_model.encode('x <s> y')) == 'x <s> y'


def test_sentencepiece_offsets_cover_the_text(sp_model):
  text = 'héllo 日本語 😀 <s> code\n\tx'
  ids, offsets = sp_model.encode_with_offsets(text)
  assert ids == sp_model.encode(text, specials=True)
  assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
  assert all(a <= b for a, b in offsets)
  assert all(offsets[i][0] <= offsets[i + 1][0] for i in range(len(offsets) - 1))


def test_tokenizers_pickle(bpe, sp_model):
  for tok in (bpe[1], sp_model):
    back = pickle.loads(pickle.dumps(tok))
    assert back.encode(TEXTS[3], specials=True) == tok.encode(TEXTS[3], specials=True)
    assert (back.location, back.stop_ids, back.chat_template) == \
           (tok.location, tok.stop_ids, tok.chat_template)


def test_config_files_precedence_and_stop_ids(tmp_path):
  make_bpe_dir(tmp_path, 'llama3')
  tok = tokenizer_lib.from_path(str(tmp_path))
  eot = tok.piece_to_id('<|eot_id|>')
  assert tok.stop_ids == (eot,)
  # Base-model style: EOS is <|end_of_text|>; the template's end of turn still stops, and
  # generation_config.json's eos ids are added.
  cfg_path = tmp_path / 'tokenizer_config.json'
  cfg = json.loads(cfg_path.read_text())
  cfg['eos_token'] = '<|end_of_text|>'
  cfg_path.write_text(json.dumps(cfg))
  (tmp_path / 'generation_config.json').write_text(json.dumps({'eos_token_id': [7, 8]}))
  tok = tokenizer_lib.from_path(str(tmp_path))
  assert tok.eos_id == tok.piece_to_id('<|end_of_text|>')
  assert tok.stop_ids == (tok.eos_id, 7, 8, eot)
  # chat_template.jinja takes priority over the config's template.
  (tmp_path / 'chat_template.jinja').write_text('{{ messages[0]["content"] }}')
  assert tokenizer_lib.from_path(str(tmp_path)).chat_template == '{{ messages[0]["content"] }}'
  # A tokenizer.json path reads the files beside it.
  assert tokenizer_lib.from_path(str(tmp_path / 'tokenizer.json')).eos_id == tok.eos_id
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='tokenizer.json or tokenizer.model'):
    tokenizer_lib.from_path(str(tmp_path / 'empty'))


# ---- Chat templates --------------------------------------------------------------------

def test_model_template_ids_and_masks_equal_transformers(bpe):
  ref, tok, _ = bpe
  tmpl = chat_template.ModelTemplate(tok)
  for conv in CONVERSATIONS:
    out = ref.apply_chat_template(conv, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = tmpl.encode(conv)
    assert ids == list(out['input_ids']) and mask == list(out['assistant_masks'])
    assert sum(mask) > 0
    prompt = ref.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert tmpl.render(conv[:-1], add_generation_prompt=True) == prompt
    assert formats.render_prompt(conv, 'auto', tok) == prompt
    assert formats.prompt_ids(prompt, tok, 'auto') == list(ref.apply_chat_template(
        conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)['input_ids'])
    # formats.encode with 'auto' (the default sft.template) is the model's template.
    tokens, fmask = formats.encode(conv, tok, 'auto')
    assert tokens.tolist() == ids and fmask.tolist() == mask


@pytest.mark.parametrize('style,plain', [('llama3', LLAMA3_PLAIN), ('chatml', CHATML_PLAIN)])
def test_template_without_generation_tags_masks_by_prefixes(style, plain, tmp_path):
  make_bpe_dir(tmp_path / 'a', style)
  tagged = tokenizer_lib.from_path(str(tmp_path / 'a'))
  make_bpe_dir(tmp_path / 'b', style, template=plain)
  untagged = tokenizer_lib.from_path(str(tmp_path / 'b'))
  for conv in CONVERSATIONS:
    assert (chat_template.ModelTemplate(untagged).encode(conv)
            == chat_template.ModelTemplate(tagged).encode(conv))


def test_unusable_templates_are_clear_errors(tmp_path):
  make_bpe_dir(tmp_path / 'none', 'chatml', template='')
  tok = tokenizer_lib.from_path(str(tmp_path / 'none'))
  assert tok.chat_template is None and formats.resolve_template('auto', tok) == 'chatml'
  with pytest.raises(DataError, match='has no chat_template'):
    formats.encode(CONVERSATIONS[1], tok, 'model')
  config = json.loads((tmp_path / 'none' / 'tokenizer_config.json').read_text())
  del config['eos_token']
  (tmp_path / 'none' / 'tokenizer_config.json').write_text(json.dumps(config))
  with pytest.raises(DataError, match='has none'):  # built-in templates end with EOS
    formats.encode(CONVERSATIONS[1], tokenizer_lib.from_path(str(tmp_path / 'none')), 'chatml')
  # A template that rewrites earlier turns (and has no generation tags).
  rewrites = ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{% else %}"
              "{{ m['content'][:1] }}{% endif %}{% endfor %}")
  make_bpe_dir(tmp_path / 'rw', 'chatml', template=rewrites)
  with pytest.raises(DataError, match='generation'):
    formats.encode(CONVERSATIONS[0], tokenizer_lib.from_path(str(tmp_path / 'rw')), 'model')
  # The sandbox: no attribute access into Python internals, raise_exception reported.
  for source, match in (("{{ messages.__class__.__mro__ }}", 'rejected'),
                        ("{{ raise_exception('no system role') }}", 'no system role')):
    make_bpe_dir(tmp_path / 'x', 'chatml', template=source)
    with pytest.raises(DataError, match=match):
      formats.encode(CONVERSATIONS[1], tokenizer_lib.from_path(str(tmp_path / 'x')), 'model')


def test_sft_batches_with_the_model_template(bpe, tmp_path):
  """The SFT pipeline (packing included) trains on exactly the template's assistant
  tokens: each packed conversation's loss targets are its masked tokens."""
  from util import tiny_config
  _, tok, _ = bpe
  for split in ('train', 'validation'):
    with open(tmp_path / f'{split}.jsonl', 'w') as f:
      for conv in CONVERSATIONS:
        f.write(json.dumps({'messages': conv}) + '\n')
  cfg = tiny_config(vocab_size=512)
  cfg.data.update(seq_len=256, shuffle=False, worker_threads=0, prefetch=0)
  cfg.sft.update(path=str(tmp_path / '{split}.jsonl'))  # template: 'auto'
  it = formats.make_sft_iterator(cfg, tok, 'train', batch_size=2, repeat=False)
  got = set()
  for row in formats.iter_rows(it):
    for s in set(row['segment_ids'].tolist()) - {0}:
      sel = (row['segment_ids'] == s) & (row['loss_mask'] > 0)
      got.add(tuple(row['targets'][sel].tolist()))
  want = set()
  for conv in CONVERSATIONS:
    ids, mask = chat_template.ModelTemplate(tok).encode(conv)
    want.add(tuple(i for i, m in zip(ids[1:], mask[1:]) if m))
  assert got == want


def test_dpo_pairs_with_the_model_template(bpe):
  _, tok, _ = bpe
  prompt = CONVERSATIONS[0][:-1]
  chosen = [{'role': 'assistant', 'content': 'Six.'}]
  rejected = [{'role': 'assistant', 'content': 'Seven, I think.'}]
  start, ct, cm, rt, rm = preference.encode_pair((prompt, chosen, rejected), tok, 'auto')
  want_prompt = chat_template.ModelTemplate(tok).render(prompt, add_generation_prompt=True)
  assert ct[:start].tolist() == rt[:start].tolist() == tok.encode(want_prompt, specials=True)
  assert not cm[:start].any() and not rm[:start].any()
  for tokens, mask, answer in ((ct, cm, 'Six.'), (rt, rm, 'Seven, I think.')):
    answered = tok.decode(tokens[mask > 0], skip_special=False)
    assert answered.startswith(answer)
    # one end of turn, no EOS appended after it
    end = chat_template.end_of_turn_id(tok)
    assert (tokens[start:] == end).sum() == 1 and tokens[mask > 0][-1] == end
  # The same text as the whole conversation's rendering (the ids may differ at the
  # prompt/answer boundary: the prompt is encoded alone, as a sampler continues it).
  full = chat_template.ModelTemplate(tok).render(prompt + chosen)
  assert tok.decode(ct, skip_special=False) == full
