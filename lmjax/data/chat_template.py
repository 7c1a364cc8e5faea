"""A model's own chat template: the Jinja `chat_template` of its tokenizer_config.json (or
chat_template.jinja), rendered as transformers' `apply_chat_template` renders it, with
the assistant tokens found for the loss mask.

    tmpl = ModelTemplate(tok)                   # tok.chat_template
    text = tmpl.render(turns, add_generation_prompt=False)
    ids, mask = tmpl.encode(turns)              # mask 1 on the assistant tokens

Rendering: a sandboxed Jinja environment (`ImmutableSandboxedEnvironment`, trim_blocks,
lstrip_blocks, loop controls), a `tojson` filter that leaves non-ASCII and HTML characters
alone, `raise_exception` and `strftime_now`, and the tokenizer's special tokens (bos_token,
eos_token, ...) as variables, as transformers does; so a template from the Hub can run
neither code nor file access. Token ids are the rendered text's encoding with special
tokens parsed (transformers: `tokenizer(text, add_special_tokens=False)`): the template
writes BOS itself where the model wants it.

Assistant tokens: a template with `{% generation %}...{% endgeneration %}` tags marks the
assistant text itself (transformers' `return_assistant_tokens_mask`); for one without, an
assistant turn spans from the end of the conversation rendered up to it with the
generation prompt, to the end of the conversation rendered through it (trailing
whitespace excluded), which needs a template whose renderings of a conversation's
prefixes are prefixes of the whole (true of Llama 3, ChatML/Qwen2 and Mistral templates; a
template that rewrites earlier turns, e.g. dropping their reasoning, is refused with the
fix). A token is an assistant token when its characters overlap an assistant span, as in
transformers.
"""

from __future__ import annotations

import datetime
import functools
import json
import re

from lmjax.data.sources import DataError

_OPEN, _CLOSE = '\ue000', '\ue001'  # private-use marks around {% generation %} bodies
_GENERATION_TAG = re.compile(r'\{%-?\s*generation\s*-?%\}')


@functools.lru_cache(maxsize=None)
def _environment():
  import jinja2  # pylint: disable=import-outside-toplevel
  from jinja2 import ext, nodes  # pylint: disable=import-outside-toplevel
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel

  class GenerationTag(ext.Extension):
    """{% generation %}body{% endgeneration %} -> the body between two marks."""
    tags = {'generation'}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(('name:endgeneration',), drop_needle=True)
      return nodes.CallBlock(self.call_method('_mark'), [], [], body).set_lineno(lineno)

    def _mark(self, caller):
      return _OPEN + caller() + _CLOSE

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationTag, ext.loopcontrols])
  env.filters['tojson'] = tojson
  env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
  return env


@functools.lru_cache(maxsize=64)
def _compile(source: str):
  import jinja2  # pylint: disable=import-outside-toplevel
  try:
    return _environment().from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise DataError(f'the tokenizer\'s chat_template does not parse: {e} (line {e.lineno})'
                    ) from None


def _messages(turns) -> list[dict]:
  """Plain {'role', 'content'} dicts (no lmjax-only keys), without the span marks."""
  return [{'role': t['role'],
           'content': t['content'].replace(_OPEN, '').replace(_CLOSE, '')} for t in turns]


def _unmark(text: str) -> tuple[str, list[tuple[int, int]]]:
  """The text without the generation marks, and the [start, end) spans they enclosed."""
  out, spans, depth, start, pos = [], [], 0, 0, 0
  for piece in re.split(f'([{_OPEN}{_CLOSE}])', text):
    if piece == _OPEN:
      depth += 1
      if depth == 1:
        start = pos
    elif piece == _CLOSE:
      depth = max(depth - 1, 0)
      if depth == 0 and pos > start:
        spans.append((start, pos))
    else:
      out.append(piece)
      pos += len(piece)
  return ''.join(out), spans


def token_mask(offsets, spans) -> list[int]:
  """1 for each token (by its (start, end) character offsets) overlapping a span."""
  mask, k = [], 0
  for start, end in offsets:
    while k < len(spans) and start >= spans[k][1]:
      k += 1
    mask.append(int(k < len(spans) and end > spans[k][0] and start < spans[k][1]))
  return mask


class ModelTemplate:
  """The tokenizer's Jinja chat template, bound to the tokenizer. Picklable."""

  def __init__(self, tokenizer):
    if not tokenizer.chat_template:
      raise DataError(f"sft.template='model': the tokenizer {tokenizer.path} has no "
                      'chat_template (use a built-in template: chatml, llama3 or plain)')
    self.tokenizer = tokenizer
    self.source = tokenizer.chat_template
    self.tagged = bool(_GENERATION_TAG.search(self.source))

  def __getstate__(self):
    return {'tokenizer': self.tokenizer}

  def __setstate__(self, state):
    self.__init__(state['tokenizer'])

  def _render_marked(self, turns, add_generation_prompt: bool) -> str:
    import jinja2  # pylint: disable=import-outside-toplevel
    try:
      return _compile(self.source).render(
          messages=_messages(turns), add_generation_prompt=add_generation_prompt, tools=None,
          documents=None, **self.tokenizer.special_tokens)
    except jinja2.exceptions.TemplateError as e:
      raise DataError(f'the chat template rejected a conversation: {e}') from None

  def render(self, turns, add_generation_prompt: bool = False) -> str:
    """The conversation as text (what apply_chat_template(tokenize=False) returns)."""
    return _unmark(self._render_marked(turns, add_generation_prompt))[0]

  def render_with_spans(self, turns) -> tuple[str, list[tuple[int, int]]]:
    """(text, assistant character spans) of a conversation (see the module doc)."""
    text, spans = _unmark(self._render_marked(turns, False))
    if self.tagged:
      return text, spans
    spans = []
    for i, t in enumerate(turns):
      if t['role'] != 'assistant':
        continue
      before = self.render(turns[:i], add_generation_prompt=True) if i else ''
      through = self.render(turns[:i + 1])
      if not (text.startswith(through) and through.startswith(before)):
        raise DataError(
            'the chat template renders the start of a conversation differently from the '
            f'whole (turn {i}), so its assistant tokens cannot be found: add {{% generation %}}'
            '...{% endgeneration %} around the assistant text of the template, or use a '
            'built-in template (sft.template=chatml|llama3|plain)')
      end = len(through.rstrip())
      if end > len(before):
        spans.append((len(before), end))
    return text, spans

  def encode(self, turns) -> tuple[list[int], list[int]]:
    """(ids, mask): the rendered conversation's tokens, 1 on assistant tokens."""
    text, spans = self.render_with_spans(turns)
    ids, offsets = self.tokenizer.encode_with_offsets(text, specials=True)
    return ids, token_mask(offsets, spans)

  def encode_completion(self, prompt_turns, completion_turns
                        ) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion mask) for a prompt and its answer: the
    prompt rendered with the generation prompt and encoded alone (the tokens a sampler
    continues from), then the rest of the whole conversation's rendering; the mask
    marks its assistant tokens. Two completions of one prompt share its ids exactly."""
    prompt = self.render(prompt_turns, add_generation_prompt=True)
    text, spans = self.render_with_spans(list(prompt_turns) + list(completion_turns))
    if not text.startswith(prompt):
      raise DataError('the chat template renders the prompt with its generation prompt '
                      'differently from the start of the whole conversation')
    ids, offsets = self.tokenizer.encode_with_offsets(text[len(prompt):], specials=True)
    offsets = [(a + len(prompt), b + len(prompt)) for a, b in offsets]
    return (self.tokenizer.encode(prompt, specials=True), ids, token_mask(offsets, spans))


def end_of_turn_id(tokenizer) -> int | None:
  """The special token the chat template writes right after an assistant answer (e.g.
  <|eot_id|>, <|im_end|>), or None (no template, or none found)."""
  probe = [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Bye'}]
  try:
    text = ModelTemplate(tokenizer).render(probe)
  except DataError:
    return None
  at = text.rfind('Bye')
  if at < 0:
    return None
  ids = tokenizer.encode(text[at + 3:], specials=True)
  return ids[0] if ids and tokenizer.is_special(ids[0]) else None
