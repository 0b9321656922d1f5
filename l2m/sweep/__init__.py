"""`python -m l2m.sweep`: the sweep report; the code is l2m.report.sweep."""
