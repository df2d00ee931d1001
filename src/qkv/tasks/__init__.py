"""Tasks: the glue from data to a trained model and back (translation, sentiment,
summarization), all on one lifecycle (:mod:`qkv.tasks.base`).

::

    from qkv.tasks import train_task, evaluate_model

    train_task("sentiment", SentimentSettings(data="reviews.csv"), TrainConfig(max_steps=500), "m")
    evaluate_model("m", data="test.csv").to_dict()   # task, model, data, split, examples, metrics

A new task is one module defining ``SPEC`` (a :class:`TaskSpec`) and one line in
``qkv.tasks.base.TASKS``; see :mod:`qkv.tasks.base`.
"""

from qkv.tasks.base import Evaluation, TaskSpec, evaluate_model, get_task, train_task

__all__ = ["Evaluation", "TaskSpec", "evaluate_model", "get_task", "train_task"]
