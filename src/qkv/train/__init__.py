"""The training layer shared by every task: a task-agnostic :class:`Trainer`, its configuration,
learning-rate schedules, model folders (checkpoints) and data-parallel helpers.

::

    from qkv.train import Trainer, TrainConfig, save_model_folder

    trainer = Trainer(model, task, batches, TrainConfig(lr=1e-3, max_steps=2000))
    result = trainer.fit()

A task plugs in by implementing :class:`Task` (``loss`` and ``validate``); its batches come from
a :class:`BatchSource` such as :class:`SamplerBatches`. See docs/training.md.
"""

from qkv.train.checkpoint import (
    ModelFolderError,
    is_model_folder,
    load_model,
    load_training_state,
    load_weights,
    prepare_output_folder,
    read_config,
    release_output_folder,
    save_model_folder,
)
from qkv.train.config import TrainConfig
from qkv.train.device import resolve_device
from qkv.train.distributed import DistributedContext, init_from_env
from qkv.train.schedule import lr_factor
from qkv.train.state import TrainState, seed_everything
from qkv.train.task import BatchSource, LossOutput, SamplerBatches, Task
from qkv.train.trainer import (
    EvalReport,
    NonFiniteTrainingError,
    StepReport,
    Trainer,
    TrainResult,
)

__all__ = [
    "BatchSource",
    "DistributedContext",
    "EvalReport",
    "LossOutput",
    "ModelFolderError",
    "NonFiniteTrainingError",
    "SamplerBatches",
    "StepReport",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "init_from_env",
    "is_model_folder",
    "load_model",
    "load_training_state",
    "load_weights",
    "lr_factor",
    "prepare_output_folder",
    "read_config",
    "release_output_folder",
    "resolve_device",
    "save_model_folder",
    "seed_everything",
]
