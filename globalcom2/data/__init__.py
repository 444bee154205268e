"""The benchmarks and their offline data, independent of lmms-eval.

* ``benchmarks``: the one benchmark table (hub sources, offline tasks, the paper's metric per column);
* ``local``: where offline data lives (``$GLOBALCOM2_DATA_DIR``) and the checks that it is there;
* ``download`` (``make data``), ``fixtures`` (synthetic rows in the real schemas), ``demo`` (the
  synthetic demo benchmark).
"""
