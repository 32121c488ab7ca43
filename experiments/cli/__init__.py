"""The ``saewb`` command line: `root` builds the parser from one module per subcommand (each `add_parser`
registers its arguments and its `run`); `saewb` is `experiments.cli.main`."""

from experiments.cli.root import main

__all__ = ["main"]
