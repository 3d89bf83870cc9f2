"""The comparison report, built from run directories alone: metrics.jsonl, summary.json, config.yaml,
split.json and eval.json. No model is loaded and nothing is trained.

`build_report(run_dirs, out)` writes report.md, a self-contained report.html, summary.csv,
summary.json and the figures as PNG files into `out`.
"""

from vlfit.report.build import build_report
from vlfit.report.runs import MANIFEST, MASK_EXAMPLES, Run, expand_run_dirs, load_run, write_mask_examples

__all__ = ["build_report", "expand_run_dirs", "load_run", "Run", "MANIFEST", "MASK_EXAMPLES", "write_mask_examples"]
