"""The lm-eval tasks the evaluation runs by default, and the names the paper's tables give them. Plain data (no
lm-eval, no torch), so the report stage reads it without the evaluation's imports."""

# The paper's zero-shot common-sense tasks (Table 1), in its order, with its column names.
TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "social_iqa": "SIQA", "hellaswag": "HellaSwag",
               "winogrande": "WinoGrande", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
PAPER_TASKS = tuple(TASK_LABELS)
DEFAULT_TASKS = PAPER_TASKS + ("wikitext",)  # then WikiText-2 perplexity
