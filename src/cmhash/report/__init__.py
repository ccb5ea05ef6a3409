"""The run's results as pictures: vega-lite specs built from the metrics files, rendered offline."""
