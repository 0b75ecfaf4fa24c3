"""Rewards of a rollout: accuracy (math-verify), format, repetition penalty, and the visual
perception reward from a judge; `combine` mixes them with the config weights.

    R = 0.9 * accuracy_reward + 0.1 * format_reward + 0.7 * perception + repetition_penalty
"""

from pr1.rewards.accuracy import AccuracyScorer, accuracy_reward, extract_answer
from pr1.rewards.combine import (
    JudgeFailureError,
    RewardOutput,
    RewardStage,
    combine,
    make_judge,
    rewards_config,
)
from pr1.rewards.format import format_reward
from pr1.rewards.judge import Judge, JudgeError, LexicalJudge, OpenAIJudge
from pr1.rewards.perception import Judgement, as_annotations, build_messages, parse_judgement
from pr1.rewards.repetition import repetition_penalty

__all__ = [
    "AccuracyScorer",
    "Judge",
    "JudgeError",
    "JudgeFailureError",
    "Judgement",
    "LexicalJudge",
    "OpenAIJudge",
    "RewardOutput",
    "RewardStage",
    "accuracy_reward",
    "as_annotations",
    "build_messages",
    "combine",
    "extract_answer",
    "format_reward",
    "make_judge",
    "parse_judgement",
    "repetition_penalty",
    "rewards_config",
]
