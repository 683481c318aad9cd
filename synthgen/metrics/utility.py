"""Moved to :mod:`synthgen.studies.utility` (a study trains classifiers and generates data; the
metrics package stays below generation). Kept so ``synthgen.metrics.utility`` imports still work."""

from synthgen.studies.utility import classical_augment, small_cnn, train_and_test, utility_study  # noqa: F401
