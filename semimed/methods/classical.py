"""`classical`: hand-crafted texture features + a scikit-learn classifier, the pre-CNN baseline (Spanhol et al.
2016 on BreakHis), as a method like any other: same config, split, metrics, predictions and report.

    method: {name: classical, params: {features: glcm_lbp_color, classifier: svm_rbf, C: 1.0}}

Features (semimed/classical/features.py): glcm, lbp, hog, color, glcm_lbp, glcm_lbp_color, all. Classifiers
(semimed/classical/classifiers.py): svm_linear, svm_rbf, random_forest, logistic, and the two that use the
unlabeled pool: label_spreading, self_training. Hyperparameters that do not apply to the chosen classifier are
errors.

It has no step loop and no network: it declares `closed_form = True`, and `experiment.run_training` runs it
through `semimed.classical.fit.fit_closed_form` (one fit, then the engine's evaluation pieces) instead of
`engine.fit`. The train.* budget keys do not apply to it; nothing is exported (no backbone.safetensors).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from torch import nn

from semimed.classical.classifiers import SEMI_SUPERVISED, ClassicalModel, resolve_params
from semimed.classical.features import FEATURE_SETS
from semimed.errors import SemimedError
from semimed.methods.base import METHODS, Batch, Method, Needs, StepOutput
from semimed.optional import require

NO_NETWORK = "method classical (hand-crafted features + scikit-learn) fits in closed form and has no network"


@METHODS.register("classical")
class Classical(Method):
    """Features of the labeled images (and, for label_spreading / self_training, of the unlabeled pool) ->
    StandardScaler -> classifier; scores for val and test. `model` is ignored (build_run passes None)."""

    closed_form = True  # experiment.run_training: fit_closed_form, not engine.fit's step loop

    def __init__(
        self,
        model: nn.Module | None,
        num_classes: int,
        multilabel: bool,
        features: str = "glcm_lbp_color",
        classifier: str = "svm_rbf",
        C: float | None = None,
        gamma: float | str | None = None,
        n_estimators: int | None = None,
        max_depth: int | None = None,
        class_weight: str | None = None,
        kernel: str | None = None,
        n_neighbors: int | None = None,
        alpha: float | None = None,
        base: str | None = None,
        threshold: float | None = None,
    ) -> None:
        super().__init__(None, num_classes, multilabel)
        if features not in FEATURE_SETS:
            raise SemimedError(
                f"unknown method.params.features {features!r}; valid: {', '.join(FEATURE_SETS)}"
            )
        if set(FEATURE_SETS[features]) - {"color"}:  # GLCM, LBP and HOG are scikit-image's
            require("skimage", "classical", f"method classical (features {features})", "scikit-image")
        given = {
            "C": C,
            "gamma": gamma,
            "n_estimators": n_estimators,
            "max_depth": max_depth,
            "class_weight": class_weight,
            "kernel": kernel,
            "n_neighbors": n_neighbors,
            "alpha": alpha,
            "base": base,
            "threshold": threshold,
        }
        self.features, self.classifier = features, classifier
        self.params = resolve_params(classifier, given)
        self.fit_logs: dict[str, float] = {}

    param_rules = {"features": tuple(FEATURE_SETS)}

    @classmethod
    def check_params(cls, params: dict[str, Any], where: str = "method.params") -> dict[str, Any]:
        """What `check_method` calls at config load, before any data (cheap: no features, no fit): the
        classifier's own checks (semimed/classical/classifiers.py), then the annotations' types."""
        try:
            cls(None, 2, False, **params)
        except TypeError:  # a value of the wrong kind (features: [glcm, lbp]): the typed check names it
            pass
        return super().check_params(params, where)

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        # What the data side would build; fit_closed_form reads the pools directly (pixels, not batches).
        return Needs(unlabeled=("none",)) if self.classifier in SEMI_SUPERVISED else Needs()

    def evaluated_model(self) -> str:
        shown = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items()
        )
        return f"{self.features} features + {self.classifier}({shown})"

    def fit_predict(self, data, seed: int, workers: int = 1) -> dict[str, np.ndarray]:
        """Fit on `data` (a RunData) and return scores [n, K] for the rows of its "val" and "test" parts, in
        `data.rows[part]` order. Reads the labels of the labeled rows only; the unlabeled pool (SSL
        classifiers) contributes its features. `workers`: processes for feature extraction."""
        from semimed.classical.cache import load_features

        rows = data.rows
        unlabeled = rows["unlabeled"] if self.classifier in SEMI_SUPERVISED else np.zeros(0, np.int64)
        parts = {"labeled": rows["labeled"], "unlabeled": unlabeled, "val": rows["val"], "test": rows["test"]}
        started = time.perf_counter()
        everything = np.concatenate(list(parts.values()))
        table = load_features(data.pixels, everything, self.features, workers)
        bounds = np.cumsum([0, *(len(r) for r in parts.values())])
        x = {name: table[bounds[i] : bounds[i + 1]] for i, name in enumerate(parts)}
        fitted = time.perf_counter()
        targets = np.asarray(data.targets)[parts["labeled"]]  # the only labels read
        model = ClassicalModel(self.classifier, self.params, self.num_classes, self.multilabel, seed)
        model.fit(x["labeled"], targets, x["unlabeled"])
        scores = {part: model.scores(x[part]) for part in ("val", "test") if len(parts[part])}
        self.fit_logs = {
            "features_seconds": fitted - started,
            "fit_seconds": time.perf_counter() - fitted,
            "num_features": float(table.shape[1]),
            "labeled": float(len(parts["labeled"])),
            "unlabeled_used": float(len(unlabeled)),
            # val + test images label_spreading's graph connects to no labeled image (scored by the prior)
            "unreached": float(model.unreached),
        }
        return scores

    # ------------------------------------------------------------------- what a step-loop method would have
    def train_step(self, batch: Batch, step: int) -> StepOutput:
        raise SemimedError(f"{NO_NETWORK}: it runs through experiment.run_training, not engine.fit")

    def parameter_groups(self) -> list[dict[str, Any]]:
        raise SemimedError(f"{NO_NETWORK}: it runs through experiment.run_training, not engine.fit")

    def backbone(self) -> nn.Module:
        raise SemimedError(f"{NO_NETWORK} to export, explain or transfer")

    def networks(self):
        return iter(())
