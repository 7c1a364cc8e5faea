"""Test helpers: real-format Hugging Face tokenizers built locally (nothing downloaded).

`make_bpe_dir` trains a byte-level BPE `tokenizer.json` with the `tokenizers` library (as
GPT-2 / Llama 3 / Qwen2 tokenizers are: byte-level pre-tokenizer and decoder) and saves
it with transformers (`PreTrainedTokenizerFast.save_pretrained`), so the directory holds
what a Hub model ships: tokenizer.json, tokenizer_config.json and the chat template.
"""

import os

# A Llama-3-style template with generation tags (what transformers' assistant mask needs).
LLAMA3_TAGGED = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}"
    "{% if m['role'] == 'assistant' %}"
    "{% generation %}{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endgeneration %}"
    "{% else %}{{ m['content'] | trim }}{{ '<|eot_id|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# The same without tags (Meta's template has none): masks come from prefix renders.
LLAMA3_PLAIN = LLAMA3_TAGGED.replace('{% generation %}', '').replace('{% endgeneration %}', '')
# ChatML (Qwen2 style, no BOS), tagged and not; a default system prompt when none is given.
CHATML_TAGGED = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_PLAIN = CHATML_TAGGED.replace('{% generation %}', '').replace('{% endgeneration %}', '')

LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                   '<|end_header_id|>', '<|eot_id|>', '<|pad|>']
CHATML_SPECIALS = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']

CORPUS = [
    'def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n',
    'The quick brown fox jumps over the lazy dog. Größe, naïve café, 日本語, emoji 😀!\n',
    'import os\n\n\nclass A:\n\tpass   # tabs and   spaces\n',
    'What is 12 + 30? The answer is 42.\r\nNew line; tabs\t\there.\n',
] * 20

TEXTS = [  # parity inputs: unicode, whitespace runs, special-token text, code
    'Hello world', '  leading and trailing  ', 'tabs\t\tand\nnewlines\n\n\n',
    'naïve café 日本語 😀🎉 Ω', 'def f(x):\n    return x ** 2  # square\n',
    'special <|eot_id|> inside <|begin_of_text|> text', '<|im_start|>user\nhi<|im_end|>',
    '', ' ', '1234567890 3.14159', 'a' * 50, 'mixed\u00a0nbsp and \u200bzero-width',
]

CONVERSATIONS = [
    [{'role': 'system', 'content': 'You are terse.'},
     {'role': 'user', 'content': 'What is 2 + 2?'},
     {'role': 'assistant', 'content': 'It is 4.'},
     {'role': 'user', 'content': 'And 3 + 3?  '},
     {'role': 'assistant', 'content': '6, naturally 😀'}],
    [{'role': 'user', 'content': 'Write code.'},
     {'role': 'assistant', 'content': 'def f():\n    return 1\n'}],
    [{'role': 'system', 'content': 'Système: réponds en français.'},
     {'role': 'user', 'content': 'Bonjour'},
     {'role': 'assistant', 'content': 'Salut !'},
     {'role': 'user', 'content': 'Ça va ?'},
     {'role': 'assistant', 'content': 'Oui.'},
     {'role': 'user', 'content': 'Fin'},
     {'role': 'assistant', 'content': 'Au revoir.'}],
]


def make_bpe_dir(path, style='llama3', template=None, vocab_size=400):
  """A byte-level BPE tokenizer trained on CORPUS, saved by transformers to `path` with
  `style`'s special tokens ('llama3': BOS <|begin_of_text|>, added by the post-processor
as Llama 3's is, EOS <|eot_id|>; 'chatml':
  no BOS, EOS <|im_end|>, pad <|endoftext|>) and chat `template` (default: the style's
  tagged one; '' for none). Returns the transformers tokenizer."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  specials = LLAMA3_SPECIALS if style == 'llama3' else CHATML_SPECIALS
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(CORPUS, trainer)
  if style == 'llama3':  # as Llama 3's tokenizer.json: tokenizer(text) starts with BOS
    bos = ('<|begin_of_text|>', tok.token_to_id('<|begin_of_text|>'))
    tok.post_processor = processors.TemplateProcessing(single='<|begin_of_text|> $A',
                                                       special_tokens=[bos])
    kw = dict(bos_token='<|begin_of_text|>', eos_token='<|eot_id|>', pad_token='<|pad|>')
    template = LLAMA3_TAGGED if template is None else template
  else:
    kw = dict(eos_token='<|im_end|>', pad_token='<|endoftext|>')
    template = CHATML_TAGGED if template is None else template
  hf = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
  if template:
    hf.chat_template = template
  os.makedirs(path, exist_ok=True)
  hf.save_pretrained(str(path))
  return hf
