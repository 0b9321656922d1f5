"""What runs leave behind and how it is read: a run's position-wise files and summary
(l2m.report.run) and the sweep report over many runs (l2m.report.sweep, `python -m l2m.sweep`).
Needs neither Lightning nor a logger, so it works on runs copied off the training machines."""
