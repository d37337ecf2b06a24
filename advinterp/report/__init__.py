"""Static HTML report of a run directory: ``advinterp report RUN`` (opens from disk)."""

from advinterp.report.build import write_report

__all__ = ["write_report"]
