"""``python -m relay`` is the same as the ``comfy-relay`` command."""

from relay.cli import main

raise SystemExit(main())
