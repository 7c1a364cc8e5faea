"""Loading, overriding and validating experiment configs.

A config is an `ml_collections.ConfigDict` returned by `get_config(arg)` in a Python file
under configs/, which updates the locked `base_config()`: every field exists there with
its default and type, so ml_collections itself rejects a typo (with a "did you mean") or a
value of the wrong type, in a config file, in Python, or on the command line, before
anything compiles. Every program takes the same arguments, parsed by
`ml_collections.config_flags`:

    --config=configs/pretrain_tiny.py[:arg] --config.optim.lr=1e-3 --config.train.steps=50

    cfg = lmjax.config.load('configs/pretrain_tiny.py', overrides={'optim.lr': 1e-3})

model.vocab_size follows tokenizer.vocab_size (a FieldReference): a config or
--config.tokenizer.vocab_size=N sets both, and setting model.vocab_size itself (an
imported model's padded vocabulary) unties it.

Two groups hold named entries that a config file adds: `data.mixture` (training sources
with weights) and `data.eval_sources` (extra evaluation sets). Each entry is built with
`data_source(...)`, a locked group of every source field, so the command line overrides
any of them (--config.data.mixture.domain.weight=0.5) and a typo in one fails. A config
file sets the whole group, or adds an entry to the group it starts from:

    cfg.data.mixture = dict(general=data_source(text_glob='stdlib', weight=0.2),
                            domain=data_source(text_glob='site:jax', weight=0.8))
    with cfg.data.eval_sources.unlocked():
      cfg.data.eval_sources.held_out = data_source(text_glob='/data/held_out/*.txt')

validate() checks what involves several fields; each group's own checks live beside the
code that reads it and are called from here.
"""

from __future__ import annotations

import importlib.util
import os
import re
import traceback
from typing import Any, Mapping

import ml_collections
from ml_collections import config_dict

from lmjax.errors import UserError


class ConfigError(UserError, ValueError):
  """A config field is missing, mistyped or inconsistent; the message names it."""


def base_config() -> ml_collections.ConfigDict:
  """Every field lmjax reads, with its default, locked: configs update it (and may only
  add entries to data.mixture / data.eval_sources, see data_source)."""
  cfg = ml_collections.ConfigDict()
  # The tokenizer's vocabulary; model.vocab_size follows it unless set itself (an imported
  # model's embedding may be padded beyond its tokenizer's pieces).
  vocab_size = config_dict.FieldReference(32000)
  cfg.seed = 0
  # The objective (lmjax/train/objectives): 'pretrain' (next-token prediction on cfg.data
  # documents), 'sft' (cfg.sft conversations, loss on assistant tokens only), 'dpo'
  # (cfg.dpo preference pairs), 'kto' (cfg.kto like/dislike feedback) or 'reward' (a
  # reward model on cfg.reward pairs). With lora.enabled it trains LoRA adapters on a
  # frozen base (init_from) instead of every weight.
  cfg.stage = 'pretrain'

  cfg.model = dict(
      vocab_size=config_dict.FieldReference(vocab_size),  # = tokenizer.vocab_size
      d_model=512,
      n_layers=8,
      n_heads=8,
      n_kv_heads=8,           # < n_heads: grouped-query attention.
      head_dim=0,             # 0: d_model // n_heads.
      d_ff=1376,              # SwiGLU hidden size.
      norm_eps=1e-5,
      rope_theta=10000.0,
      # Llama-3 style frequency scaling; type 'none' or 'llama3'.
      rope_scaling=dict(type='none', factor=8.0, low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_len=8192),
      tie_embeddings=False,
      qkv_bias=False,         # Qwen2 style.
      qk_norm=False,          # Qwen3 style: RMSNorm over each head's queries and keys.
      # Mixture of experts (models/moe.py): every layer's feed-forward becomes `experts`
      # SwiGLU experts of hidden size d_ff (0: model.d_ff), each token routed to top_k.
      moe=dict(
          experts=0,            # 0 = a dense model.
          top_k=2,
          d_ff=0,
          renormalize=True,     # top-k weights rescaled to sum to 1 (Mixtral, Qwen3-MoE).
          shared_d_ff=0,        # > 0: a shared expert of this hidden size sees every token
          shared_gate=True,     # ... scaled by sigmoid(x @ gate) (Qwen2-MoE).
          # dropless (grouped matmul, nothing dropped) | capacity (capacity_factor * T * k
          # / E slots per expert and row, overflow dropped) | dense (every expert on every
          # token: the reference).
          dispatch='dropless',
          # dropless's grouped matmul: xla (jax.lax.ragged_dot) | pallas (jax's Pallas
          # Mosaic-GPU kernels, Hopper GPUs only; models/grouped_matmul.py) | auto (pallas
          # where it fits, else xla).
          grouped_matmul='xla',
          capacity_factor=1.25,
          aux_loss=0.01,        # load-balancing loss weight (k at uniform routing).
          # layer: each layer's balance loss, averaged | pooled: over every layer's tokens
          # pooled (Hugging Face's load_balancing_loss_func; per-layer imbalances cancel).
          balance='layer',
          z_loss=0.001,         # router z-loss weight (ST-MoE).
      ),
      # lm: next-token logits (lm_head, or the tied embedding) | score: a scalar reward
      # head read at each sequence's last token (models/reward.py), exported as Hugging
      # Face *ForSequenceClassification with num_labels=1.
      head='lm',
      init_std=0.02,
      # normal: every weight N(0, init_std) | scaled: the projections into the residual
      # stream (attention out, MLP / expert down) at init_std / sqrt(2 n_layers), the
      # depth scaling of GPT-2, GPT-NeoX and OLMo.
      init='normal',
      # Gemma 2's soft-capping, cap·tanh(x / cap) (0 = off): of the attention scores
      # (attention xla or splash) and of the output logits.
      attn_logit_softcap=0.0,
      final_logit_softcap=0.0,
      param_dtype='float32',  # float32 or bfloat16.
      dtype='float32',        # compute dtype: float32 or bfloat16.
      scan_layers=True,       # lax.scan over layers (fast compile) or unrolled.
      remat='none',           # none | dots | dots_no_batch | full | offload_dots
                              # (dots_no_batch's saved values in pinned host memory).
      # auto: cudnn on a GPU (bfloat16 compute, no attention soft-cap), splash on a TPU,
      # else xla | xla: masked scores [B, N, T, T] | cudnn: cuDNN's fused kernel (GPU) |
      # splash: the Pallas splash kernel (TPU; elsewhere Pallas interpret mode, slow: for
      # tests), which skips fully masked blocks and never holds the scores.
      attention='auto',
      # Splash kernel blocks (capped at the sequence length, which they must divide;
      # multiples of 128): forward (q, kv, kv_compute), backward dK/dV (q_dkv, kv_dkv,
      # kv_dkv_compute), dQ fused into the dK/dV kernel unless fused_bwd=False.
      splash=dict(block_q=512, block_kv=512, block_kv_compute=512, block_q_dkv=512,
                  block_kv_dkv=512, block_kv_dkv_compute=512, fused_bwd=True),
      # cudnn: the most segments (documents, and a padding run) one row may hold, a static
      # bound of cuDNN's packed attention; the loop refuses a batch that exceeds it.
      # 1 = rows are never packed or padded (plain causal kernel).
      max_segments=32,
      # Cross-entropy over this many positions at a time, each chunk's logits recomputed
      # in the backward pass: float32 logits of the whole batch [B, T, vocab] never exist.
      # Must divide data.seq_len; 0 = all at once.
      loss_chunk=0,
  )

  cfg.data = dict(
      # local_text: a glob of text files | tfds: a TFDS name | jsonl, parquet, hf_disk:
      # shards of records in data.files (data/corpora.py).
      source='local_text',
      # 'stdlib' = this Python's standard library sources; 'site:jax,flax' = the installed
      # sources of those packages; else globs separated by commas.
      text_glob='stdlib',
      tfds_name='',           # e.g. 'c4/en:3.1.0' with data_dir='gs://bucket/tfds', or a
                              # prepared dataset's directory (tools/prepare_data.py).
      # jsonl (.jsonl / .json, .gz / .zst compressed) | parquet | hf_disk (directories
      # written by datasets' save_to_disk): globs separated by commas. '{split}' names each
      # split's own shards ('/data/{split}-*.jsonl.gz'); without it data.val_fraction of the
      # records (by a stable hash) form the validation split.
      files='',
      data_dir='',            # TFDS data_dir (and shard indexes: <data_dir>/corpora);
                              # '' = ~/.cache/lmjax/tfds.
      text_key='text',        # tfds / jsonl / parquet / hf_disk: the field with the text.
      id_key='',              # jsonl / parquet / hf_disk: a record id for prepare_data's
                              # reports ('' = none).
      # jsonl / parquet / hf_disk: bad input (malformed JSON, text missing or not a string,
      # empty shard, truncated file): fail (file:line / row) | skip (counted, one line).
      on_error='fail',
      train_split='train',
      eval_split='validation',
      # Held out for validation: local_text files (by path hash); jsonl / parquet / hf_disk
      # records without '{split}' in data.files (by a hash of shard path and line / row).
      val_fraction=0.02,
      seq_len=256,
      shuffle=True,
      add_bos=True,
      add_eos=True,
      worker_threads=2,       # grain read/map threads per process (and per mixture source).
      # Read token ids from an array_record copy of each split (built on first use under
      # <data_dir>/tokenized/, keyed by source and tokenizer; tools/pretokenize.py builds
      # it ahead) instead of tokenizing on the fly. The stream is the same.
      pretokenize=False,
      prefetch=2,             # batches prepared ahead of the step.
      # Data shards of the global batch (0 = one per process), a multiple of the process
      # count: each process reads shards/processes of them. The batches depend on this, not
      # on the process count: 1 process with shards=2 sees a 2-process run's batches.
      shards=0,
      # Named training sources mixed by documents with the given weights ({} = the single
      # source above): {name: data_source(weight=..., text_glob=...)}. Each is also
      # evaluated on its eval split (eval/<name>/loss).
      mixture={},
      # Named extra evaluation sets, {name: data_source(...)}: eval/<name>/loss.
      eval_sources={},
  )

  # Start a new run's params from another run (domain-adaptive continued pretraining):
  # an lmjax workdir (its checkpoint `step`, -1 = latest) or a Hugging Face model dir
  # (config.json + *.safetensors). Fresh optimizer state, step 0. Ignored when the
  # workdir has a checkpoint of its own (that run resumes).
  cfg.init_from = dict(path='', step=-1, format='auto')  # format: auto | lmjax | hf.

  cfg.tokenizer = dict(
      # A sentencepiece .model, a Hugging Face tokenizer.json, or a directory holding
      # either (with its tokenizer_config.json: special tokens, chat template); '' =
      # init_from's tokenizer when set, else
      # <data_dir>/tokenizers/<dataset>_<model_type>_<vocab_size>.model.
      path='',
      vocab_size=vocab_size,
      train_if_missing=True,  # train a sentencepiece model on the train split if `path`
                              # (a .model) does not exist.
      model_type='bpe',
      max_sentences=200_000,  # lines sampled for sentencepiece training.
  )

  cfg.train = dict(
      global_batch=16,        # sequences per optimizer step, across all processes.
      grad_accum=1,           # micro-batches per step (global_batch % grad_accum == 0).
      steps=1000,
      log_every=10,
      eval_every=200,
      eval_batches=8,
      z_loss=0.0,             # coefficient of log(Z)^2; 1e-4 is common.
      # Skip (no update, counted as skipped_steps) a step whose gradients are not finite
      # or, with spike_threshold > 0, whose gradient norm exceeds spike_threshold x the
      # running mean of the accepted steps'; more than max_skips_in_a_row skips in a row
      # stop the run. Off: a non-finite loss stops the run at once.
      skip_bad_steps=False,
      spike_threshold=0.0,    # e.g. 5.0; 0 = skip non-finite steps only.
      max_skips_in_a_row=10,
      # What a loss spike does: stop (a TrainingError naming the last checkpoint) or
      # rewind (restore the last checkpoint before the spike, skip the batches that
      # followed it, continue; each rewind is recorded in the checkpoint meta's 'rewinds'
      # and in metrics.jsonl). A step's loss is a spike when it is non-finite (and not a
      # step skip_bad_steps skipped) or, with loss_spike.factor > 0, above factor x the
      # mean loss of the previous loss_spike.window steps.
      on_spike='stop',
      loss_spike=dict(
          factor=0.0,         # e.g. 2.0; 0 = non-finite losses only. Positive losses only.
          window=50,          # steps in the running mean (judged once 10 are in it).
          skip_batches=100,   # rewind: data batches skipped after the restored step (at
                              # least through the spike's own batch).
          max_rewinds=5,      # rewind: more in one run stop it.
      ),
      # Stability telemetry of every log step, computed by a second compiled step that
      # runs there only (its cost: tools/bench.py --telemetry): per layer the max
      # |attention logit| (before any soft-cap), the residual stream's RMS and the
      # gradient and update norms ('stability/layer<i>/...'); the output's mean and max
      # log Z over loss tokens; the spike score (the fraction of steps whose loss lay
      # > 7 sigma above the mean of the previous 1000). The forward-pass statistics need
      # an LM objective (pretrain, sft); the others log the norms and spike score.
      telemetry=False,
      progress_bar=True,
      sample_at_end=True,
      # Weights & Biases, beside metrics.jsonl and TensorBoard (process 0; needs
      # `pip install -e ".[wandb]"`): the config as the wandb run's config, the same
      # scalars at the same steps; every start of the run in one workdir continues one
      # wandb run (its id in <workdir>/wandb_run_id). project '' = off.
      wandb=dict(
          project='',
          entity='',          # '' = your default entity.
          name='',            # '' = the workdir's name.
          mode='',            # online | offline (`wandb sync` later) | disabled;
                              # '' = wandb's default ($WANDB_MODE, else online).
          tags='',            # comma-separated, e.g. 'dapt,tiny'.
      ),
  )

  cfg.optim = dict(
      lr=3e-4,
      warmup_steps=100,
      min_lr_ratio=0.1,       # cosine decays to lr * min_lr_ratio at the last step.
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      clip_norm=1.0,          # 0 disables clipping.
  )

  # Multi-process runs (lmjax/distributed.py): auto starts jax.distributed when a
  # coordinator is given (here or $LMJAX_COORDINATOR_ADDRESS, with the process count and
  # id) or on a Cloud TPU VM / SLURM / Open MPI job; manual requires the coordinator.
  cfg.distributed = dict(
      mode='auto',            # auto | manual | off.
      coordinator_address='',  # host:port of process 0; '' = $LMJAX_COORDINATOR_ADDRESS.
      num_processes=0,        # 0 = $LMJAX_NUM_PROCESSES.
      process_id=-1,          # -1 = $LMJAX_PROCESS_ID.
      timeout_s=300,          # waiting for every process to join.
  )

  # Mesh axis sizes; -1 takes the devices left over. Product must equal the devices.
  # sequence: context parallelism, each sequence split across this many devices (the
  # 'length' rule below), attention over all-gathered keys and values.
  cfg.mesh = dict(data=-1, fsdp=1, expert=1, sequence=1, tensor=1)
  # Logical axis -> mesh axis (or tuple of axes; None = replicated: a placeholder that a
  # mesh axis name may set, e.g. --config.rules.head_dim=tensor).
  cfg.rules = dict(
      batch=('data', 'fsdp', 'expert'),
      length='sequence',
      embed='fsdp',
      mlp='tensor',
      expert='expert',        # MoE expert weights (and their capacity buffers).
      heads='tensor',
      kv_heads='tensor',
      head_dim=placeholder(str),
      vocab='tensor',
      layers=placeholder(str),
  )

  cfg.checkpoint = dict(
      every=200,              # save every N steps (and at the end, and on SIGTERM).
      keep=3,
      async_save=True,
  )

  # Supervised fine-tuning data (data/formats.py): chat or prompt/completion examples,
  # rendered with a template, loss on assistant tokens only, packed into data.seq_len rows.
  cfg.sft = dict(
      source='jsonl',         # jsonl | tfds (tfds_name's records, data.data_dir).
      # JSONL file / glob(s) with '{split}' for the split name, e.g. 'sft/{split}.jsonl';
      # 'builtin:synthetic' = the built-in task (data/sft_task.py), written on first use. Without
      # '{split}' it is the train split only (no eval split unless eval_path names one).
      path='',
      # JSONL file / glob(s) of held-out examples: the data.eval_split split ('' = path's).
      eval_path='',
      # The eval split may not share examples (or files) with the train split; True: a
      # warning with their count instead of an error.
      allow_overlap=False,
      # Degenerate examples (an empty assistant turn; a prompt that leaves no room for an
      # answer within data.seq_len), counted before training (data/check.py): drop | warn
      # (train on them) | fail. More than max_degenerate of a split fails in any case.
      on_degenerate='drop',
      max_degenerate=0.05,
      tfds_name='',
      # auto: the tokenizer's own chat template ('model') when it has one, else chatml.
      # model | chatml | llama3 | plain (built-in templates: see data/formats.py).
      template='auto',
      overlong='truncate',    # truncate | drop: conversations longer than data.seq_len.
      on_error='skip',        # skip | fail: malformed JSONL lines (counted / file:line).
      packing_bins=16,        # grain first-fit bins filled at once (more: less padding).
      task_sizes=dict(train=20000, validation=500, test=500),  # built-in task examples.
      task_seed=0,
      # At each eval: greedy answers to the first N examples of data.eval_split, compared
      # with their final assistant turn (eval/exact_match); 0 disables.
      eval_examples=64,
      eval_max_new_tokens=32,
  )

  # Preference data and loss (data/preference.py, train/losses.py `dpo`); the chat
  # template is sft.template.
  cfg.dpo = dict(
      source='jsonl',         # jsonl | tfds ({"prompt", "chosen", "rejected"} records).
      path='',                # JSONL with '{split}'; 'builtin:synthetic' = the built-in pairs.
      eval_path='',           # held-out pairs (data.eval_split), as sft.eval_path.
      allow_overlap=False,    # as sft.allow_overlap.
      # Degenerate pairs (chosen == rejected, an empty completion, a prompt that leaves no
      # room for a completion within data.seq_len): as sft.on_degenerate / max_degenerate.
      on_degenerate='drop',
      max_degenerate=0.05,
      tfds_name='',
      loss_type='sigmoid',    # sigmoid | robust | hinge | ipo (see losses.dpo).
      beta=0.1,
      label_smoothing=0.0,    # sigmoid: conservative DPO; robust: the assumed label noise.
      # Per-pair soft labels: each pair's "label" (or "p", an AI judge's probability that
      # chosen is better; tools/ai_feedback.py judge) smooths its sigmoid loss by 1 - p.
      soft_labels=False,
      reference_free=False,
      rpo_alpha=0.0,          # > 0: + alpha x the chosen answers' per-token NLL (RPO).
      # auto: adapters_off with LoRA (the base, in the same step: no second copy), else
      # copy (a frozen copy of init_from's params); precomputed: the reference's log-probs
      # computed once before training, cached in the workdir and read with the data
      # (train/ref_logps.py): no reference forward pass or weights during training.
      reference='auto',
      overlong='truncate',    # truncate (completions; a prompt that fills seq_len drops
                              # the pair, counted) | drop (any pair longer than seq_len).
      on_error='skip',        # skip | fail: malformed JSONL lines.
      task_sizes=dict(train=20000, validation=500, test=500),  # built-in task pairs.
      task_seed=0,
  )

  # Unpaired like/dislike feedback and the KTO loss (data/feedback.py, train/losses.py
  # `kto`); the chat template is sft.template.
  cfg.kto = dict(
      # jsonl | tfds: {"prompt", "completion", "label": true | false} records (strings or
      # chat messages), or preference pairs {"prompt", "chosen", "rejected"}, each split
      # into a liked and a disliked example.
      source='jsonl',
      path='',                # JSONL with '{split}'; 'builtin:synthetic' = the built-in
                              # pairs (dpo's), split into liked and disliked answers.
      eval_path='',           # held-out examples (data.eval_split), as sft.eval_path.
      allow_overlap=False,    # as sft.allow_overlap.
      # Degenerate examples (an empty completion, a prompt that leaves no room for a
      # completion within data.seq_len): as sft.on_degenerate / max_degenerate.
      on_degenerate='drop',
      max_degenerate=0.05,
      tfds_name='',
      loss_type='kto',        # kto | apo_zero_unpaired (see losses.kto).
      beta=0.1,
      # The weights of liked (λD) and disliked (λU) examples' losses; keep
      # λD·n_liked / (λU·n_disliked) in [1, 4/3] (the KTO paper; a warning says so).
      desirable_weight=1.0,
      undesirable_weight=1.0,
      reference='auto',       # auto | adapters_off | copy | precomputed, as dpo.reference.
      overlong='truncate',    # truncate | drop, as dpo.overlong (an example with its KL row).
      on_error='skip',        # skip | fail: malformed JSONL lines (and non-bool labels).
      task_sizes=dict(train=20000, validation=500, test=500),  # built-in task pairs.
      task_seed=0,
  )

  # Reward models (stage='reward', model.head='score'; train/objectives/reward.py): the
  # Bradley-Terry loss on preference pairs read as cfg.dpo's are, with optional per-pair
  # 'margin' and 'label' (the share of judges preferring chosen) columns.
  cfg.reward = dict(
      source='jsonl',         # jsonl | tfds, as dpo.source.
      path='',                # JSONL with '{split}'; 'builtin:synthetic' = the built-in pairs.
      eval_path='',           # held-out pairs (data.eval_split), as sft.eval_path.
      allow_overlap=False,    # as sft.allow_overlap.
      on_degenerate='drop',   # as dpo.on_degenerate / max_degenerate.
      max_degenerate=0.05,
      tfds_name='',
      # drop (default; as TRL's RewardTrainer filters by max_length): a pair longer than
      # data.seq_len is skipped, counted; truncate: cut to fit, but a response is then
      # scored at a token it does not end with.
      overlong='drop',
      on_error='skip',        # skip | fail: malformed JSONL lines (bad margin / label too).
      task_sizes=dict(train=20000, validation=500, test=500),  # built-in task pairs.
      task_seed=0,
      # > 0: + coef x (r_chosen + r_rejected)^2 per pair (TRL's center_rewards_coefficient):
      # keeps the rewards centred on 0.
      center_rewards_coefficient=0.0,
  )

  # Online RL (stage='grpo', train/objectives/grpo.py): each step samples
  # num_generations completions of every prompt of the batch (train.global_batch prompts)
  # on the training mesh, scores them with reward functions, and updates the policy
  # towards the better ones (GRPO and its DAPO / Dr. GRPO variants, as TRL's GRPOTrainer).
  cfg.grpo = dict(
      # jsonl | tfds: {"prompt": str | [messages], ...} records; every other field is a
      # column the reward functions receive (e.g. "answer"). Conversations {"messages":
      # [..., assistant]} work too: the prompt is the turns before the last, which
      # becomes the "answer" column.
      source='jsonl',
      path='',                # JSONL with '{split}'; 'builtin:synthetic' = the built-in
                              # task's questions (sft.task_sizes / task_seed), with answers.
      eval_path='',           # held-out prompts (data.eval_split), as sft.eval_path.
      allow_overlap=False,    # as sft.allow_overlap.
      on_degenerate='drop',   # an empty prompt, or one that leaves no room for
      max_degenerate=0.05,    # max_completion_length tokens within data.seq_len.
      on_error='skip',        # skip | fail: malformed JSONL lines.
      tfds_name='',
      num_generations=4,      # G: completions per prompt (a group).
      max_completion_length=32,
      # Sampling; the trainer's log-probs are taken under the same distribution
      # (temperature, top-k, top-p, renormalised), so the first update's ratios are 1.
      temperature=1.0,
      top_k=0,
      top_p=1.0,
      # Comma-separated reward functions: 'module.path:function' with TRL's signature
      # f(prompts, completions, completion_ids, **columns) -> list[float | None], or a
      # built-in: exact_match (the 'answer' column), format (one short line),
      # reward_model (grpo.reward_model's score), judge (grpo.judge's verdicts).
      reward_funcs='exact_match',
      reward_weights='',      # comma-separated weights, one per function ('' = all 1.0).
      # The reward model the built-in 'reward_model' function scores with: an lmjax
      # stage='reward' workdir or a Hugging Face *ForSequenceClassification directory.
      reward_model='',
      # The built-in 'judge' function: a language model (lmjax workdir or Hugging Face
      # directory) that compares the completions of each prompt under the preference
      # principles of a constitution JSON file (configs/constitution_tiny.json), K drawn
      # per comparison; a completion's reward is its mean probability of winning.
      judge='',
      constitution='',
      judge_principles=1,
      scale_rewards='group',  # group | batch | none: the std advantages are divided by.
      loss_type='dapo',       # grpo | bnpo | dr_grpo | dapo (losses.grpo_sums).
      epsilon_low=0.2,        # the clipped surrogate's range: [1 - low, 1 + high].
      epsilon_high=0.2,
      beta=0.0,               # > 0: + beta x KL(policy || reference), the k3 estimator.
      reference='auto',       # auto | adapters_off | copy (the KL's reference, beta > 0).
      num_iterations=1,       # μ: optimizer updates on each batch of completions.
      # DAPO's dynamic sampling: drop the groups whose rewards are all equal (no
      # advantage, no gradient) and sample more prompts until the batch is full, at most
      # max_resample extra rounds a step (then the batch is filled with dropped groups).
      dynamic_sampling=False,
      max_resample=4,
  )

  # LoRA adapters (models/lora.py): the base params are frozen, only adapters train.
  cfg.lora = dict(
      enabled=False,
      # 'all-linear' | names 'q,k,v,o,gate,up,down' (or PEFT's q_proj, ...) | a regex
      # matched in full against param paths such as 'layers/attn/(q|v)'.
      targets='all-linear',
      rank=8,
      alpha=16.0,
      dropout=0.0,            # on each adapter's input, in training only.
      rslora=False,           # scale alpha/sqrt(rank) instead of alpha/rank.
      base_dtype='float32',   # frozen base weights: float32 or bfloat16; adapters float32.
      # Base params trained fully alongside the adapters (PEFT's modules_to_save): a regex
      # matched in full against param paths, e.g. 'embed' when a chat template's tokens
      # are new to the base, 'final_norm/scale'; '' = none. Checkpointed with the adapters.
      train_params='',
  )

  cfg.sample = dict(prompt='def ', max_new_tokens=64, temperature=0.8, top_k=40)
  cfg.lock()
  return cfg


def _message(e: BaseException) -> str:
  """ml_collections' (or any) exception message on one line: a KeyError's text unquoted,
  without the dump of a group's every field that a locked ConfigDict adds."""
  while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(...))
    e = e.args[0]
  text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
  text = re.sub(r' ?Other fields present: ".*?"(?=\n|$)', '', text, flags=re.S)
  return ' '.join(line.strip() for line in text.splitlines() if line.strip())


def _config_file_error(path: str, doing: str, e: Exception) -> ConfigError:
  """ConfigError naming the config file, the line of it that raised, and the error (the
  config file's own code failed: its traceback is the ConfigError's cause)."""
  line, detail = None, _message(e)
  if isinstance(e, SyntaxError):
    line, detail = e.lineno, e.msg
  for frame in traceback.extract_tb(e.__traceback__):
    if os.path.abspath(frame.filename) == os.path.abspath(path):
      line = frame.lineno
  where = f'{path}, line {line}' if line else path
  return ConfigError(f'config file {where}: {doing} raised {type(e).__name__}: {detail}')


def _import_config_module(path: str):
  if not os.path.exists(path):
    raise ConfigError(f'config file not found: {path}')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path} is not a file (configs/*.py)')
  name = 'lmjax_config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise ConfigError(f'config file {path} is not a Python file (configs/*.py)')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code)
    raise _config_file_error(path, 'loading it', e) from e
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg=None)')
  return module


def build(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file ('path', or 'path.py:arg' as --config takes it),
  not validated: for a config built on another one (configs/dapt_tiny.py starts from
  configs/pretrain_tiny.py). A config file that raises (a field that does not exist, a
  value of the wrong type) gives a ConfigError naming the file and the line."""
  if arg is None and '.py:' in path:
    path, arg = path.split('.py:', 1)
    path += '.py'
  module = _import_config_module(path)
  try:
    return module.get_config(arg)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code)
    raise _config_file_error(path, f'get_config({arg!r})', e) from e


def _check_key(cfg: ml_collections.ConfigDict, key: str) -> None:
  """ConfigError unless `key` ('optim.lr') names a field of `cfg`, with ml_collections'
  own "did you mean" when it has one."""
  from ml_collections.config_flags import config_path  # pylint: disable=import-outside-toplevel
  try:
    config_path.get_type(key, cfg)
  except (KeyError, AttributeError, IndexError, ValueError, SyntaxError) as e:
    hint = _message(e).partition('Did you mean ')[2]
    raise ConfigError(f'unknown config key {key!r}'
                      + (f' (did you mean {hint.rstrip("?")}?)' if hint else '')) from None


def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys ({'optim.lr': 1e-3}) of `cfg` with ml_collections'
  update_from_flattened_dict; an unknown key or a wrong type is a ConfigError naming it."""
  for key, value in overrides.items():
    _check_key(cfg, key)
    try:
      cfg.update_from_flattened_dict({key: value})
    except TypeError as e:
      raise ConfigError(f'config key {key!r}: {_message(e)}') from None
  return cfg


def is_config_arg(arg: str) -> bool:
  """True for --config=FILE[:arg], --config FILE and --config.KEY=VALUE (also absl's
  boolean --config.KEY / --noconfig.KEY)."""
  return (arg == '--config' or arg.startswith(('--config=', '--config.', '--noconfig.')))


def split_args(argv: list[str]) -> tuple[str | None, list[str], list[str]]:
  """argv -> (the last --config=FILE[:arg] or None, the --config.KEY=VALUE overrides in
  order, the other arguments): for a tool that parses its own flags with argparse."""
  path, overrides, rest = None, [], []
  args = iter(argv)
  for arg in args:
    if arg == '--config':
      path = next(args, None)
    elif arg.startswith('--config='):
      path = arg.split('=', 1)[1]
    elif is_config_arg(arg):
      overrides.append(arg)
    else:
      rest.append(arg)
  return path, overrides, rest


def apply_flags(cfg: ml_collections.ConfigDict, flags: list[str]) -> ml_collections.ConfigDict:
  """Applies command-line overrides (['--config.optim.lr=1e-3', ...]) to `cfg` in place,
  parsed by ml_collections.config_flags exactly as `python -m lmjax.train` parses them
  (each value by its field's type: 'true', '1e-3', "'(a, b)'"). Bad input is a
  ConfigError naming the flag."""
  if not flags:
    return cfg
  from absl import flags as absl_flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel
  for flag in flags:  # each key first: ml_collections' error, with the key it is about
    if not is_config_arg(flag) or flag.startswith('--config='):
      raise ConfigError(f'unexpected argument {flag!r} (config overrides are '
                        '--config.KEY=VALUE)')
    _check_key(cfg, flag.split('=', 1)[0].split('.', 1)[1])
  values = absl_flags.FlagValues()
  argv = ['lmjax', *flags]
  config_flags.DEFINE_config_dict('config', cfg, flag_values=values, sys_argv=argv,
                                  lock_config=cfg.is_locked)
  try:
    values(argv)
  except absl_flags.Error as e:
    raise ConfigError(_message(e)) from None
  return cfg


def lock(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks every group of `cfg`, also those a config file assigned anew inside a locked
  one (cfg.data.mixture = {...}): ConfigDict.lock() stops at a group locked already."""
  return cfg.unlock().lock()


def smoke_arg(arg: str | None) -> tuple[bool, str]:
  """A stage config's arg: 'smoke', 'smoke:PATH', 'PATH' or None -> (smoke, PATH or '')."""
  head, _, rest = (arg or '').partition(':')
  if head == 'smoke':
    return True, rest
  return False, arg or ''


def load(path: str, overrides: Mapping[str, Any] | None = None,
         arg: str | None = None, flags: list[str] | None = None) -> ml_collections.ConfigDict:
  """Loads configs/<name>.py (optionally 'path:arg', as --config takes it: everything
  after '.py:' is the arg), applies `overrides` ({'optim.lr': 1e-3}) then command-line
  `flags` (['--config.optim.lr=1e-3']), validates; the result is locked."""
  cfg = lock(build(path, arg))
  if overrides:
    apply_overrides(cfg, overrides)
  apply_flags(cfg, flags or [])
  validate(cfg)
  return cfg


# ---- Named sources: data.mixture and data.eval_sources --------------------------------

# The fields of a named source. '' (val_fraction: -1) = the value of the same cfg.data field.
SOURCE_FIELDS = {
    'source': '', 'text_glob': '', 'tfds_name': '', 'files': '', 'data_dir': '',
    'text_key': '', 'id_key': '', 'on_error': '', 'train_split': '', 'eval_split': '',
    'val_fraction': -1.0,
    'weight': 1.0,  # data.mixture: relative share of documents (unused by eval_sources).
}
SOURCE_GROUPS = ('mixture', 'eval_sources')
CORPUS_FORMATS = ('jsonl', 'parquet', 'hf_disk')  # data/corpora.py: shards in data.files
_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_]*$')  # also a metric and a command-line key


def data_source(**fields) -> ml_collections.ConfigDict:
  """An entry of data.mixture / data.eval_sources: a locked group holding every source
  field (so that command-line overrides reach each of them, and a typo in one fails);
  unset ones fall back to cfg.data's.

      cfg.data.mixture = dict(general=data_source(text_glob='stdlib', weight=0.2),
                              domain=data_source(text_glob='site:jax', weight=0.8))
  """
  entry = ml_collections.ConfigDict(dict(SOURCE_FIELDS))
  entry.lock()
  try:
    entry.update(fields)
  except (KeyError, AttributeError, TypeError) as e:
    raise ConfigError(f'data_source: {_message(e)} (fields: {", ".join(SOURCE_FIELDS)})'
                      ) from None
  return entry


def resolve_source(cfg_data, entry) -> ml_collections.ConfigDict:
  """cfg.data with the fields that `entry` sets: a single-source data group."""
  d = ml_collections.ConfigDict(cfg_data.to_dict())
  d.mixture, d.eval_sources = {}, {}
  for field, value in entry.items():
    if field != 'weight' and value != SOURCE_FIELDS[field]:
      d[field] = value
  return d


def mixture_sources(cfg_data) -> dict[str, tuple[float, ml_collections.ConfigDict]]:
  """{name: (weight, data group)} of data.mixture, by sorted name; {} = no mixture."""
  return {name: (float(e.weight), resolve_source(cfg_data, e))
          for name, e in sorted(cfg_data.mixture.items())}


def eval_sources(cfg_data) -> dict[str, ml_collections.ConfigDict]:
  """{name: data group} evaluated separately: every mixture source, then data.eval_sources."""
  out = {name: d for name, (_, d) in mixture_sources(cfg_data).items()}
  out.update((name, resolve_source(cfg_data, e))
             for name, e in sorted(cfg_data.eval_sources.items()))
  return out


_CHOICES = {
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.remat': ('none', 'dots', 'dots_no_batch', 'full', 'offload_dots'),
    'model.attention': ('auto', 'xla', 'cudnn', 'splash'),
    'model.head': ('lm', 'score'),
    'model.rope_scaling.type': ('none', 'llama3'),
    'model.init': ('normal', 'scaled'),
    'model.moe.dispatch': ('dropless', 'capacity', 'dense'),
    'model.moe.balance': ('layer', 'pooled'),
    'model.moe.grouped_matmul': ('auto', 'xla', 'pallas'),
    'data.source': ('local_text', 'tfds', 'jsonl', 'parquet', 'hf_disk'),
    'data.on_error': ('fail', 'skip'),
    'tokenizer.model_type': ('bpe', 'unigram'),
    'stage': ('pretrain', 'sft', 'dpo', 'kto', 'reward', 'grpo'),
    'train.wandb.mode': ('', 'online', 'offline', 'disabled'),
    'train.on_spike': ('stop', 'rewind'),
    'dpo.reference': ('auto', 'adapters_off', 'copy', 'precomputed'),
    'sft.source': ('jsonl', 'tfds'),
    'sft.template': ('auto', 'model', 'llama3', 'chatml', 'plain'),
    'sft.overlong': ('truncate', 'drop'),
    'sft.on_error': ('skip', 'fail'),
    'sft.on_degenerate': ('drop', 'warn', 'fail'),
    'dpo.source': ('jsonl', 'tfds'),
    'dpo.loss_type': ('sigmoid', 'robust', 'hinge', 'ipo'),
    'dpo.overlong': ('truncate', 'drop'),
    'dpo.on_error': ('skip', 'fail'),
    'dpo.on_degenerate': ('drop', 'warn', 'fail'),
    'kto.source': ('jsonl', 'tfds'),
    'kto.loss_type': ('kto', 'apo_zero_unpaired'),
    'kto.reference': ('auto', 'adapters_off', 'copy', 'precomputed'),
    'kto.overlong': ('truncate', 'drop'),
    'kto.on_error': ('skip', 'fail'),
    'kto.on_degenerate': ('drop', 'warn', 'fail'),
    'reward.source': ('jsonl', 'tfds'),
    'reward.overlong': ('truncate', 'drop'),
    'reward.on_error': ('skip', 'fail'),
    'reward.on_degenerate': ('drop', 'warn', 'fail'),
    'grpo.source': ('jsonl', 'tfds'),
    'grpo.on_error': ('skip', 'fail'),
    'grpo.on_degenerate': ('drop', 'warn', 'fail'),
    'grpo.scale_rewards': ('group', 'batch', 'none'),
    'grpo.loss_type': ('grpo', 'bnpo', 'dr_grpo', 'dapo'),
    'grpo.reference': ('auto', 'adapters_off', 'copy'),
}


def _get(cfg, key):
  for part in key.split('.'):
    cfg = cfg[part]
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks that need no devices: choices, divisibility, positivity. (Unknown keys and
  wrong types never get here: the locked base config refuses them.)"""
  from lmjax.data import validation as data_validation  # pylint: disable=import-outside-toplevel
  data_validation.validate(cfg)
  for key, choices in _CHOICES.items():
    if _get(cfg, key) not in choices:
      raise ConfigError(f'config key {key!r} must be one of {choices}, got {_get(cfg, key)!r}')
  m = cfg.model
  for key in ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'd_ff'):
    if m[key] <= 0:
      raise ConfigError(f'config key model.{key} must be positive, got {m[key]}')
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f'model.n_heads ({m.n_heads}) must be a multiple of '
                      f'model.n_kv_heads ({m.n_kv_heads})')
  if not m.head_dim and m.d_model % m.n_heads:
    raise ConfigError(f'model.d_model ({m.d_model}) is not divisible by model.n_heads '
                      f'({m.n_heads}); set model.head_dim explicitly')
  t = cfg.train
  for key in ('global_batch', 'grad_accum', 'steps', 'log_every', 'eval_batches'):
    if t[key] <= 0:
      raise ConfigError(f'config key train.{key} must be positive, got {t[key]}')
  ls = t.loss_spike
  if ls.factor < 0 or (ls.factor and ls.factor <= 1):
    raise ConfigError(f'train.loss_spike.factor must be 0 (off) or > 1, got {ls.factor}')
  for key in ('window', 'max_rewinds'):
    if ls[key] <= 0:
      raise ConfigError(f'train.loss_spike.{key} must be positive, got {ls[key]}')
  if ls.skip_batches < 0:
    raise ConfigError(f'train.loss_spike.skip_batches must be >= 0, got {ls.skip_batches}')
  if t.global_batch % t.grad_accum:
    raise ConfigError(f'train.global_batch ({t.global_batch}) must be divisible by '
                      f'train.grad_accum ({t.grad_accum})')
  for key in ('attn_logit_softcap', 'final_logit_softcap'):
    if m[key] < 0:
      raise ConfigError(f'model.{key} must be >= 0 (0 = off), got {m[key]}')
  if m.attn_logit_softcap and m.attention == 'cudnn':
    raise ConfigError('model.attn_logit_softcap needs model.attention=xla, splash or auto '
                      "(cuDNN's kernel takes no soft-capping)")
  for key, block in m.splash.items():
    if key != 'fused_bwd' and (block <= 0 or block % 128):
      raise ConfigError(f'model.splash.{key} must be a positive multiple of 128, got {block}')
  moe = m.moe
  if moe.experts < 0:
    raise ConfigError(f'model.moe.experts must be >= 0 (0 = dense), got {moe.experts}')
  if moe.experts and not 1 <= moe.top_k <= moe.experts:
    raise ConfigError(f'model.moe.top_k ({moe.top_k}) must be between 1 and model.moe.experts '
                      f'({moe.experts})')
  if moe.experts and (moe.d_ff < 0 or moe.shared_d_ff < 0):
    raise ConfigError('model.moe.d_ff and model.moe.shared_d_ff must be >= 0')
  if moe.experts and moe.capacity_factor <= 0:
    raise ConfigError(f'model.moe.capacity_factor must be positive, got {moe.capacity_factor}')
  if m.max_segments < 1:
    raise ConfigError(f'model.max_segments must be >= 1, got {m.max_segments}')
  if m.loss_chunk < 0 or (m.loss_chunk and cfg.data.seq_len % m.loss_chunk):
    raise ConfigError(f'model.loss_chunk ({m.loss_chunk}) must be 0 or divide data.seq_len '
                      f'({cfg.data.seq_len})')
  if cfg.init_from.format not in ('auto', 'lmjax', 'hf'):
    raise ConfigError("config key 'init_from.format' must be one of ('auto', 'lmjax', 'hf'), "
                      f'got {cfg.init_from.format!r}')
  _validate_stage(cfg)
  if cfg.optim.lr <= 0:
    raise ConfigError(f'optim.lr must be positive, got {cfg.optim.lr}')
  if cfg.optim.warmup_steps < 0:
    raise ConfigError(f'optim.warmup_steps must be >= 0, got {cfg.optim.warmup_steps}')
  if cfg.tokenizer.vocab_size > m.vocab_size:
    raise ConfigError(f'tokenizer.vocab_size ({cfg.tokenizer.vocab_size}) exceeds '
                      f'model.vocab_size ({m.vocab_size})')
  for axis, size in cfg.mesh.items():
    if size == 0 or size < -1:
      raise ConfigError(f'mesh.{axis} must be a positive size or -1, got {size}')
  for logical, target in cfg.rules.items():
    for a in _rule_axes(target):
      if a not in cfg.mesh:
        raise ConfigError(f'rules.{logical} names mesh axis {a!r}, not one of {tuple(cfg.mesh)}')
  _validate_context_parallel(cfg)


def _rule_axes(target) -> tuple[str, ...]:
  """The mesh axes a cfg.rules entry names (None, one name, or several)."""
  return (target,) if isinstance(target, str) else tuple(target or ())


def _validate_context_parallel(cfg) -> None:
  """Rows of data.seq_len (every objective's) split over the mesh axes of rules.length
  (fixed sizes; the model checks every sequence again when it is traced)."""
  cp = 1
  for a in _rule_axes(cfg.rules.length):
    cp *= max(cfg.mesh[a], 1)
  if cp == 1:
    return
  t = cfg.data.seq_len
  if t % (2 * cp):
    raise ConfigError(f'data.seq_len ({t}) must be a multiple of {2 * cp} to split each '
                      f'sequence into 2 x {cp} chunks for context parallelism (mesh.sequence)')
  if cfg.model.attention == 'splash' and t % (128 * cp):
    raise ConfigError(f'data.seq_len ({t}) must be a multiple of {128 * cp} for '
                      f'model.attention=splash under mesh.sequence={cp} (blocks of 128 '
                      'tokens on each device)')


def _validate_stage(cfg) -> None:
  # The objective's own checks (its config group): lmjax/train/objectives/.
  from lmjax.train import objectives  # pylint: disable=import-outside-toplevel
  objectives.validate(cfg)
  if cfg.lora.enabled:
    from lmjax.models import lora  # pylint: disable=import-outside-toplevel
    try:
      lora.validate(cfg)
    except lora.LoraError as e:
      raise ConfigError(str(e)) from None
    if not cfg.init_from.path:
      raise ConfigError('lora.enabled: LoRA adapts a pretrained model; set init_from.path '
                        '(an lmjax workdir or a Hugging Face model dir)')


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return cfg.to_dict()


BUILTIN_DATA = 'builtin:synthetic'  # sft/dpo/reward.path of the built-in synthetic task


def from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from a saved dict (checkpoints, notebooks): base_config()
  with the named sources' entries, then every value (references saved resolved: an
  equal model.vocab_size and tokenizer.vocab_size come back as equal values)."""
  cfg = base_config()
  for group in SOURCE_GROUPS:
    cfg.data[group] = {name: data_source() for name in d.get('data', {}).get(group, {})}
  lock(cfg)
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, prefix + k + '.')
      else:
        flat[prefix + k] = tuple(v) if isinstance(v, list) else v

  walk(d, '')
  group = flat.get('stage')  # saved before built-in data was named: '' meant it
  if group in ('sft', 'dpo') and flat.get(f'{group}.path') == '':
    if flat.get(f'{group}.source', 'jsonl') == 'jsonl':
      flat[f'{group}.path'] = BUILTIN_DATA
  apply_overrides(cfg, flat)
  validate(cfg)
  return cfg


def placeholder(t):
  """A None-valued field that only a value of type `t` may set (ml_collections)."""
  return config_dict.placeholder(t)
