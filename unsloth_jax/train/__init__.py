"""Training: the jitted step (step.py), optimizer (optim.py), SFTTrainer loop (loop.py),
orbax checkpoints (checkpoint.py) and the CLI (`python -m unsloth_jax.train`)."""
from unsloth_jax.train.config import TrainConfig, load_config
from unsloth_jax.train.loop import SFTTrainer, TrainingArguments, TrainingError

__all__ = ["TrainConfig", "load_config", "SFTTrainer", "TrainingArguments", "TrainingError"]
