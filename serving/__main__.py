"""``python -m serving``: runs the model server (see serving.cli)."""
import sys

from serving.cli import main

sys.exit(main())
