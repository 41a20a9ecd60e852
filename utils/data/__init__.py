"""Stage 1, data: the teacher writes its training data (paper section 2.1), which is validated, merged and read."""
