"""fmapi benchmarks: each runs both sides in one run on one machine and prints ratios."""
