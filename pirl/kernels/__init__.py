"""The engine room: fast implementations of the method's hot spots, each next to the plain
reference it is tested against.  Reading the method does not require reading this package.

* :mod:`pirl.kernels.bank_scores`: scores of a batch against memory-bank rows
  (:func:`~pirl.kernels.bank_scores.gather_scores`, chunked or dense, never ``[B,N,D]``) and
  :func:`~pirl.kernels.bank_scores.gather_scores_reference` (gather, then a batched product).
"""
