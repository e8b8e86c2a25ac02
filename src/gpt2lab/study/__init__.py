"""The variant study: a suite of variants trained alike, compared with intervals, and its report."""
