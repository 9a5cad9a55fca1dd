"""semimed: a few-label learning lab for medical image classification."""

__version__ = "0.1.0"
