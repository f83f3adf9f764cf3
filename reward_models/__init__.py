"""The reward-model pipeline, built on `recipes`: preference pairs sampled from a policy and labelled by a gold
reward function (`preferences`), then a Bradley–Terry reward model trained on them with TRL's RewardTrainer
(`training`), both read from one recipe (`config`).

    python scripts/build_preferences.py --config configs/smollm2-135m/reward.yaml   # reward_models.preferences
    accelerate launch scripts/train_reward.py --config configs/smollm2-135m/reward.yaml   # reward_models.training
"""

from pathlib import Path

DEFAULT_REWARD_RECIPE = str(Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m" / "reward.yaml")

__all__ = ["DEFAULT_REWARD_RECIPE"]
