"""``python -m qdistill`` (and ``torchrun --nproc_per_node=N -m qdistill run RECIPE``): the ``qdistill`` command."""

import sys

from qdistill.cli import main

if __name__ == "__main__":
    sys.exit(main())
