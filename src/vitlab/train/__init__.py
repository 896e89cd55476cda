"""Training on in-memory datasets: recipes, AdamW + warmup/cosine, checkpoints, evaluation, prediction.

    from vitlab.train import resolve_recipe, train
    result = train(resolve_recipe("fast", epochs=5), out="runs/try")
    result.test_top1
"""

from vitlab.train.checkpoint import load_checkpoint, save_checkpoint
from vitlab.train.evaluate import EvalResult, evaluate, evaluate_run, plot_confusion
from vitlab.train.loop import TrainResult, build_model, resume, train
from vitlab.train.metrics import MetricsLog, plot_curves
from vitlab.train.optim import WarmupCosine, create_optimizer, param_groups
from vitlab.train.predict import Prediction, predict, preprocess
from vitlab.train.processor import read_preprocessor_config, write_preprocessor_config
from vitlab.train.recipes import DEFAULT_RECIPE, RECIPES, RUN_CONFIG, TrainConfig, resolve_recipe

__all__ = [
    "DEFAULT_RECIPE", "RECIPES", "RUN_CONFIG", "EvalResult", "MetricsLog", "Prediction", "TrainConfig",
    "TrainResult", "WarmupCosine", "build_model", "create_optimizer", "evaluate", "evaluate_run",
    "load_checkpoint", "param_groups", "plot_confusion", "plot_curves", "predict", "preprocess",
    "read_preprocessor_config", "resolve_recipe", "resume", "save_checkpoint", "train",
    "write_preprocessor_config",
]
