"""Data curation from attribution: rank training pairs by a filter, write the curated dataset, check it by retraining.

Signals (:mod:`~cliptrace.curate.signals`) are measured once per run; each filter (:data:`FILTERS`, one class in
:mod:`~cliptrace.curate.filters`) ranks the pairs from them; :func:`write_curation` writes the kept pairs in the
dataset's own format with every pair's score and reason; :mod:`~cliptrace.curate.retrain` retrains one model per
filter and seed and compares them with paired bootstrap intervals. ``cliptrace curate RUN`` runs all of it.
"""

from cliptrace.curate.curation import Curation, removal_budget, write_curation
from cliptrace.curate.filters import DEFAULT_FILTER, FILTERS, CurationFilter, Ranking, get_filter
from cliptrace.curate.retrain import NO_FILTER, RetrainJob, compare_arms, comparison_plot, run_retraining
from cliptrace.curate.signals import Signals, measure_signals

__all__ = ["DEFAULT_FILTER", "FILTERS", "NO_FILTER", "Curation", "CurationFilter", "Ranking", "RetrainJob", "Signals",
           "compare_arms", "comparison_plot", "get_filter", "measure_signals", "removal_budget", "run_retraining",
           "write_curation"]
