"""The paper's artifacts built on the evaluation: the report's pages and figures (report.py),
the published values they are held against (published.py, published.yaml), Appendix A's
experiments (experiments.py), Table 2's probe (probe.py) and Figures 6 and 7 (figures.py)."""
