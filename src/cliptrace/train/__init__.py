"""Contrastive training: the loss, the Fabric-driven loop, checkpoints."""

from cliptrace.train.checkpoint import list_checkpoints
from cliptrace.train.config import TrainConfig
from cliptrace.train.loop import TrainResult, initial_model, train
from cliptrace.train.loss import contrastive_loss

__all__ = ["TrainConfig", "TrainResult", "contrastive_loss", "initial_model", "list_checkpoints", "train"]
