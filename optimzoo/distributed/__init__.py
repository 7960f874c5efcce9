"""FSDP2 / DTensor support (issue #4): owner-based matrix transforms and shard-aware reductions.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, gradient and state tensor is a
``DTensor`` whose rows are split across ranks (placement ``Shard(0)``). Element-wise math is local to
each shard; two kinds of computation are not, and live here:

* :func:`transform_sharded`: the whole-matrix stage of :class:`~optimzoo.optim._matrix.MatrixOptimizer`
  (orthogonalization, row/column normalization). Each full matrix is assembled on one owner rank,
  transformed there once in the whole job, and its row shards (and per-row state) are sent back.

The shard-aware whole-tensor reductions of the element-wise optimizers (AdamP's layer cosine,
Stable-SPAM's gradient max and norm) are pure tensor functions and live in :mod:`optimzoo.ops.reduce`;
the shape rules shared with the matrix optimizers in :mod:`optimzoo.ops.matrix`: this package serves
``optim`` and imports only ``ops``.

Nothing is set up in advance: the device mesh and process group are read from the parameters at
each step, so optimizers may be built before the model is sharded.
"""

from .owner import row_state_like, shard_rows, transform_sharded

__all__ = ["row_state_like", "shard_rows", "transform_sharded"]
