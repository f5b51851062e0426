"""``python -m notice_relay`` is the ``notice-relay`` command."""

from notice_relay.cli import main

raise SystemExit(main())
