"""Stage 4, report: tables and plots of evaluation results, and the paper table's grid of methods as cached cells."""
