"""What every command shares (utils/cli.py): checks made before any long work."""
import pytest
from transformers import GPT2Config, PretrainedConfig

from utils.cli import check_positions


def test_sequences_past_the_models_positions_are_refused_where_the_config_says_how_many():
    check_positions(16, "--max-length", GPT2Config(n_positions=16))  # GPT-2 calls it n_positions
    with pytest.raises(ValueError, match=r"^--max-length 17 is longer than the model's 16 positions "
                                         r"\(n_positions in its config.json\); pass --max-length 16 or less$"):
        check_positions(17, "--max-length", GPT2Config(n_positions=16))
    check_positions(10**6, "--max-length", PretrainedConfig())  # no such field: nothing to check against
