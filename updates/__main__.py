import sys

from updates.cli import main

sys.exit(main())
