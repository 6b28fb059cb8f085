"""`python -m bricks.cli ...` (also under `accelerate launch -m bricks.cli` and `torchrun -m bricks.cli`)."""

from . import main

main()
