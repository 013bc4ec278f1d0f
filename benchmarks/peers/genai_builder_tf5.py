#!/usr/bin/env python3
"""onnxruntime-genai 0.18's model builder on a transformers-5 Gemma 3 config: same arguments.

transformers 5 nests Gemma 3's rope settings per layer type (``rope_parameters =
{"full_attention": {...}, "sliding_attention": {...}}``) and drops ``rope_local_base_freq``;
genai 0.18's builder reads ``rope_parameters["rope_type"]`` and ``rope_local_base_freq``
(KeyError / AttributeError). This wrapper adds both to the loaded config, from the nested
values, then runs the builder unchanged:

    python benchmarks/peers/genai_builder_tf5.py -i FLOAT_COPY -o OUT -p int4 -e cpu
"""
import runpy

import transformers

_load = transformers.AutoConfig.from_pretrained.__func__


def _from_pretrained(cls, *a, **kw):
    cfg = _load(cls, *a, **kw)
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "rope_type" not in rope:
        rope.update(rope_type=rope["full_attention"].get("rope_type", "default"),
                    rope_theta=rope["full_attention"]["rope_theta"])
    if isinstance(rope, dict) and "sliding_attention" in rope and getattr(cfg, "rope_local_base_freq", None) is None:
        cfg.rope_local_base_freq = rope["sliding_attention"]["rope_theta"]
    return cfg


transformers.AutoConfig.from_pretrained = classmethod(_from_pretrained)

if __name__ == "__main__":
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
