"""The engine room: fast implementations of the method's hot spots, each next to the plain
reference it is tested against.  Reading the method does not require reading this package.

* :mod:`pirl.kernels.bank_scores`: scores of a batch against memory-bank rows
  (:func:`~pirl.kernels.bank_scores.gather_scores`, chunked or dense, never ``[B,N,D]``) and
  :func:`~pirl.kernels.bank_scores.gather_scores_reference` (gather, then a batched product).
* The colour augmentation of many views at once (:func:`pirl.data.augment.apply_photometric` is
  the front door): :mod:`pirl.kernels.colour` chooses the engine (``views.colour_backend``) and
  runs it; :mod:`pirl.kernels.colour_job` is what every engine takes;
  :mod:`pirl.kernels.colour_torch` (batched torch operations) and
  :mod:`pirl.kernels.colour_numba` (one compiled loop per image row) are the engines, and
  :mod:`pirl.kernels.colour_reference` (torchvision, one image at a time) the reference.
  The optional posterize / sharpness / solarize / autocontrast / equalize
  (``views.photometric_ops``) run after the engine on uint8: :mod:`pirl.kernels.colour_ops`
  (torch, equal to torchvision's ``v2.functional``) and :mod:`pirl.kernels.colour_ops_numba`.

Both colour engines stay because each earns its place: the numba one makes the training views
clearly faster than the torch one (docs/performance.md), and the torch one needs no optional
dependency and runs on any device.
"""
