"""optimzoo: faithful, fast PyTorch optimizers for LLM pretraining, behind one registry.

>>> import optimzoo
>>> print(optimzoo.list_optimizers())
>>> opt = optimzoo.create_optimizer(model, "normuon", lr=0.02)
>>> print(opt.routing_plan)   # where every tensor went

Importing this package needs only torch; ``optimzoo.hf`` (Trainer integration) needs transformers.
"""

from .optim._base import state_bytes
from .param_groups import RoutingPlan, plan_parameters
from .registry import (
    OptimizerSpec,
    StateCost,
    create_optimizer,
    get_optimizer,
    get_spec,
    list_optimizers,
    register_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "OptimizerSpec",
    "RoutingPlan",
    "StateCost",
    "create_optimizer",
    "get_optimizer",
    "get_spec",
    "list_optimizers",
    "plan_parameters",
    "register_optimizer",
    "state_bytes",
]
