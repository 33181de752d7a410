"""``python -m agoq_ds`` = the ``agoq-ds`` command."""

from .cli import main

raise SystemExit(main())
