"""Stage 3, evaluation: a model's metrics (lm-eval tasks, perplexity, fidelity to the teacher) and the training-free
baselines it is compared with."""
