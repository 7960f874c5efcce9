"""HuggingFace ``transformers.Trainer`` integration: any zoo optimizer by name, with its metrics logged.

transformers refuses unknown ``TrainingArguments(optim=...)`` strings and forbids ``Trainer(optimizers=...)``
under FSDP, so the clean way in is a pair of subclasses:

>>> from optimzoo.hf import ZooTrainer, ZooTrainingArguments
>>> args = ZooTrainingArguments("out", optim="normuon", learning_rate=0.02,
...                             optim_args="adamw_lr=3e-4,adjust_lr=match_adamw")
>>> trainer = ZooTrainer(model=model, args=args, train_dataset=ds)
>>> trainer.train()

``optim`` accepts every zoo name (``optimzoo.list_optimizers()``) and every transformers name; a name the
zoo knows is built by the zoo (with the model's named parameters, so routing is right), any other valid
transformers name is left to transformers. See :mod:`optimzoo.hf.trainer` for the details.

With the stock ``Trainer`` (or TRL's, or your own subclass), one argument gives any zoo optimizer, routed by the
model's parameter names, and a callback gives its metrics, non-finite step skipping and the run config:

>>> trainer = Trainer(model, args, train_dataset=ds,
...                   optimizer_cls_and_kwargs=optimzoo.hf.trainer_optimizer("normuon", lr=0.02),
...                   callbacks=[optimzoo.hf.OptimizerMetricsCallback()])
"""

from .args import ZooTrainingArguments, parse_optim_args
from .callbacks import NonFiniteGuard, OptimizerMetrics, OptimizerMetricsCallback
from .pretrain import PretrainTrainer
from .trainer import ZooOptimizerFactory, ZooTrainer, trainer_optimizer

__all__ = ["NonFiniteGuard", "OptimizerMetrics", "OptimizerMetricsCallback", "PretrainTrainer", "ZooOptimizerFactory",
           "ZooTrainer", "ZooTrainingArguments", "parse_optim_args", "trainer_optimizer"]
