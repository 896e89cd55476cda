"""Training on in-memory datasets: recipes, the shared loop over tasks, AdamW + warmup/cosine, checkpoints,
evaluation, prediction.

    from vitlab.train import resolve_recipe, train
    result = train(resolve_recipe("fast", epochs=5), out="runs/try")
    result.test_top1
"""

from vitlab.rundir import RUN_CONFIG, read_preprocessor_config, write_preprocessor_config
from vitlab.train.checkpoint import load_checkpoint, save_checkpoint
from vitlab.train.classification import resume, train
from vitlab.train.classify import ClassifyTask, build_model
from vitlab.train.evaluate import EvalResult, evaluate, evaluate_run
from vitlab.train.loop import Trainer, TrainResult
from vitlab.train.metrics import MetricsLog
from vitlab.train.optim import WarmupCosine, create_optimizer, param_groups
from vitlab.train.predict import Prediction, predict
from vitlab.train.recipes import DEFAULT_RECIPE, RECIPES, RunConfig, TrainConfig, resolve_recipe
from vitlab.train.task import Batch, Task

__all__ = [
    "DEFAULT_RECIPE", "RECIPES", "RUN_CONFIG", "Batch", "ClassifyTask", "EvalResult", "MetricsLog", "Prediction",
    "RunConfig", "Task", "TrainConfig", "TrainResult", "Trainer", "WarmupCosine", "build_model",
    "create_optimizer", "evaluate", "evaluate_run", "load_checkpoint", "param_groups", "predict",
    "read_preprocessor_config", "resolve_recipe", "resume", "save_checkpoint", "train", "write_preprocessor_config",
]
