"""``python -m recsys_serving``: the same as the ``recsys-serve`` console script."""

from recsys_serving.cli import main

main()
