"""``python -m chatgate_server`` is the ``chatgate`` command."""

from chatgate_server.cli import main

raise SystemExit(main())
