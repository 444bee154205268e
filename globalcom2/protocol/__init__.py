"""What the model is fed and how its answers are read: the evaluation protocol, below lmms-eval's plugin.

* :mod:`~globalcom2.protocol.rules`: the two protocols (``llava``, the paper's; ``lmms_eval``, the task
  defaults), per task: the question text, the generation settings, the reading of an answer, the budget
  basis of the in-LLM methods and the AnyRes geometry;
* :mod:`~globalcom2.protocol.generation`: a task's ``generation_kwargs`` as ``generate`` arguments, stop
  strings;
* :mod:`~globalcom2.protocol.tokenization`: LLaVA's chunked tokenisation around ``<image>``;
* :mod:`~globalcom2.protocol.batching`: a batch of requests as prompts and images, generated ids as answers.

None of it imports lmms-eval: the plugin (``globalcom2.lmms``) and the cell spec (``globalcom2.run_spec``)
both build on it.
"""
