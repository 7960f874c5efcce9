"""FSDP2 / DTensor support (issue #4): owner-based matrix transforms and shard-aware reductions.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, gradient and state tensor is a
``DTensor`` whose rows are split across ranks (placement ``Shard(0)``). Element-wise math is local to
each shard; two kinds of computation are not, and live here:

* :func:`transform_sharded`: the whole-matrix stage of :class:`~optimzoo.optim._matrix.MatrixOptimizer`
  (orthogonalization, row/column normalization). Each full matrix is assembled on one owner rank,
  transformed there once in the whole job, and its row shards (and per-row state) are sent back.
* :func:`global_sum`, :func:`global_amax`: whole-tensor reductions of the element-wise optimizers
  (AdamP's layer cosine, Stable-SPAM's gradient max and norm): the local reduction all-reduced over
  the ranks that hold the other shards.

Nothing is set up in advance: the device mesh and process group are read from the parameters at
each step, so optimizers may be built before the model is sharded.
"""

from .owner import row_state_like, shard_rows, transform_sharded
from .reduce import global_amax, global_sum, is_sharded

__all__ = ["global_amax", "global_sum", "is_sharded", "row_state_like", "shard_rows", "transform_sharded"]
