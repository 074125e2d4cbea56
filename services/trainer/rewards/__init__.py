"""Rewards of the online methods (GRPO, PPO): the built-in reward functions (builtin), the
user's plugin files (plugins), resolving, calling and weighting them and the submission-time
checks of the reward flags (scoring), and a reward model as a reward (model: import it from
there; it loads torch and transformers)."""

from services.trainer.rewards.builtin import BUILTINS, RewardParams
from services.trainer.rewards.plugins import PluginError
from services.trainer.rewards.scoring import RewardError, RewardFunc, problems, resolve, score

__all__ = ["BUILTINS", "PluginError", "RewardError", "RewardFunc", "RewardParams", "problems", "resolve", "score"]
