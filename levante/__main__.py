import sys

from levante.cli import main

sys.exit(main())
