"""``python -m globalcom2.evaluation``: see :mod:`globalcom2.evaluation.cli`."""

from globalcom2.evaluation.cli import main

raise SystemExit(main())
