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
"""

from .args import ZooTrainingArguments, parse_optim_args
from .pretrain import PretrainTrainer
from .trainer import OptimizerMetrics, ZooTrainer

__all__ = ["OptimizerMetrics", "PretrainTrainer", "ZooTrainer", "ZooTrainingArguments", "parse_optim_args"]
