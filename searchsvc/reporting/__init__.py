"""What a run shows: the ranked table, the HTML report, compare, plots."""
