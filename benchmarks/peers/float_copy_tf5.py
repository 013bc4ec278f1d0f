#!/usr/bin/env python3
"""make_float_copy.py under transformers 5: same arguments, same output.

transformers 5 loads a GGUF as a "gguf-quantized" model and then refuses
``save_pretrained`` ("The model is quantized with gguf and is not serializable"),
although the loaded weights are plain dequantised float32 tensors. This wrapper drops
that quantizer marker right after loading, then runs make_float_copy.main() unchanged:

    HF_HUB_OFFLINE=1 python benchmarks/peers/float_copy_tf5.py --gguf-dir DIR --out OUT
"""
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import transformers  # noqa: E402

import make_float_copy  # noqa: E402

_load = transformers.AutoModelForCausalLM.from_pretrained.__func__


def _from_pretrained(cls, *a, **kw):
    model = _load(cls, *a, **kw)
    if kw.get("gguf_file"):
        model.hf_quantizer = None
        for obj in (model, model.config):
            if hasattr(obj, "quantization_config"):
                try:
                    delattr(obj, "quantization_config")
                except AttributeError:
                    pass
        model.is_quantized = False
    return model


transformers.AutoModelForCausalLM.from_pretrained = classmethod(_from_pretrained)

if __name__ == "__main__":
    sys.exit(make_float_copy.main())
