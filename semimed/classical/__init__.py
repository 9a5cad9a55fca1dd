"""Classical baselines: hand-crafted texture features (scikit-image) + scikit-learn classifiers, including the
graph-based and self-training few-label learners, run through the same splits, files and report as the deep
methods.

    features.py     the extractors (GLCM, uniform LBP, HOG, intensity histograms) and the named feature sets
    cache.py        features computed once per pixel-cache row, keyed by a digest of the row's pixels
    classifiers.py  the scikit-learn pipelines, their hyperparameters (checked), per-image scores
    fit.py          `fit_closed_form`: the engine seam for a method with no step loop

The method itself is `semimed/methods/classical.py` (`method.name: classical`).
"""

from semimed.classical.features import EXTRACTORS, FEATURE_SETS

__all__ = ["EXTRACTORS", "FEATURE_SETS"]
