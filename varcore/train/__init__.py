"""Training of VAR: losses, schedules, datasets and the trainer (``python -m varcore.train.var_trainer``)."""
from .losses import scale_token_weights, token_accuracy, var_loss
from .var_trainer import TrainConfig, VARTrainer, train

__all__ = ["TrainConfig", "VARTrainer", "train", "var_loss", "scale_token_weights", "token_accuracy"]
