"""The options of block quantization, shared by `edgellama quantize` (quantize.rewrite) and
`edgellama export --bits` (exporter.quantized), and the manifest record they write."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgellama.runtime.errors import BadArgumentError

from .schemes import BITS, BLOCK_SIZES, METHODS, scheme_name

TABLE_CHOICES = ("keep", "int8", "int4")
ACCURACY_LEVELS = (0, 1, 2, 4)

# Named points on the size / speed / accuracy curve (`quantize --preset`; README "Presets"
# has their measured figures). `mixed_share`: the share of the bytes that 8 bits everywhere
# would add which goes to the projections whose 4-bit fit loses most (quantize/mixed.py).
PRESETS: dict[str, dict] = {
    # int4 tables (block 32) and 64-wide integer-zero-point blocks: the smallest folder.
    "small": dict(bits=4, block_size=64, method="mse-zp", embeddings="int4", lm_head="int4", table_block_size=32,
                  mixed_share=0.0),
    # small's layout, plus 8 bits for the projections whose 4-bit fit adds most output error per
    # byte saved, spending 22 % of what 8 bits everywhere would add.
    "balanced": dict(bits=4, block_size=64, method="mse-zp", embeddings="int4", lm_head="int4", table_block_size=32,
                     mixed_share=0.22),
    # a float minimum per 32 weights (exact on Q4_0 / Q4_1 / Q4_K grids; two more ops per projection).
    "accurate": dict(bits=4, block_size=32, method="mse", embeddings="int8", lm_head="int8", table_block_size=None,
                     mixed_share=0.0),
}
DEFAULT_PRESET = "balanced"


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "mse"
    accuracy_level: int = 4  # 4: int8 activations (MLAS' fast path on CPU); 0: float
    embeddings: str = "int8"
    # int8 by default: on SmolLM2 an int4 lm_head alone costs +7 % perplexity (measured).
    lm_head: str = "int8"  # or "same" as --bits, or one of TABLE_CHOICES
    force: bool = False
    # Calibration (quantize only; export --bits never sees activations): mse / mse-zp weigh each
    # input column's error by the mean square of its activations over a text; gptq needs the text.
    calibrate: bool = True
    calibration: str | None = None  # a UTF-8 text file; None = the text shipped with edgellama
    calibration_tokens: int = 4096
    table_block_size: int | None = None  # the embedding / lm_head tables' block; None: block_size
    preset: str | None = None  # the name the options came from, for the manifest
    mixed_share: float = 0.0  # see PRESETS
    size_budget_mb: float | None = None  # the whole folder, in MB (10^6 bytes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "QuantOptions":
        """A preset's options, with `overrides` (options given explicitly) on top."""
        if name not in PRESETS:
            raise BadArgumentError(f"--preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
        preset = dict(PRESETS[name])
        bits = overrides.get("bits", preset["bits"])
        for table in ("embeddings", "lm_head"):  # a preset's table never has fewer bits than --bits
            if preset[table].startswith("int") and int(preset[table][3:]) < bits:
                preset[table], preset["table_block_size"] = f"int{bits}", None
        return cls(**{**preset, "preset": name, **overrides})

    def block_for(self, table: bool) -> int:
        """The block size of a vocabulary table (embedding / lm_head) or of a projection."""
        return self.table_block_size or self.block_size if table else self.block_size

    @property
    def mixed(self) -> bool:
        """Whether some 4-bit projections may get 8 bits (quantize/mixed.py)."""
        return self.bits == 4 and (self.mixed_share > 0 or self.size_budget_mb is not None)

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise BadArgumentError(f"--bits {self.bits} is not supported; choose 4 or 8")
        if self.method not in METHODS:
            raise BadArgumentError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        scheme_name(self.method, self.symmetric)
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise BadArgumentError(f"--accuracy-level {self.accuracy_level} is not one of {ACCURACY_LEVELS}")
        if self.calibration is not None and not self.calibrated:
            raise BadArgumentError("--calibration is used by --method mse, mse-zp and gptq (and not with --no-calibration)")
        if self.method == "gptq" and not self.calibrate:
            raise BadArgumentError("--method gptq needs a calibration text; drop --no-calibration")
        if self.calibration_tokens < 64:
            raise BadArgumentError(f"--calibration-tokens {self.calibration_tokens}: use at least 64")
        if self.table_block_size is not None and self.table_block_size not in BLOCK_SIZES:
            raise BadArgumentError(f"table block size {self.table_block_size} is not one of {BLOCK_SIZES}")
        if not 0.0 <= self.mixed_share <= 1.0:
            raise BadArgumentError(f"mixed_share {self.mixed_share} must be within [0, 1]")
        if self.size_budget_mb is not None and (self.size_budget_mb <= 0 or self.bits != 4):
            raise BadArgumentError(f"--size-budget {self.size_budget_mb} picks which projections get 8 bits instead "
                                   "of 4, so it needs --bits 4 and a positive number of MB; drop --bits 8 or the budget")
        for opt, value in (("--embeddings", self.embeddings), ("--lm-head", self.lm_head)):
            if value not in TABLE_CHOICES + (("same",) if opt == "--lm-head" else ()):
                raise BadArgumentError(f"{opt} {value!r}: choose one of {', '.join(TABLE_CHOICES)}")

    @property
    def calibrated(self) -> bool:
        """Whether quantizing runs the float graph over a calibration text first."""
        return self.method == "gptq" or (self.calibrate and self.method in ("mse", "mse-zp"))

    @property
    def scheme(self) -> str:
        return scheme_name(self.method, self.symmetric)

    def scheme_for(self, bits: int) -> str:
        """8-bit MatMulNBits with uint8 zero points lands on a slow CPU kernel (SmolLM2's int8
        lm_head: 20 ms a token instead of 7). The zero-point schemes are the no-extra-ops ones,
        so their 8-bit weights (the int8 vocabulary tables) take the symmetric grid, which needs
        no zero points and no float-min correction either; at 8 bits it costs little accuracy."""
        return "rtn-symmetric" if bits == 8 and self.scheme.endswith("-zeropoint") else self.scheme

    def table_bits(self, which: str) -> int | None:
        """Bits for the embedding table or lm_head; None keeps it float."""
        choice = self.lm_head if which == "lm_head" else self.embeddings
        if choice == "same":
            return self.bits
        return None if choice == "keep" else int(choice[3:])

    def record(self, errors: list[float], exact_from_source: int | None = None,
               wider: list[str] | None = None) -> dict:
        """The manifest's `quantization` entry: these options and what quantizing cost;
        `wider`: the projections a mixed choice gave 8 bits."""
        d = asdict(self)
        d.pop("force")
        d.pop("calibrate")
        if self.preset is None:
            d.pop("preset")
        d["table_block_size"] = self.block_for(table=True)
        if not self.mixed:
            d.pop("mixed_share")
            d.pop("size_budget_mb")
        else:
            d["int8_projections"] = sorted(wider or [])
        if not self.calibrated:
            d["calibration"] = None
            d.pop("calibration_tokens")
        else:
            d["calibration"] = Path(self.calibration).name if self.calibration else "edgellama calibration.txt"
        d["scheme"] = self.scheme
        d["lm_head"] = "keep" if self.table_bits("lm_head") is None else f"int{self.table_bits('lm_head')}"
        d["mean_relative_error"] = float(np.mean(errors)) if errors else 0.0
        d["quantized_weights"] = len(errors)
        if exact_from_source is not None:
            d["exact_from_source"] = exact_from_source
        return d
