"""Learning check on the demo data: SSL methods against the matched supervised control, one seed, same budget.

Measured before writing the assertions (docs/benchmarks.md, "## Methods"; val ROC-AUC at the last step,
write_demo's default data, 5% labels = 22 images, the settings below, seeds 0/1/2):

    supervised                  0.724  0.817  0.788
    fixmatch (threshold 0.9)    0.795  0.995  0.840   ahead in 3/3 (+0.07 +0.18 +0.05)
    fixmatch (threshold 0.95)   0.855  1.000  0.840   ahead in 3/3
    pseudo_label (threshold 0)  0.659  0.973  0.715   ahead in 1/3 (-0.07 +0.16 -0.07)

The val set is 4 patients (96 images): one patient's stain moves the AUC by more than the SSL effect. On demo
variants with larger val sets (64 and 96 patients, 13-20 val patients) FixMatch was ahead in 5 of 9 pairs and
pseudo-label (threshold 0) in 4 of 6; on the larger test set pseudo-label was ahead in 3/3 above.
So: FixMatch beats the control at this setting (asserted); pseudo-label does not reliably (NOT asserted: it is
asserted to stay within the measured spread, −0.1, of the control instead). Every run learns, and both methods' unlabeled term is
active and informative: most unlabeled images get a pseudo-label and the confident ones are right far more
often than a coin on these balanced classes (their accuracy is logged from the hidden labels, never trained on).
The numbers of the run are printed (pytest -s) and carried in the assertion messages.
"""

from __future__ import annotations

import pytest

from semimed.config import load_config
from semimed.experiment import run_training

pytestmark = pytest.mark.slow

COMMON = [
    "data.dataset=breakhis",
    "data.task=binary",
    "data.image_size=32",
    "data.fraction=0.05",
    "model.backbone=small_cnn",
    "train.steps=200",
    "train.batch_size=16",
    "train.unlabeled_ratio=2",
    "train.lr=0.003",
    "train.eval_every=50",
    "train.checkpoint_every=200",
    "train.device=cpu",
    # ~3x faster on this CPU (AVX512-BF16); the control runs with the same settings.
    "train.amp=bf16",
    "train.channels_last=true",
    "seed=0",
]
METHODS = {
    "supervised": [],
    # Lee 2013's own form: every unlabeled image gets its argmax pseudo-label (no threshold), ramped in.
    "pseudo_label": ["method.params.threshold=0.0", "method.params.rampup_steps=100"],
    "fixmatch": ["method.params.threshold=0.9"],
}


@pytest.fixture(scope="module")
def results(demo_roots, tmp_path_factory) -> dict[str, dict]:
    out = {}  # one torch thread (tests/conftest.py): tiny networks on a shared 2-core machine
    for name, extra in METHODS.items():
        cfg = load_config(
            None, [f"data.root={demo_roots['breakhis']}", f"method.name={name}", *COMMON, *extra]
        )
        out[name] = run_training(cfg, tmp_path_factory.mktemp(name), show_progress=False)
    for name, final in out.items():
        print(
            f"{name}: val/roc_auc={final['val/roc_auc']:.3f} test_last/roc_auc={final['test_last/roc_auc']:.3f} "
            f"mask_rate={final.get('train/mask_rate')} pseudo_acc={final.get('train/pseudo_acc')}"
        )
    return out


def test_every_run_learns(results):
    for name, final in results.items():
        assert final["val/roc_auc"] > 0.6, f"{name}: {final['val/roc_auc']:.3f}"


@pytest.mark.parametrize("name", ["pseudo_label", "fixmatch"])
def test_unlabeled_term_is_active_and_its_pseudo_labels_are_informative(results, name):
    final = results[name]
    assert final["train/mask_rate"] > 0.5, final["train/mask_rate"]
    assert final["train/pseudo_acc"] > 0.7, final["train/pseudo_acc"]  # balanced classes: chance is 0.5
    assert final["train/unsup_loss"] > 0.0


@pytest.mark.parametrize("name", ["pseudo_label", "fixmatch"])
def test_ssl_is_not_worse_than_the_matched_control_beyond_the_measured_spread(results, name):
    ssl, control = results[name]["val/roc_auc"], results["supervised"]["val/roc_auc"]
    assert ssl >= control - 0.1, f"{name} {ssl:.3f} vs supervised {control:.3f}"


def test_fixmatch_beats_the_matched_control_on_val(results):
    ssl, control = results["fixmatch"]["val/roc_auc"], results["supervised"]["val/roc_auc"]
    assert ssl > control, f"fixmatch {ssl:.3f} vs supervised {control:.3f}"
