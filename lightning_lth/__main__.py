import sys

from lightning_lth.cli import main

sys.exit(main())
