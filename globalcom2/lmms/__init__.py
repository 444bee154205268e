"""The lmms-eval integration: everything that talks to lmms-eval, and nothing else does.

* ``plugin`` (``globalcom2_llava_next``) and ``manifest`` (its entry point); ``plugin_options`` and
  ``method_args``: its typed ``model_args``;
* answering a batch: ``batching``, ``generation``, ``tokenization``, and ``protocols`` (what the model is
  fed under ``llava`` or ``lmms_eval``);
* ``tasks`` and ``task_utils``: the task classes and functions our YAMLs in ``tasks/`` name;
* running it: ``preflight`` (checks before any weight loads), ``cli`` (``python -m globalcom2.lmms``),
  ``api`` (from Python), ``show_inputs``;
* its outputs: ``sample_records``, ``submissions`` (EvalAI files), ``mmvet_judge`` (MM-Vet's GPT judge).

The benchmarks and their data are :mod:`globalcom2.data`, which does not import lmms-eval.
"""
