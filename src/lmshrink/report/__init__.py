"""Reports of a pipeline run: a Markdown and a self-contained HTML file with the table and the figures.

>>> from lmshrink.report import build_report  # doctest: +SKIP
>>> build_report("runs/demo")  # doctest: +SKIP
"""

from lmshrink.report.collect import ModelRow, RunData, collect_run
from lmshrink.report.render import build_report, compare_runs, markdown_table

__all__ = ["ModelRow", "RunData", "build_report", "collect_run", "compare_runs", "markdown_table"]
