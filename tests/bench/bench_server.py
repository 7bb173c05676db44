"""Server cache benchmark: time to the first token for the same long conversation when it is
prefilled from scratch, continued from the live state, and restored from disk after a restart.

    python tests/bench/bench_server.py [--model DIR] [--tokens 2000] [--out bench_server.csv]

Without --model it uses the tiny real-vocabulary test model (CPU numbers, for the ratios, not
the absolute times). Prints one line per case and writes a CSV (case, prompt tokens, cached
tokens, seconds to the first streamed token, seconds for the whole request).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ helpers

import openai  # noqa: E402
from conftest import real_tokenizer_path  # noqa: E402
from ds4_agent.agent.server_cache import CachePolicy  # noqa: E402
from ds4_agent.agent.server_runtime import BackgroundServer, build_server  # noqa: E402
from ds4_agent.engine.generate import Engine  # noqa: E402
from ds4_agent.engine.tokenizer import Tokenizer  # noqa: E402
from tiny_model import REAL_VOCAB, build_tiny_model  # noqa: E402

NAME = "bench"


def timed(url: str, messages: list[dict]) -> tuple[float, float, int, int, str]:
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=3600)
    t0 = time.perf_counter()
    first = None
    usage = None
    text = ""
    stream = c.chat.completions.create(
        model=NAME,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=2,
        temperature=0,
        extra_body={"thinking": {"type": "disabled"}},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - t0
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    total = time.perf_counter() - t0
    cached = usage.prompt_tokens_details.cached_tokens
    return first or total, total, usage.prompt_tokens, cached, text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="model directory (default: tiny test model)")
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the model's, else the test one)")
    ap.add_argument("--tokens", type=int, default=2000, help="approximate prompt length")
    ap.add_argument("--out", default="bench_server.csv")
    args = ap.parse_args()

    model_dir = Path(args.model) if args.model else build_tiny_model("window", vocab=REAL_VOCAB)
    tok_path = args.tokenizer or (
        model_dir if (model_dir / "tokenizer.json").is_file() else real_tokenizer_path()
    )
    engine = Engine.load(model_dir)
    tok = Tokenizer.from_file(tok_path)
    words = " ".join(f"item{i}" for i in range(args.tokens // 3))
    system = {"role": "system", "content": f"Reference material follows.\n{words}"}
    turn1 = [system, {"role": "user", "content": "Summarise the material."}]
    rows = []
    with tempfile.TemporaryDirectory() as kv:

        def server() -> BackgroundServer:
            return BackgroundServer(
                build_server(
                    engine,
                    tok,
                    model_name=NAME,
                    ctx=args.tokens * 4 + 4096,
                    kv_disk_dir=Path(kv),
                    policy=CachePolicy(min_snapshot_tokens=64),
                )
            )

        with server() as srv:
            r1 = timed(srv.url, turn1)
            rows.append(("cold prefill", *r1[:4]))
            turn2 = [*turn1, {"role": "assistant", "content": r1[4]}]
            turn2.append({"role": "user", "content": "More."})
            r2 = timed(srv.url, turn2)
            rows.append(("next turn, live state", *r2[:4]))
        with server() as srv:  # a restart: nothing live, the shutdown snapshot is on disk
            turn3 = [*turn2, {"role": "assistant", "content": r2[4]}]
            turn3.append({"role": "user", "content": "Again."})
            rows.append(("after restart, from disk", *timed(srv.url, turn3)[:4]))
    print(f"{'case':<28}{'prompt':>8}{'cached':>8}{'first token s':>15}{'total s':>10}")
    for name, first, total, prompt, cached in rows:
        print(f"{name:<28}{prompt:>8}{cached:>8}{first:>15.3f}{total:>10.3f}")
    with open(args.out, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "prompt_tokens", "cached_tokens", "first_token_s", "total_s"])
        for name, first, total, prompt, cached in rows:
            w.writerow([name, prompt, cached, f"{first:.4f}", f"{total:.4f}"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
