"""The pipeline, one package per stage, each importing only the stages before it (tests/test_layering.py):

    data        records, start-token plan, sampler, shard synthesis, merge, token store, training dataset
    training    loading a teacher or student, the KD trainer, the memory planner
    evaluation  lm-eval tasks and harness, offline metrics, GPTQ / SmoothQuant baselines
    report      result tables and plots; the paper table's methods and cached cells

`safety` is what every stage shares: one-line errors, checks before long work, crash-safe writes and lock files.
"""
