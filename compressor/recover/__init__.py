"""The recovery stage (``recover:`` in a recipe): sparse fine-tuning with distillation, before capture.

* :mod:`.config`: the recipe section (no torch import);
* :mod:`.stage`: the entry points the compress flow calls;
* :mod:`.module`: the trainable module of a model file, and its capture once recovered;
* :mod:`.masks`: the one-shot graph masks mapped back to parameters;
* :mod:`.schedule`: masks held during training, the PGF gradient schedule;
* :mod:`.distill`: the losses against the dense teacher;
* :mod:`.train`: the loop;
* :mod:`.blockwise`: ``block_steps``, each repeated block trained alone before the loop;
* :mod:`.qat`: ``qat: true``, fake quantization in training for the int8 step after it.
"""
