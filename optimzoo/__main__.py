"""`python -m optimzoo`: print the registry table (add --peers for torch-optimizer's catalogue)."""

import sys

from . import list_optimizers

print(list_optimizers(peers="--peers" in sys.argv[1:]))
