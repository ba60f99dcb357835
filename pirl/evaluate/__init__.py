"""Evaluation protocols (docs/method.md, "Evaluation protocols"), one module each.

Every protocol takes a frozen (or, for fine-tuning, copied) trunk, image sources and the
evaluation view geometry, and returns a JSON-able result dict; ``pirl eval <protocol>``
(:mod:`pirl.evaluate.cli`) wraps them.

==============  ===============================================================================
run_knn         NPID weighted kNN vote on frozen features: top-1 / top-5
run_linear      linear probe on frozen conv1..res5 (Table 7 with every stage), trunk hash-checked
run_svm         one-vs-rest linear SVMs, cost by cross-validation on the train split: mAP, top-1
run_finetune    whole-network fine-tuning on a class-balanced 1% / 10% label subset
run_invariance  ||rep(I) - rep(I^t)|| distributions, several checkpoints on one histogram (Fig. 4)
run_neighbors   PNG grid of val queries and their nearest training images
==============  ===============================================================================

Frozen features come from :func:`extract_features` (pooled as Goyal et al.'s benchmark, cached on
disk by trunk weights, data, stage and view).
"""

from pirl.evaluate.features import EvalSettings, Features, extract_features, trunk_fingerprint
from pirl.evaluate.finetune import balanced_subset, run_finetune
from pirl.evaluate.invariance import run_invariance
from pirl.evaluate.knn import knn_classify, knn_scores, run_knn
from pirl.evaluate.linear import TrunkChangedError, run_linear
from pirl.evaluate.loading import EvalModel, load_eval_model
from pirl.evaluate.neighbors import run_neighbors
from pirl.evaluate.svm import run_svm

__all__ = [
    "EvalModel", "EvalSettings", "Features", "TrunkChangedError", "balanced_subset",
    "extract_features", "knn_classify", "knn_scores", "load_eval_model", "run_finetune",
    "run_invariance", "run_knn", "run_linear", "run_neighbors", "run_svm", "trunk_fingerprint",
]
