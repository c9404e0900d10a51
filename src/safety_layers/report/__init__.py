"""One self-contained HTML page (and its Markdown twin) from any run folder."""

from .run import ReportConfig, ReportResult, report, write_report

__all__ = ["ReportConfig", "ReportResult", "report", "write_report"]
