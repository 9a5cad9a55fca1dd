"""Training methods, one file each, behind `Method.train_step`. `create_method` builds one by name."""

from semimed.methods.base import (
    METHODS,
    Batch,
    DataInfo,
    Method,
    Needs,
    StepOutput,
    check_method,
    create_method,
)

# Importing the modules registers them.
from semimed.methods import supervised  # noqa: E402,F401  isort: skip
from semimed.methods import fixmatch, gan_ssl, mean_teacher, pseudo_label  # noqa: E402,F401  isort: skip
from semimed.methods import finetune, flexmatch  # noqa: E402,F401  isort: skip
from semimed.methods import byol, simclr  # noqa: E402,F401  isort: skip
from semimed.methods import classical  # noqa: E402,F401  isort: skip

__all__ = ["METHODS", "Batch", "DataInfo", "Method", "Needs", "StepOutput", "check_method", "create_method"]
