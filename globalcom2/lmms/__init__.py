"""The lmms-eval integration: everything that talks to lmms-eval, and nothing else does.

* ``plugin`` (``globalcom2_llava_next``) and ``manifest`` (its entry point); the plugin takes a
  :class:`~globalcom2.run_spec.RunSpec`, its ``model_args`` parsed by the front door (``globalcom2.run_spec``);
* ``tasks`` and ``task_utils``: the task classes and functions our YAMLs in ``tasks/`` name;
* running it: ``preflight`` (checks before any weight loads), ``cli`` (``python -m globalcom2.lmms``),
  ``api`` (from Python), ``show_inputs``;
* its outputs: ``submissions`` (EvalAI files), ``mmvet_judge`` (MM-Vet's GPT judge).

What the model is fed (prompts, generation settings, tokenisation, batching) is :mod:`globalcom2.protocol`;
the per-sample records are :mod:`globalcom2.sample_records`; the benchmarks and their data are
:mod:`globalcom2.data`. None of them imports lmms-eval.
"""
