"""Weight-only int8 / int4 quantization, applied from outside the model by swapping nn.Linear modules.

    from qwenkit.quant import quantize_model, quantization_config
    quantize_model(model, bits=4)              # blocks int4 (group 128), lm_head int8
    config["quantization_config"] = quantization_config(model)
    save_file(model.state_dict(), ...)         # only the portable tensors, see linear.py

Loading such a checkpoint: build the model on the meta device, `apply_quantization_config(model,
config["quantization_config"])`, then assign the saved tensors by name. AutoGPTQ / GPTQModel
checkpoints load into the same layers (autogptq.py; `qwenkit.load` reads them).
"""

from .convert import apply_quantization_config, quantization_config, quantize_model
from .linear import Int4Linear, Int8Linear, QuantizedLinear, pack_int4, unpack_int4
from .rtn import quantize_int4, quantize_int8

__all__ = ["Int4Linear", "Int8Linear", "QuantizedLinear", "apply_quantization_config", "pack_int4",
           "quantization_config", "quantize_int4", "quantize_int8", "quantize_model", "unpack_int4"]
