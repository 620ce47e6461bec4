"""Data: TFDS builders → ArrayRecord files → random-access sources → grain pipelines.

- ``registry``: config names (``fashion_mnist``, ``inshop``, ``cub200``, ``cars196``, ``imagenet2012``,
  ``places365``, ``folder``) → ``prepare`` (the ``data`` stage) and ``load`` (→ ``Dataset`` with the
  ``database``, ``query`` and ``train`` roles and their label arrays), ``validate``.
- ``fashion_mnist``, ``inshop``, ``folder``: the builders that work offline without TensorFlow.
- ``records``: fast random access to prepared splits; ``images``: what is stored and how it decodes.
- ``pipeline``: train / eval batches; ``pairs``: stage-2 same-class targets; ``randomness``: the
  counter-based draws both use.

Submodules are imported where used (``from irgen_jax.data import registry``): importing TFDS costs ~1 s.
"""
