"""The LLM-QAT student: fake quantizers (`quantizers`), the module swap that applies them (`quantize`), rotations
(`rotations`), saved students (`checkpoint`) and low-bit exports (`export` writes them; `packed`, the compressed-tensors
format, reads them back). Imports nothing of this repository outside `models/`."""
from .checkpoint import load_student, save_quantized, write_remote_code
from .quantize import QATConfig, QuantLinear, quantize_model, quantized_modules
from .quantizers import check_bits, fake_quantize

__all__ = ["QATConfig", "QuantLinear", "quantize_model", "quantized_modules", "load_student", "save_quantized",
           "write_remote_code", "check_bits", "fake_quantize"]
