"""Export a QAT checkpoint as a real low-bit checkpoint (`packed`) or a plain float one (`folded`).

    python scripts/export.py CKPT OUT --format packed   # integer / FP8 / FP4 weights, compressed-tensors (vLLM, llm-compressor)
    python scripts/export.py CKPT OUT --format folded   # float weights holding the quantized values

CKPT is a directory saved by a QAT run (its config.json has `llm_qat`). See docs/EXPORT.md.
"""
import argparse
import logging
from pathlib import Path

from models.export import FORMATS, PACKED, export
from utils.safety import user_errors
from utils.training.loading import resolve_model_path


def weight_bytes(directory: Path) -> int:
    """Bytes of the weight files (*.safetensors): what the export shrinks; tokenizer files are left out."""
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="QAT checkpoint directory (saved by models.save_quantized)")
    parser.add_argument("out", help="output directory")
    parser.add_argument("--format", choices=FORMATS, default=PACKED,
                        help="packed: integer, FP8, NVFP4 or MXFP4 weights + scales (compressed-tensors); folded: "
                        "dequantized float weights")
    parser.add_argument("--force", action="store_true", help="replace the contents of a non-empty output directory "
                        "(never allowed: the checkpoint itself, or a training run and its checkpoints)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    with user_errors("export.py"):
        source = Path(resolve_model_path(args.checkpoint))
        out = export(source, args.out, args.format, args.force)
    size_in, size_out = weight_bytes(source), weight_bytes(out)
    print(f"input  {source}: {size_in / 1e6:.1f} MB of weights")
    print(f"output {out} ({args.format}): {size_out / 1e6:.1f} MB of weights")
    print(f"compression ratio: {size_in / size_out:.2f}x (output is {size_out / size_in:.3f} of the input)")


if __name__ == "__main__":
    main()
