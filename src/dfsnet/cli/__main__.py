"""``python -m dfsnet.cli``: the same as the ``dfsnet`` command."""
import sys

from dfsnet.cli.main import main

sys.exit(main())
