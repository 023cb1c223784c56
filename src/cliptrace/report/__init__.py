"""The HTML report of a run: model card, data attribution per target with input heatmaps, self-influence."""

from cliptrace.report.build import Planted, ReportSummary, build_report, planted_targets

__all__ = ["Planted", "ReportSummary", "build_report", "planted_targets"]
