"""Training objectives: one module per objective, chosen by cfg.stage here and only here.

    objective = objectives.get(cfg)     # lm.LM ('pretrain'), sft.SFT, dpo.DPO, kto.KTO,
                                        # reward.Reward, grpo.GRPO

The loop, the step and the state use the objective's interface (objectives/base.py) and
never ask which objective runs. A new objective is a module here with a subclass of
base.Objective (or of paired.Paired / paired.Aligned for two-row examples, with or
without a reference model), its entry in OBJECTIVES and in config._CHOICES['stage'], its
config group in config.base_config(), a config in configs/ and tests.
"""

from __future__ import annotations

from lmjax.train.objectives.base import Objective, StateEntry
from lmjax.train.objectives.dpo import DPO
from lmjax.train.objectives.grpo import GRPO
from lmjax.train.objectives.kto import KTO
from lmjax.train.objectives.lm import LM
from lmjax.train.objectives.reward import Reward
from lmjax.train.objectives.sft import SFT

OBJECTIVES: dict[str, type[Objective]] = {'pretrain': LM, 'sft': SFT, 'dpo': DPO,
                                          'kto': KTO, 'reward': Reward, 'grpo': GRPO}

__all__ = ['OBJECTIVES', 'Objective', 'StateEntry', 'get', 'validate']


def _class(cfg) -> type[Objective]:
  return OBJECTIVES[cfg.stage]


def get(cfg) -> Objective:
  """The objective of cfg.stage, for cfg."""
  return _class(cfg)(cfg)


def validate(cfg) -> None:
  """The objective's config checks (config.validate calls this after the stage choice)."""
  _class(cfg).validate(cfg)
