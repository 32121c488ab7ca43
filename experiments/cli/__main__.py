"""``python -m experiments.cli ...`` (e.g. under torchrun) is ``saewb ...``."""

import sys

from experiments.cli.root import main

sys.exit(main())
