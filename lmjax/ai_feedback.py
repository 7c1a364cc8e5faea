"""AI feedback (Constitutional AI, Bai et al. 2022): a model checks outputs against written
principles, in place of most human labels.

Two stages, each a function here and a command of tools/ai_feedback.py:

  revise  (supervised stage) the policy answers each prompt, then critiques its own answer
          under a principle and revises it, N rounds (a principle drawn per prompt and
          round with a seeded RNG). Records {prompt, messages, chosen, rejected} (the
          column layout of the public CAI datasets, e.g. HuggingFaceH4/cai-conversation-
          harmless): messages and chosen the conversation ending with the final revision,
          rejected with the first answer. SFT reads `messages`; DPO and KTO read the pair
          (the conversation's prompt turns are the prompt).
  judge   (preference stage) a feedback model compares two answers A and B to a prompt
          under K sampled principles by scoring, not generating: one forward pass per
          ordering reads the next-token probabilities of the two option tokens ("(A)" vs
          "(B)") after the judge prompt, normalised over the two. p(A > B) averages
          p(first option) with A shown first and p(second option) with A shown second
          (cancelling position bias), over the K principles. Optionally clamped (the
          paper's [0.4, 0.6] for chain-of-thought judges) and near-ties dropped. Records
          {prompt, chosen, rejected, p}: the labels for a soft-label reward model (p is
          its 'label' column), DPO with dpo.soft_labels, and KTO (liked iff p > 0.5,
          weight |2p - 1|).

A constitution is a JSON file (Constitution.load):

    {"principles": [{"name": "correct",
                     "critique": "Point out anything wrong in the assistant's last answer.",
                     "revision": "Rewrite the answer, fixing what the critique found.",
                     "preference": "Which answer is correct?"}, ...],
     "judge_template": "{principle}\\n\\nQuestion: {prompt}\\n(A) {response_a}\\n"
                       "(B) {response_b}\\nAnswer with (A) or (B).",
     "options": ["(A)", "(B)"],
     "few_shot": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}

`preference` is the principle's question to the judge (principles without one are not
used for judging); judge_template's fields are {prompt} (the prompt's last user turn),
{conversation} (all prompt turns, "Role: content" lines), {principle}, {response_a} and
{response_b}; the judge's answer is one of `options` in the assistant turn. few_shot
turns precede each critique-and-revision conversation (critique/revision examples).

    c = Constitution.load('configs/constitution_tiny.json')
    judge = Judge(lmjax.load('/tmp/judge'), c, principles_per_comparison=2)
    res = judge.compare(prompts, answers_a, answers_b, seed=0)   # res.p: p(a > b) [n]
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Sequence

import numpy as np

from lmjax.errors import UserError

TEMPLATE_FIELDS = ('prompt', 'conversation', 'principle', 'response_a', 'response_b')


class ConstitutionError(UserError, ValueError):
  """A constitution file that is missing, not JSON, or lacks a field."""


@dataclasses.dataclass(frozen=True)
class Principle:
  name: str
  critique: str
  revision: str
  preference: str | None = None


@dataclasses.dataclass(frozen=True)
class Constitution:
  principles: tuple[Principle, ...]
  judge_template: str
  options: tuple[str, str] = ('(A)', '(B)')
  few_shot: tuple[dict, ...] = ()
  source: str = ''

  @classmethod
  def load(cls, path: str) -> 'Constitution':
    """The constitution in the JSON file `path`; ConstitutionError naming the file and
    field when it is malformed."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise ConstitutionError(f'constitution {path} not found: give a JSON file (see '
                              'configs/constitution_tiny.json)')
    try:
      with open(path) as f:
        obj = json.load(f)
    except json.JSONDecodeError as e:
      raise ConstitutionError(f'constitution {path} is not valid JSON: {e}') from None
    return cls.from_dict(obj, path)

  @classmethod
  def from_dict(cls, obj: Any, source: str = '<dict>') -> 'Constitution':
    def err(msg):
      return ConstitutionError(f'constitution {source}: {msg}')

    if not isinstance(obj, dict):
      raise err('must be a JSON object with "principles" and "judge_template"')
    unknown = set(obj) - {'principles', 'judge_template', 'options', 'few_shot', 'name',
                          'description'}
    if unknown:
      raise err(f'unknown field(s) {sorted(unknown)}; known: principles, judge_template, '
                'options, few_shot (and name, description)')
    raw = obj.get('principles')
    if not isinstance(raw, list) or not raw:
      raise err('"principles" must be a non-empty list of {name, critique, revision, '
                'preference}')
    principles, names = [], set()
    for i, p in enumerate(raw):
      if not isinstance(p, dict):
        raise err(f'principles[{i}] must be an object')
      for key in ('critique', 'revision'):
        if not isinstance(p.get(key), str) or not p[key].strip():
          raise err(f'principles[{i}] needs a non-empty "{key}" request')
      pref = p.get('preference')
      if pref is not None and (not isinstance(pref, str) or not pref.strip()):
        raise err(f'principles[{i}] "preference" must be a non-empty string when given')
      name = str(p.get('name', f'principle_{i}'))
      if name in names:
        raise err(f'principles[{i}] repeats the name {name!r}')
      names.add(name)
      principles.append(Principle(name, p['critique'], p['revision'], pref))
    template = obj.get('judge_template')
    if not isinstance(template, str) or not template.strip():
      raise err('"judge_template" must be a non-empty string')
    import string  # pylint: disable=import-outside-toplevel
    try:
      fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
      raise err(f'"judge_template" is not a format string: {e}') from None
    bad = fields - set(TEMPLATE_FIELDS)
    if bad:
      raise err(f'"judge_template" has unknown field(s) {sorted(bad)}; known: '
                f'{", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)}')
    for need in ('response_a', 'response_b'):
      if need not in fields:
        raise err(f'"judge_template" must contain {{{need}}}')
    options = obj.get('options', ['(A)', '(B)'])
    if (not isinstance(options, list) or len(options) != 2
        or not all(isinstance(o, str) and o for o in options) or options[0] == options[1]):
      raise err('"options" must be two different non-empty strings, e.g. ["(A)", "(B)"]')
    few_shot = obj.get('few_shot', [])
    if not isinstance(few_shot, list):
      raise err('"few_shot" must be a list of {role, content} messages')
    for i, m in enumerate(few_shot):
      if (not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant')
          or not isinstance(m.get('content'), str)):
        raise err(f'few_shot[{i}] must be {{"role": system|user|assistant, "content": str}}')
    if few_shot and few_shot[-1]['role'] != 'assistant':
      raise err('few_shot must end with an assistant turn (the examples precede the prompt)')
    return cls(tuple(principles), template, tuple(options),
               tuple({'role': m['role'], 'content': m['content']} for m in few_shot), source)

  def judge_principles(self) -> tuple[Principle, ...]:
    out = tuple(p for p in self.principles if p.preference)
    if not out:
      raise ConstitutionError(f'constitution {self.source}: no principle has a '
                              '"preference" question, so there is nothing to judge under')
    return out


# ---- Prompts ------------------------------------------------------------------------

def prompt_turns(prompt) -> list[dict[str, str]]:
  """A prompt (a string, or messages ending with a user turn) as a list of turns."""
  if isinstance(prompt, str):
    return [{'role': 'user', 'content': prompt}]
  return [{'role': m['role'], 'content': m['content']} for m in prompt]


def _conversation_text(turns) -> str:
  return '\n'.join(f'{t["role"].capitalize()}: {t["content"]}' for t in turns)


def judge_text(constitution: Constitution, prompt, first: str, second: str,
               principle: Principle) -> str:
  """The judge prompt (constitution.judge_template) comparing `first` (A) and `second` (B)
  under `principle`'s preference question."""
  turns = prompt_turns(prompt)
  return constitution.judge_template.format(
      prompt=_last_user(turns), conversation=_conversation_text(turns),
      principle=principle.preference, response_a=first, response_b=second)


def _last_user(turns) -> str:
  for t in reversed(turns):
    if t['role'] == 'user':
      return t['content']
  return turns[-1]['content']


# ---- Judge --------------------------------------------------------------------------

@dataclasses.dataclass
class Comparison:
  """Judgements of n pairs (a, b).

  p: [n] float64, p(a > b) averaged over both orderings and the principles used;
  p_first: [n, K, 2] the normalised probability of the first option with a shown first
  ([..., 0]) and with b shown first ([..., 1]): their mean minus 0.5 is the position bias;
  principles: [n, K] indices into the judge's principles.
  """
  p: np.ndarray
  p_first: np.ndarray
  principles: np.ndarray
  seconds: float = 0.0

  @property
  def position_bias(self) -> float:
    """Mean p(first option) - 0.5: > 0 when the judge favours whatever is shown first."""
    return float(np.mean(self.p_first) - 0.5) if self.p_first.size else 0.0


def clamp_and_filter(p: np.ndarray, *, clamp: tuple[float, float] | None = None,
                     min_confidence: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """(kept mask, labels): pairs whose confidence max(p, 1 - p) is below min_confidence
  are dropped (near-ties); the kept labels are then clamped to [lo, hi] when `clamp`."""
  p = np.asarray(p, np.float64)
  if not 0.0 <= min_confidence <= 1.0:
    raise ValueError(f'min_confidence must be in [0, 1], got {min_confidence}')
  keep = np.maximum(p, 1.0 - p) >= min_confidence
  if clamp is not None:
    lo, hi = clamp
    if not 0.0 <= lo <= 0.5 <= hi <= 1.0:
      raise ValueError(f'clamp must satisfy 0 <= lo <= 0.5 <= hi <= 1, got {clamp}')
    p = np.clip(p, lo, hi)
  return keep, p


class Judge:
  """A multiple-choice feedback model (an lmjax.load Model: an lmjax workdir or a Hugging
  Face directory, language-model head) comparing answers under a constitution's
  principles, by the probabilities of the option tokens (module doc).

  template: how the judge prompt is rendered (default the model's sft.template: 'auto'
  is the tokenizer's chat template when it has one); the option is the start of the
  assistant's answer. The options are told apart by the first token where their encodings
  differ: the scored sequence is the rendered prompt plus the options' shared leading
  tokens (e.g. '(' when '(A)' and '(B)' encode as '(' 'A' ')' and '(' 'B' ')').
  """

  def __init__(self, model, constitution: Constitution, *, principles_per_comparison: int = 1,
               template: str | None = None, batch_size: int = 32):
    from lmjax.data import formats  # pylint: disable=import-outside-toplevel
    self.model, self.constitution = model, constitution
    self.principles = constitution.judge_principles()
    if not 1 <= principles_per_comparison <= len(self.principles):
      raise ValueError(f'principles_per_comparison must be in [1, {len(self.principles)}] '
                       f'(the principles with a "preference" question in '
                       f'{constitution.source}), got {principles_per_comparison}')
    self.k = principles_per_comparison
    self.batch_size = batch_size
    tok = model._tok()  # pylint: disable=protected-access
    self.tokenizer = tok
    self.template = formats.resolve_template(template or model.config.sft.template, tok)
    a, b = (tok.encode(o, specials=False) for o in constitution.options)
    shared = 0
    while shared < min(len(a), len(b)) and a[shared] == b[shared]:
      shared += 1
    if shared == len(a) or shared == len(b):
      raise ConstitutionError(f'constitution {constitution.source}: options '
                              f'{list(constitution.options)} encode to {a} and {b}: one is a '
                              "prefix of the other, so one token cannot tell them apart")
    self.option_prefix, self.option_ids = a[:shared], (a[shared], b[shared])

  def text(self, prompt, first: str, second: str, principle: Principle) -> str:
    return judge_text(self.constitution, prompt, first, second, principle)

  def sequence(self, prompt, first: str, second: str, principle: Principle) -> list[int]:
    """The token ids scored for one ordering: the rendered judge prompt, the assistant
    header, and the options' shared leading tokens."""
    from lmjax.data import formats  # pylint: disable=import-outside-toplevel
    turns = [{'role': 'user', 'content': self.text(prompt, first, second, principle)},
             {'role': 'assistant', 'content': ''}]
    rendered = formats.render_prompt(turns, self.template, self.tokenizer)
    return formats.prompt_ids(rendered, self.tokenizer, self.template) + self.option_prefix

  def draw_principles(self, n: int, seed: int) -> np.ndarray:
    """[n, K] principle indices, K distinct ones per comparison, from `seed`."""
    rng = np.random.default_rng(seed)
    m = len(self.principles)
    return np.stack([rng.permutation(m)[:self.k] for _ in range(n)]) if n else np.zeros(
        (0, self.k), np.int64)

  def compare(self, prompts: Sequence, a: Sequence[str], b: Sequence[str], *,
              seed: int = 0, principles: np.ndarray | None = None) -> Comparison:
    """p(a[i] > b[i]) for each prompt: 2K forward passes per pair (each ordering under each
    of its K principles), batched through one scorer on the model's mesh."""
    if not len(prompts) == len(a) == len(b):
      raise ValueError(f'compare: {len(prompts)} prompts, {len(a)} and {len(b)} answers')
    from lmjax import evaluate, sharding  # pylint: disable=import-outside-toplevel
    n = len(prompts)
    idx = self.draw_principles(n, seed) if principles is None else np.asarray(principles)
    seqs = []
    for i in range(n):
      for k in range(idx.shape[1]):
        pr = self.principles[int(idx[i, k])]
        seqs.append(self.sequence(prompts[i], a[i], b[i], pr))   # a shown first
        seqs.append(self.sequence(prompts[i], b[i], a[i], pr))   # b shown first
    m = self.model
    # pylint: disable-next=protected-access
    m._check_len(max(map(len, seqs), default=0), 'a judge prompt')
    t0 = time.perf_counter()
    with sharding.use_mesh(m.mesh, m.config.rules):
      lp = evaluate.choice_logprobs(m.graphdef, m.params, seqs,
                                    [self.option_ids] * len(seqs), mesh=m.mesh,
                                    rules=m.config.rules, batch_size=self.batch_size)
    seconds = time.perf_counter() - t0
    d = (lp[:, 0].astype(np.float64) - lp[:, 1].astype(np.float64)).reshape(n, -1, 2)
    p_first = 1.0 / (1.0 + np.exp(-d))  # normalised over the two option tokens
    # a > b: a's option with a first (the first option), and a's with b first (the second)
    p = np.mean((p_first[..., 0] + (1.0 - p_first[..., 1])) / 2.0, axis=1) if n else (
        np.zeros((0,)))
    return Comparison(p=p, p_first=p_first, principles=idx, seconds=seconds)


def judge_sft_examples(constitution: Constitution, pairs: Sequence[tuple[Any, str, str]], *,
                       seed: int = 0, principle: str | None = None) -> list[dict]:
  """SFT examples that teach a model to judge: for each (prompt, better, worse), the judge
  prompt (constitution.judge_template) with the two answers in a random order and the
  option of the better one as the assistant's answer ({"messages": [user, assistant]}).
  The principle is `principle` (a name) or one of the preference principles drawn per
  example; order and principle come from `seed`. Train with stage='sft' on them: the
  resulting model is a Judge for the same constitution and template."""
  principles = constitution.judge_principles()
  if principle is not None:
    principles = tuple(p for p in principles if p.name == principle)
    if not principles:
      raise ConstitutionError(f'constitution {constitution.source} has no preference '
                              f'principle named {principle!r}')
  rng = np.random.default_rng(seed)
  out = []
  for prompt, better, worse in pairs:
    pr = principles[int(rng.integers(len(principles)))]
    swap = bool(rng.integers(2))
    first, second = (worse, better) if swap else (better, worse)
    text = judge_text(constitution, prompt, first, second, pr)
    out.append({'messages': [{'role': 'user', 'content': text},
                             {'role': 'assistant', 'content': constitution.options[int(swap)]}]})
  return out


# ---- Critique and revision -----------------------------------------------------------

@dataclasses.dataclass
class Revisions:
  """revise()'s output: one record per prompt, and what generating cost."""
  records: list[dict]
  generated_tokens: int
  seconds: float


def _chat(model, convs, *, template, max_new_tokens, temperature, top_k, top_p, seed,
          batch_size) -> tuple[list[str], int]:
  """Answers to conversations, batch_size at a time; and the number of tokens generated."""
  answers, n_tok = [], 0
  for j in range(0, len(convs), batch_size):
    got, tokens = model.chat_with_counts(convs[j:j + batch_size], max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=seed + j, template=template)
    answers += got
    n_tok += tokens
  return answers, n_tok


def revise(model, constitution: Constitution, prompts: Sequence, *, rounds: int = 1,
           seed: int = 0, max_new_tokens: int = 64, temperature: float = 0.7, top_k: int = 0,
           top_p: float = 1.0, template: str | None = None, batch_size: int = 64,
           progress=None) -> Revisions:
  """Answer, then `rounds` x (critique under a principle, revise) for every prompt (module
  doc). Every generation step runs on all prompts at once (batch_size per call). The
  principle of each prompt's round r is drawn from a seeded RNG; sampling seeds derive
  from `seed`, so a fixed seed gives the same records."""
  if rounds < 1:
    raise ValueError(f'rounds must be >= 1, got {rounds}')
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(constitution.principles), size=(len(prompts), rounds))
  few = [dict(m) for m in constitution.few_shot]
  base = [prompt_turns(p) for p in prompts]
  kw = dict(template=template, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, batch_size=batch_size)
  t0 = time.perf_counter()
  step_seed = lambda s: int(np.random.SeedSequence([seed, s]).generate_state(1)[0] % 2**30)
  initial, total = _chat(model, [few + t for t in base], seed=step_seed(0), **kw)
  current = list(initial)
  history = [[] for _ in prompts]
  convs = [few + t + [{'role': 'assistant', 'content': a}] for t, a in zip(base, initial)]
  for r in range(rounds):
    principles = [constitution.principles[int(picks[i, r])] for i in range(len(prompts))]
    for c, p in zip(convs, principles):
      c.append({'role': 'user', 'content': p.critique})
    critiques, n1 = _chat(model, convs, seed=step_seed(2 * r + 1), **kw)
    for c, crit, p in zip(convs, critiques, principles):
      c += [{'role': 'assistant', 'content': crit}, {'role': 'user', 'content': p.revision}]
    revised, n2 = _chat(model, convs, seed=step_seed(2 * r + 2), **kw)
    for i, (c, rev) in enumerate(zip(convs, revised)):
      c.append({'role': 'assistant', 'content': rev})
      history[i].append({'principle': principles[i].name, 'critique': critiques[i],
                         'revision': rev})
      current[i] = rev
    total += n1 + n2
    if progress is not None:
      progress(r + 1, rounds)
  records = []
  for prompt, turns, first, final, hist in zip(prompts, base, initial, current, history):
    chosen = turns + [{'role': 'assistant', 'content': final}]
    records.append({'prompt': _last_user(turns) if isinstance(prompt, str) else turns,
                    'messages': chosen, 'chosen': chosen,
                    'rejected': turns + [{'role': 'assistant', 'content': first}],
                    'revisions': hist})
  return Revisions(records, total, time.perf_counter() - t0)


# ---- Records ------------------------------------------------------------------------

RESERVED = ('prompt', 'messages', 'chosen', 'rejected', 'p', 'label', 'margin', 'revisions')


def read_prompts(path: str, *, split: str = 'test', limit: int | None = None,
                 on_error: str = 'fail') -> list[tuple[Any, dict]]:
  """(prompt, columns) records: a JSONL file of prompt records (data/prompts.py: {"prompt":
  str | messages} or {"messages": [..., assistant]}, other fields kept as columns), or
  'builtin:synthetic' (the built-in task's `split` questions, with their 'answer' and
  'task'). A prompt given as a string stays a string; otherwise it is its turns."""
  from lmjax.data import formats, prompts, sft_task  # pylint: disable=import-outside-toplevel
  if formats.is_builtin(path):
    records = [prompts.normalize_prompt(ex) for ex in
               sft_task.make_examples(limit or 500, seed=0, split=split)]
  else:
    records, _ = prompts.read_prompts([os.path.expanduser(path)], on_error=on_error)
  out = [((turns if conv else turns[-1]['content']), cols) for turns, cols, conv in records]
  return out[:limit] if limit is not None else out


def read_pair_records(path: str, *, limit: int | None = None, on_error: str = 'fail'
                      ) -> list[tuple[Any, str, str, dict]]:
  """(prompt, chosen text, rejected text, record) of a JSONL file of preference pairs
  (data/preference.py's formats): the completions' last turns are what the judge
  compares; `record` is the line as read, written back with the judge's p."""
  from lmjax.data import formats, preference  # pylint: disable=import-outside-toplevel

  def normalize(obj):
    prompt, chosen, rejected = preference.normalize_pair(obj)
    return prompt, chosen[-1]['content'], rejected[-1]['content'], obj

  records, _ = formats.read_records([os.path.expanduser(path)], normalize, on_error=on_error,
                                    what='preference pair', field='--pairs')
  out = [([{'role': t['role'], 'content': t['content']} for t in p], c, r, obj)
         for p, c, r, obj in records]
  return out[:limit] if limit is not None else out


def sample_pairs(model, prompts: Sequence, *, seed: int = 0, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 template: str | None = None, batch_size: int = 64
                 ) -> tuple[list[str], list[str], int, float]:
  """Two sampled answers per prompt (all prompts batched): (first answers, second
  answers, tokens generated, seconds)."""
  if temperature <= 0:
    raise ValueError('sampling two answers to compare needs temperature > 0')
  convs = [prompt_turns(p) for p in prompts]
  kw = dict(template=template, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, batch_size=batch_size)
  t0 = time.perf_counter()
  both, n = _chat(model, convs + convs, seed=seed, **kw)
  return both[:len(convs)], both[len(convs):], n, time.perf_counter() - t0


def label_records(prompts: Sequence, a: Sequence[str], b: Sequence[str], p: np.ndarray, *,
                  columns: Sequence[dict] | None = None, orient: bool = True,
                  clamp: tuple[float, float] | None = None, min_confidence: float = 0.0,
                  keep_records: bool = False) -> tuple[list[dict], dict]:
  """{prompt, chosen, rejected, p, <columns>} records of judged pairs (p = p(a > b)), and
  counts. orient: chosen is the answer the judge prefers (p >= 0.5 written); else a is
  chosen whatever p says. Pairs of identical answers, and near-ties below
  min_confidence, are dropped; p is clamped last (clamp_and_filter). Completions are
  strings for a string prompt, else [{'role': 'assistant', 'content': text}].
  keep_records: columns[i] is pair i's record as read (a chosen, b rejected), written
  back whole with its p."""
  keep, labels = clamp_and_filter(p, clamp=clamp, min_confidence=min_confidence)
  out, counts = [], {'pairs': len(prompts), 'identical': 0, 'near_ties': 0, 'kept': 0}
  for i, prompt in enumerate(prompts):
    if a[i] == b[i]:
      counts['identical'] += 1
      continue
    if not keep[i]:
      counts['near_ties'] += 1
      continue
    if keep_records:
      out.append({**{k: v for k, v in columns[i].items() if k not in ('p', 'label')},
                  'p': float(labels[i])})
      continue
    first, second, q = a[i], b[i], float(labels[i])
    if orient and p[i] < 0.5:
      first, second, q = b[i], a[i], 1.0 - q
    wrap = (lambda t: t) if isinstance(prompt, str) else (
        lambda t: [{'role': 'assistant', 'content': t}])
    rec = {'prompt': prompt, 'chosen': wrap(first), 'rejected': wrap(second), 'p': q}
    for k, v in (columns[i] if columns else {}).items():
      if k not in RESERVED:
        rec[k] = v
    out.append(rec)
  counts['kept'] = len(out)
  return out, counts


def write_jsonl(path: str, records: Sequence[dict]) -> None:
  """Writes records one JSON object a line, atomically (a crash leaves no partial file);
  the same records give the same bytes."""
  path = os.path.expanduser(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')
  os.replace(tmp, path)
