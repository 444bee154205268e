"""``python -m globalcom2.lmms``: see :mod:`globalcom2.lmms.cli`."""

from globalcom2.lmms.cli import main

raise SystemExit(main())
