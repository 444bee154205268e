"""Reporting: tidy results (``aggregate``), the paper's tables (``tables``), figures (``plots``), the
kept-token visualisation (``visualize``) and the ``python -m globalcom2.aggregate`` driver (``build``)."""
