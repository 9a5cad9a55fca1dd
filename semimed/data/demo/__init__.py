"""Synthetic demo data written IN THE REAL ON-DISK FORMATS, so the real loaders (not special demo code) read it.

    <out>/breakhis/BreaKHis_v1/histology_slides/breast/<benign|malignant>/SOB/<subtype>/SOB_<B|M>_<T>_<yy>-<id>/<mag>X/
        SOB_<B|M>_<T>-<yy>-<id>-<mag>-<seq>.png                         RGB, image_size x image_size
    <out>/chestxray14/Data_Entry_2017_v2020.csv, train_val_list.txt, test_list.txt,
        images_001/images/<patient:08d>_<followup:03d>.png, images_002/images/…  8-bit grayscale

The pictures are cartoons, but they carry a learnable, class-dependent signal under nuisance variation, so that
accuracy-versus-label-count curves have a shape (not flat at chance, not 100% from ten images). One module per
format says what its pictures show:

    write.py        `write_demo`: both formats under one folder, idempotent, never touching folders it did not write
    breakhis.py     the BreakHis tree: nuclei on stroma, malignant tissue with more and larger nuclei
    chestxray14.py  the NIH release: metadata table, official lists, one drawn pattern per finding
    common.py       what both share: the random streams, atomic PNG writing, noise and ellipse drawing

Determinism: every random draw comes from `np.random.default_rng` seeded from (seed, stream, indices), so the
same seed gives byte-identical files, and one image's pixels do not depend on how many others were written.
"""

from semimed.data.demo.chestxray14 import CHEST_FINDINGS, CHEST_HEADER
from semimed.data.demo.write import DEMO_FORMAT_VERSION, write_demo

__all__ = ["CHEST_FINDINGS", "CHEST_HEADER", "DEMO_FORMAT_VERSION", "write_demo"]
