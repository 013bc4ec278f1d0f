"""Speculative decoding: greedy text equals plain greedy text, sampling keeps the model's
distribution, and the drafters and their guards behave."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import PROMPT_IDS
from edgellama.cli import main
from edgellama.exporter.export import export
from edgellama.runtime.contract import KVLayout
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model
from edgellama.runtime.sampling import SamplingParams, make_sampler, softmax
from edgellama.runtime.speculate import AdaptiveK, Draft, NGramDrafter

REPEATING = [5, 6, 7, 8, 9, 10, 11] * 3 + [5, 6]  # prompt lookup finds plenty here


@pytest.fixture(scope="module", params=list(KVLayout), ids=lambda k: k.value)
def tiny(request, tmp_path_factory):
    from conftest import tiny_model_of_layout

    return tiny_model_of_layout(tmp_path_factory, request.param, max_position_embeddings=64)


def ids_of(gen) -> list[int]:
    return [s.token_id for s in gen if s.token_id is not None]


@pytest.mark.parametrize("kind", ["ngram", "draft"])
def test_greedy_text_is_the_plain_text(tiny, kind, monkeypatch):
    from edgellama.runtime import decoder

    speculate = "ngram" if kind == "ngram" else Draft(tiny)
    plain = ids_of(tiny.generate(REPEATING, max_new_tokens=30, ignore_eos=True))
    gen = tiny.generate(REPEATING, max_new_tokens=30, ignore_eos=True, speculate=speculate)
    assert ids_of(gen) == plain
    assert gen.speculation.drafted > 0 and gen.speculation.forwards < 30
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 5)  # prompts and verify steps across chunk boundaries
    assert ids_of(tiny.generate(REPEATING, max_new_tokens=30, ignore_eos=True, speculate=speculate)) == plain


def test_greedy_to_the_context_end(tiny):
    prompt = REPEATING * 2  # 46 of 64 positions
    plain = tiny.generate(prompt, max_new_tokens=100, ignore_eos=True)
    spec = tiny.generate(prompt, max_new_tokens=100, ignore_eos=True, speculate=Draft(tiny), draft_tokens=16)
    assert ids_of(spec) == ids_of(plain) and len(spec.completion_ids) == 64 - len(prompt)
    assert spec.finish_reason == plain.finish_reason == "length"


def test_stops_and_eos_as_plain(tiny):
    plain = tiny.generate(REPEATING, max_new_tokens=40, ignore_eos=True)
    text = "".join(s.text for s in plain)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    a = tiny.generate(REPEATING, max_new_tokens=40, ignore_eos=True, stop=[stop])
    b = tiny.generate(REPEATING, max_new_tokens=40, ignore_eos=True, stop=[stop], speculate=Draft(tiny))
    assert "".join(s.text for s in b) == "".join(s.text for s in a) and b.finish_reason == a.finish_reason


def test_zero_draft_tokens_is_plain_decoding(tiny):
    gen = tiny.generate(REPEATING, max_new_tokens=12, ignore_eos=True, speculate="ngram", draft_tokens=0)
    assert ids_of(gen) == ids_of(tiny.generate(REPEATING, max_new_tokens=12, ignore_eos=True))
    assert gen.speculation.forwards == 0


def test_seeded_sampling_is_reproducible(tiny):
    options = dict(max_new_tokens=30, temperature=0.9, top_p=0.95, seed=7, speculate=Draft(tiny))
    assert tiny.generate_text(REPEATING, **options) == tiny.generate_text(REPEATING, **options)


def test_chat_turns_with_speculation(tiny):
    plain = tiny.chat(max_new_tokens=6, ignore_eos=True)
    spec = tiny.chat(max_new_tokens=6, ignore_eos=True, speculate="ngram")
    for text in ("fox", "dog"):
        assert spec.send(text) == plain.send(text)


def test_a_chats_draft_model_keeps_its_cache_across_turns(tiny):
    """The draft model, like the target, prefills only each turn's new tokens; the replies
    are the plain chat's."""
    plain = tiny.chat(max_new_tokens=8, ignore_eos=True)
    spec = tiny.chat(max_new_tokens=8, ignore_eos=True, speculate=Draft(tiny), draft_tokens=4)
    assert spec.send("fox") == plain.send("fox")
    drafter = spec._drafter
    prefilled, prefill = [], drafter.decoder.prefill
    drafter.decoder.prefill = lambda ids: (prefilled.append(len(ids)), prefill(ids))[1]
    for text in ("dog", "the lazy"):
        assert spec.send(text) == plain.send(text)
    assert spec._drafter is drafter
    history = len(tiny.render_chat(spec.messages[:-2]))  # what turn 3 started from
    # a fresh draft model would prefill all `history` tokens in turn 3; this one only what it has not seen
    assert prefilled and max(prefilled) < history, (prefilled, history)


# ---- the sampling rule --------------------------------------------------------------------------

def _chi_square_critical(df: int, z: float = 3.09) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6),
                                    dict(temperature=1.2, top_p=0.9, min_p=0.02)], ids=str)
@pytest.mark.parametrize("draft", [0, 3, 11])  # the likeliest token, a middling one, one the filters drop
def test_verify_draws_from_the_model_distribution(params, draft):
    """Sampler.verify(draft) is distributed as a plain draw: chi-square at significance 0.001."""
    rng = np.random.default_rng(0)
    logits = np.sort(rng.normal(0, 1.5, 12))[::-1].astype(np.float32)  # token 0 likeliest
    plain = make_sampler(SamplingParams(seed=1, **params))
    history = np.zeros(0, np.int64)
    x = np.asarray(logits, np.float64)
    for process in plain.processors:
        x = process(x, history)
    expected = softmax(x)
    n = 20000
    sampler = make_sampler(SamplingParams(seed=2, **params))
    counts = np.bincount([sampler.verify(logits, history, draft)[0] for _ in range(n)], minlength=12)
    live = expected * n >= 5
    assert counts[~live].sum() <= 0.01 * n + 5
    chi2 = (((counts[live] - n * expected[live]) ** 2) / (n * expected[live])).sum()
    assert chi2 < _chi_square_critical(int(live.sum()) - 1), (counts, n * expected)


def test_greedy_verify_accepts_only_the_argmax():
    sampler = make_sampler(SamplingParams())
    logits = np.array([0.1, 3.0, 0.2], np.float32)
    assert sampler.verify(logits, np.zeros(0, np.int64), 1) == (1, True)
    assert sampler.verify(logits, np.zeros(0, np.int64), 2) == (1, False)


# ---- drafters and guards ------------------------------------------------------------------------

def test_ngram_drafts_the_latest_continuation():
    d = NGramDrafter(max_ngram=3, min_ngram=1)
    history = np.array([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3], np.int64)
    assert d.propose(history, 2) == [5, 6]  # "2 3" last followed by 5 6
    assert d.propose(np.array([1, 2, 3], np.int64), 4) == []


def test_adaptive_k_falls_to_plain_and_probes_again():
    k = AdaptiveK(cap=8)
    assert k.next() > 1
    for _ in range(20):
        k.update(4, 0)
    assert [k.next() for _ in range(8)][:7] == [0] * 7 and k.next() == 1  # a probe after a while


def test_draft_with_another_vocabulary_is_refused(tiny, tmp_path):
    from conftest import make_tiny

    import json

    make_tiny(tmp_path / "hf")
    export(tmp_path / "hf", tmp_path / "other")
    path = tmp_path / "other" / "tokenizer.json"
    tok = json.loads(path.read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: another vocabulary
    path.write_text(json.dumps(tok))
    with pytest.raises(BadArgumentError, match="another vocabulary"):
        tiny.generate(REPEATING, max_new_tokens=4, speculate=Draft(Model.load(tmp_path / "other")))
    r = CliRunner().invoke(main, ["run", str(tiny.folder), "--prompt", "the quick", "--speculate", "draft",
                                  "--draft-model", str(tmp_path / "other")])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "same tokenizer" in r.stderr


def test_cli_speculation_options(tiny):
    runner = CliRunner()
    plain = runner.invoke(main, ["run", str(tiny.folder), "--prompt", "the quick", "--max-new-tokens", "12"])
    spec = runner.invoke(main, ["run", str(tiny.folder), "--prompt", "the quick", "--max-new-tokens", "12",
                                "--speculate", "ngram", "--draft-tokens", "4"])
    assert plain.exit_code == spec.exit_code == 0 and spec.stdout == plain.stdout
    lonely = runner.invoke(main, ["run", str(tiny.folder), "--prompt", "x", "--draft-model", str(tiny.folder)])
    assert lonely.exit_code == 2 and "--speculate draft" in lonely.stderr


# ---- the real model ------------------------------------------------------------------------------

GROUNDED = ("Copy this text exactly:\n\nThe GNU General Public License is a free, copyleft license for software "
            "and other kinds of works. The licenses for most software and other practical works are designed "
            "to take away your freedom to share and change the works.")
OPEN = "Tell me a short story about a robot who learns to paint."


@pytest.mark.slow
@pytest.mark.parametrize("text", [GROUNDED, OPEN], ids=["grounded", "open"])
def test_real_model_fp32_greedy_text_is_the_plain_text(smollm2_onnx, text):
    model = Model.load(smollm2_onnx, threads=2)
    ids = model.render_chat([{"role": "user", "content": text}])
    plain = ids_of(model.generate(ids, max_new_tokens=96))
    assert ids_of(model.generate(ids, max_new_tokens=96, speculate="ngram")) == plain
    assert ids_of(model.generate(PROMPT_IDS, max_new_tokens=48, speculate=Draft(model))) == \
        ids_of(model.generate(PROMPT_IDS, max_new_tokens=48))


def _mean_kl_top1(reference: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """Mean KL(reference || rows) in nats and top-1 agreement, row by row."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(rows)
    kl = (np.exp(p) * (p - q)).sum(axis=-1)
    return float(kl.mean()), float((reference.argmax(-1) == rows.argmax(-1)).mean())


@pytest.mark.slow
def test_real_model_int4_speculation_agreement_and_kl(smollm2_gguf, smollm2_onnx, tmp_path, capsys):
    """At accuracy level 4 every MatMulNBits rounds its input to int8, and the ~1e-7 by which
    a forward over several tokens differs from single-token forwards now and then moves a
    value across a rounding boundary, so speculative greedy text may part from plain greedy
    text: report the token agreement, and check that the distributions speculation decided
    on (int4, 8 tokens per forward) sit as close to the float graph's as plain decoding's
    (int4, 1 per forward)."""
    from edgellama.exporter.export import ExportOptions, export
    from edgellama.buildkit.quant_options import QuantOptions
    from edgellama.runtime.decoder import Decoder

    int4_dir = tmp_path / "int4"
    export(smollm2_gguf, int4_dir, ExportOptions(quant=QuantOptions(bits=4)))
    int4, fp32 = Model.load(int4_dir, threads=2), Model.load(smollm2_onnx, threads=2)
    ids = int4.render_chat([{"role": "user", "content": GROUNDED}])
    plain = ids_of(int4.generate(ids, max_new_tokens=96, ignore_eos=True))
    spec = ids_of(int4.generate(ids, max_new_tokens=96, ignore_eos=True, speculate="ngram"))
    same_prefix = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
    positional = float(np.mean([a == b for a, b in zip(plain, spec)]))

    def rows(model, tokens, per_forward):
        d = Decoder(model, len(ids) + len(tokens) + 1)
        out = [d.prefill(ids).copy()]  # the decoder's outputs are views of buffers the next run reuses
        for start in range(0, len(tokens) - 1, per_forward):
            chunk = tokens[start:start + per_forward]
            out.extend(d.verify(chunk).copy() if per_forward > 1 else [d.decode_one(chunk[0]).copy()])
        return np.stack(out[:len(tokens)])

    kl_plain, top1_plain = _mean_kl_top1(rows(fp32, plain, 1), rows(int4, plain, 1))
    kl_spec, top1_spec = _mean_kl_top1(rows(fp32, spec, 1), rows(int4, spec, 8))
    with capsys.disabled():
        print(f"\nint4 speculation vs plain greedy: identical prefix {same_prefix}/{len(plain)} tokens, "
              f"positional agreement {positional:.1%}; against fp32: plain KL {kl_plain:.4f} top-1 {top1_plain:.1%}, "
              f"speculative KL {kl_spec:.4f} top-1 {top1_spec:.1%}")
    assert kl_spec <= 1.5 * kl_plain + 1e-3 and top1_spec >= top1_plain - 0.05
    assert same_prefix >= 8  # the two part, if at all, only after a while


@pytest.mark.slow
def test_real_model_int4_at_accuracy_level_0_speculates_the_plain_text(smollm2_gguf, tmp_path):
    """README's promise for exact int4 speculation: with float compute (--accuracy-level 0)
    nothing rounds to int8, and greedy speculative text is the plain text, token for token."""
    from edgellama.exporter.export import ExportOptions, export
    from edgellama.buildkit.quant_options import QuantOptions

    folder = tmp_path / "int4"
    export(smollm2_gguf, folder, ExportOptions(quant=QuantOptions(bits=4, accuracy_level=0)))
    model = Model.load(folder, threads=2)
    for text in (GROUNDED, OPEN):
        ids = model.render_chat([{"role": "user", "content": text}])
        plain = ids_of(model.generate(ids, max_new_tokens=64))
        gen = model.generate(ids, max_new_tokens=64, speculate="ngram")
        assert ids_of(gen) == plain
    assert gen.speculation.drafted > 0  # drafts were checked, not skipped
