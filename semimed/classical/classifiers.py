"""The classifiers of the classical baselines (scikit-learn), their hyperparameters, and per-image scores.

Every classifier is a pipeline `StandardScaler -> estimator`, so features of different scales (GLCM contrast in
the hundreds, histogram shares below 1) weigh alike. Supervised ones fit on the labeled rows only; the two
few-label ones also read the unlabeled pool's FEATURES (never its labels: they are given as -1):

    svm_linear       LinearSVC(C, class_weight)
    svm_rbf          SVC(kernel="rbf", C, gamma, class_weight)
    random_forest    RandomForestClassifier(n_estimators, max_depth, class_weight)
    logistic         LogisticRegression(C, class_weight)
    label_spreading  LabelSpreading(kernel knn | rbf, n_neighbors | gamma, alpha): labels spread over a graph
                     of labeled + unlabeled images (Zhou et al. 2004), the classical graph-based SSL; an image
                     that no labeled image reaches (a k-NN component without labels, at 1% labels) gets the
                     labeled class frequencies, counted in metrics.json as train/unreached
    self_training    SelfTrainingClassifier(base, threshold): the base (logistic | random_forest) labels its
                     confident unlabeled images and refits, the classical counterpart of pseudo-labelling

Scores. ROC-AUC and AP need one score per image and class; semimed's metrics compute them from `scores`.
Classifiers with `predict_proba` (logistic, random forest, the two SSL ones) give probabilities. The SVMs give
decision values d, turned into scores by the logistic function (binary: [1 - s(d), s(d)]) or a softmax over
the one-vs-rest values (multiclass). These are monotone in d, so ranks (AUC, AP) and the arg-max (accuracy)
are exactly the SVM's; they are NOT calibrated probabilities. Platt scaling (SVC(probability=True)) would
need a 5-fold internal cross-validation that 2-20 labeled images cannot support.

Multi-label (ChestX-ray14): one-vs-rest, one binary pipeline per finding, fit on the rows whose finding is
known (NaN = unknown: for the SSL classifiers those rows join the unlabeled ones). Hyperparameters that do not
apply to the chosen classifier are errors, not silently ignored. Everything random takes the run's seed.
"""

from __future__ import annotations

import inspect
import warnings
from numbers import Integral, Real
from typing import Any

import numpy as np

from semimed.errors import SemimedError, SemimedWarning

SEMI_SUPERVISED = ("label_spreading", "self_training")
SELF_TRAINING_BASES = ("logistic", "random_forest")  # they have predict_proba, which self-training thresholds
# The hyperparameters of each classifier and their defaults (scikit-learn's, except where a comment says).
DEFAULTS: dict[str, dict[str, Any]] = {
    "svm_linear": {"C": 1.0, "class_weight": None},
    "svm_rbf": {"C": 1.0, "gamma": "scale", "class_weight": None},
    "random_forest": {"n_estimators": 300, "max_depth": None, "class_weight": None},  # 300: stabler than 100
    "logistic": {"C": 1.0, "class_weight": None},
    # gamma "scale" = 1 / n_features (scikit-learn's 20 makes every rbf affinity 0 on standardized features)
    "label_spreading": {"kernel": "knn", "n_neighbors": 7, "gamma": "scale", "alpha": 0.2},
    "self_training": {"base": "logistic", "threshold": 0.75},
}
CLASSIFIERS = tuple(DEFAULTS)


def _number(key: str, value: Any, low: float, high: float | None = None, integer: bool = False) -> Any:
    kind = Integral if integer else Real
    ok = isinstance(value, kind) and not isinstance(value, bool) and value > low
    ok = ok and (high is None or value < high)
    if not ok:
        span = f"> {low:g}" + (f" and < {high:g}" if high is not None else "")
        raise SemimedError(
            f"method.params.{key}={value!r} must be {'an integer' if integer else 'a number'} {span}"
        )
    return int(value) if integer else float(value)


def _choice(key: str, value: Any, valid: tuple[Any, ...]) -> Any:
    if value not in valid:
        shown = ", ".join("null" if v is None else str(v) for v in valid)
        raise SemimedError(f"unknown method.params.{key} {value!r}; valid: {shown}")
    return value


CHECKS = {
    "C": lambda v: _number("C", v, 0.0),
    "gamma": lambda v: v if v == "scale" else _number("gamma", v, 0.0),
    "n_estimators": lambda v: _number("n_estimators", v, 0, integer=True),
    "max_depth": lambda v: None if v is None else _number("max_depth", v, 0, integer=True),
    "class_weight": lambda v: _choice("class_weight", v, (None, "balanced")),
    "kernel": lambda v: _choice("kernel", v, ("knn", "rbf")),
    "n_neighbors": lambda v: _number("n_neighbors", v, 0, integer=True),
    "alpha": lambda v: _number("alpha", v, 0.0, 1.0),
    "base": lambda v: _choice("base", v, SELF_TRAINING_BASES),
    "threshold": lambda v: _number("threshold", v, 0.0, 1.0),
}
PARAMETERS = tuple(CHECKS)


def resolve_params(classifier: str, given: dict[str, Any]) -> dict[str, Any]:
    """The classifier's complete hyperparameters: `given` (the non-None ones) checked, defaults filled in.

    Raises a one-line SemimedError naming the key for an unknown classifier, a value out of range, or a
    hyperparameter that does not apply (`C` with random_forest, `gamma` with label_spreading's knn kernel).
    """
    _choice("classifier", classifier, CLASSIFIERS)
    given = {k: CHECKS[k](v) for k, v in given.items() if v is not None}
    params = dict(DEFAULTS[classifier])
    if classifier == "self_training":
        params.update(DEFAULTS[given.get("base", params["base"])])
    if classifier == "label_spreading":
        # the kernel decides which of its two neighbourhood parameters applies
        drop = "gamma" if given.get("kernel", params["kernel"]) == "knn" else "n_neighbors"
        params.pop(drop)
    extra = sorted(set(given) - set(params))
    if extra:
        which = classifier
        if classifier == "label_spreading":
            which += f" with kernel {given.get('kernel', 'knn')}"
        if classifier == "self_training":
            which += f" with base {given.get('base', 'logistic')}"
        raise SemimedError(
            f"method.params.{extra[0]} does not apply to classifier {which}; its parameters: "
            f"{', '.join(sorted(params))}"
        )
    params.update(given)
    return params


def build_pipeline(classifier: str, params: dict[str, Any], seed: int, n_features: int):
    """StandardScaler -> the estimator, every random choice seeded with `seed`."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), _estimator(classifier, params, seed, n_features))


def _estimator(classifier: str, p: dict[str, Any], seed: int, n_features: int):
    from sklearn import ensemble, linear_model, semi_supervised, svm

    if classifier == "svm_linear":
        return svm.LinearSVC(C=p["C"], class_weight=p["class_weight"], max_iter=20000, random_state=seed)
    if classifier == "svm_rbf":
        return svm.SVC(C=p["C"], gamma=p["gamma"], class_weight=p["class_weight"], random_state=seed)
    if classifier == "random_forest":
        return ensemble.RandomForestClassifier(
            n_estimators=p["n_estimators"],
            max_depth=p["max_depth"],
            class_weight=p["class_weight"],
            random_state=seed,
            n_jobs=1,  # trials run side by side; a fit on a few hundred images takes about a second anyway
        )
    if classifier == "logistic":
        return linear_model.LogisticRegression(
            C=p["C"], class_weight=p["class_weight"], max_iter=5000, random_state=seed
        )
    if classifier == "label_spreading":
        gamma = p.get("gamma", 20.0)
        gamma = 1.0 / max(1, n_features) if gamma == "scale" else gamma
        return semi_supervised.LabelSpreading(
            kernel=p["kernel"],
            n_neighbors=p.get("n_neighbors", 7),
            gamma=gamma,
            alpha=p["alpha"],
            max_iter=1000,
        )
    if classifier == "self_training":
        base = _estimator(p["base"], p, seed, n_features)
        # scikit-learn 1.6 renamed base_estimator to estimator (and removed the old name in 1.8)
        names = inspect.signature(semi_supervised.SelfTrainingClassifier).parameters
        key = "estimator" if "estimator" in names else "base_estimator"
        return semi_supervised.SelfTrainingClassifier(**{key: base}, threshold=p["threshold"], max_iter=10)
    raise SemimedError(f"unknown method.params.classifier {classifier!r}; valid: {', '.join(CLASSIFIERS)}")


def _scores(pipeline, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(classes the pipeline knows, scores [n, len(classes)]) — see the module docstring for the SVMs.
    label_spreading's rows for images that no labeled image reaches are NaN (0 / 0): `ClassicalModel.scores`
    deals with them."""
    estimator = pipeline[-1]
    classes = np.asarray(estimator.classes_)
    if hasattr(estimator, "predict_proba"):
        with np.errstate(invalid="ignore", divide="ignore"):
            scores = pipeline.predict_proba(x)
    else:
        d = pipeline.decision_function(x)
        if d.ndim == 1:  # binary: d > 0 means classes[1]
            positive = 1.0 / (1.0 + np.exp(-d))
            scores = np.stack([1.0 - positive, positive], axis=1)
        else:
            z = np.exp(d - d.max(axis=1, keepdims=True))
            scores = z / z.sum(axis=1, keepdims=True)
    return classes, scores


class ClassicalModel:
    """One fitted classical model over feature vectors: single-label (K classes) or multi-label (K findings,
    one-vs-rest). `fit` takes the labeled rows' features and labels and, for the SSL classifiers, the
    unlabeled pool's features (no labels); `scores` gives [n, K] per-image scores."""

    def __init__(
        self, classifier: str, params: dict[str, Any], num_classes: int, multilabel: bool, seed: int
    ):
        self.classifier, self.params, self.seed = classifier, params, seed
        self.num_classes, self.multilabel = num_classes, multilabel
        self.semi_supervised = classifier in SEMI_SUPERVISED
        # one pipeline (single-label) or one per finding; a float = a constant score
        self.models: list[Any] = []
        self.unreached = 0  # images scored by the labeled prior (see `scores`)

    def fit(self, x: np.ndarray, y: np.ndarray, unlabeled: np.ndarray | None = None) -> ClassicalModel:
        unlabeled = unlabeled if self.semi_supervised and unlabeled is not None else np.zeros((0, x.shape[1]))
        x_all = np.concatenate([x, unlabeled]).astype(np.float64)
        hidden = np.full(len(unlabeled), -1, dtype=np.int64)  # what the SSL classifiers see for the pool
        if not self.multilabel:
            y = np.asarray(y, dtype=np.int64)
            if len(np.unique(y)) < 2:
                raise SemimedError(
                    f"classical: the labeled images hold one class only ({int(y[0])}); need 2+"
                )
            self.models = [self._fit_one(x_all, np.concatenate([y, hidden]), len(x))]
            return self
        y = np.asarray(y, dtype=np.float64)
        self.models = []
        for k in range(self.num_classes):
            known = ~np.isnan(y[:, k])
            values = np.unique(y[known, k])
            if len(values) < 2:
                warnings.warn(
                    f"classical: finding {k} has {'no known label' if not len(values) else 'one class'} "
                    "among the labeled images; its score is constant",
                    SemimedWarning,
                    stacklevel=2,
                )
                self.models.append(float(values[0]) if len(values) else 0.5)
                continue
            target = np.where(known, np.nan_to_num(y[:, k]), -1).astype(np.int64)
            if self.semi_supervised:
                self.models.append(self._fit_one(x_all, np.concatenate([target, hidden]), len(x)))
            else:
                self.models.append(self._fit_one(x[known], target[known], int(known.sum())))
        return self

    def _fit_one(self, x: np.ndarray, y: np.ndarray, labeled: int):
        pipeline = build_pipeline(self.classifier, self.params, self.seed, x.shape[1])
        # The supervised ones never see the unlabeled rows (y = -1): they are not part of x here.
        rows = slice(None) if self.semi_supervised else slice(0, labeled)
        pipeline.fit(x[rows], y[rows])
        known = y[y >= 0]
        # The labeled class frequencies, in the estimator's class order: the score of an image that no labeled
        # image reaches in label_spreading's graph (it carries no evidence either way).
        pipeline.semimed_prior = np.array([(known == c).mean() for c in pipeline[-1].classes_])
        return pipeline

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Per-image scores [n, K]: class probabilities (rows sum to 1) or finding probabilities.

        label_spreading gives an image that no labeled image reaches through the graph (a k-NN component
        without labels, at 1% labels) no distribution at all: its score is the labeled class frequencies,
        with a RuntimeWarning, and the count of such images is added to `self.unreached`. If no image is
        reached the run stops: nothing was learned."""
        x = np.asarray(x, dtype=np.float64)
        out = np.zeros((len(x), self.num_classes), dtype=np.float32)
        for k, model in enumerate(self.models):
            if isinstance(model, float):
                out[:, k] = model
                continue
            classes, scores = _scores(model, x)
            missing = ~np.isfinite(scores).all(axis=1)
            if missing.all() and len(x):
                raise SemimedError(
                    f"classical {self.classifier}: no labeled image reaches any of {len(x)} images through the "
                    "graph; raise method.params.n_neighbors (kernel knn) or lower method.params.gamma (rbf)"
                )
            if missing.any():
                scores[missing] = model.semimed_prior
                self.unreached += int(missing.sum())
                warnings.warn(
                    f"classical {self.classifier}: {int(missing.sum())} of {len(x)} images are reached by no "
                    "labeled image; they get the labeled class frequencies as scores",
                    SemimedWarning,
                    stacklevel=2,
                )
            if self.multilabel:
                out[:, k] = scores[:, list(classes).index(1)]
            else:
                out[:, classes] = scores  # a class no labeled image has would keep score 0
        return out
