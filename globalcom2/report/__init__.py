"""Reporting: tidy results (``aggregate``), the paper's tables (``tables``), figures (``plots``), one
experiment's tables and plots written together (``build``), the kept-token visualisation (``visualize``),
the [CLS] attention shares (``cls_share``), and the ``python -m globalcom2.report`` command (``__main__``)."""
