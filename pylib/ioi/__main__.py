import sys

from ioi.cli import main

sys.exit(main())
