import sys

from pgdoorman.cli import main

sys.exit(main())
