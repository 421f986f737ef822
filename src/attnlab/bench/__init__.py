"""``attnlab bench``: correctness gate first, then timings side by side with the baselines."""
