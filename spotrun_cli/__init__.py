"""spotrun's command line: status, logs, report, download and drill of a training run.

``write_html_report(s3, bucket, run_id, out_dir)`` writes a run's HTML report for
callers such as the emulator, which have an S3 client but no stack lookup.
"""

from __future__ import annotations

from pathlib import Path


def write_html_report(s3, bucket: str, run_id: str, out_dir: str | Path, **options) -> Path:
    """Write index.html, loss.png and timeline.png of a run; return index.html's path.

    ``options`` are those of ``spotrun_cli.report.write_html_report``. matplotlib is
    imported only here, so importing this package stays cheap.
    """
    from spotrun_cli.report import write_html_report as write

    return write(s3, bucket, run_id, out_dir, **options)
