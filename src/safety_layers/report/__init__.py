"""One self-contained HTML page (and its Markdown twin) from any run folder."""

from .figures import PNG_MAGIC
from .render import fmt
from .run import ReportConfig, ReportResult, detect, report, write_report

__all__ = ["PNG_MAGIC", "ReportConfig", "ReportResult", "detect", "fmt", "report", "write_report"]
