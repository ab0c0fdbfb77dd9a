"""Multi-round chat on a real vLLM engine (CPU): hit tokens and TTFT per turn, with and without lmtier.

A conversation of ``--turns`` turns (the first user message a long document, then short
questions; every reply ``--reply`` tokens) runs on three fresh in-process engines, one after the
other, vLLM's own prefix cache off:

* ``baseline``: no connector (every turn prefills the whole history);
* ``prompts``: lmtier with ``save_replies: false`` (only prompts are stored: a turn hits the
  previous turn's prompt, never its reply);
* ``replies``: lmtier with ``save_replies: true`` (the default: a turn hits through the reply).

Each turn's prompt is built two ways (``--mode``):

* ``ids``: the previous prompt's ids + the reply's generated ids + the new message's templated ids
  (what a frontend that keeps token ids sends);
* ``text``: the whole history rendered with the chat template and tokenized again (what an
  OpenAI-style chat frontend sends: the reply's text is re-tokenized, which may give other ids
  than those generated, and the hit stops at the first difference).

TTFT is vLLM's first-token latency of the turn's request (offline engine stats); every engine
runs an untimed warm-up conversation of the same shape first. The chat template is a plain
ChatML-like template (the tiny model has none). Nothing is asserted.

    python benchmarks/vllm_chat.py [--turns 5] [--doc 1500] [--reply 64] [--mode both] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import fmt_ratio, machine_line, median, print_table

_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_LOGGING_LEVEL": "ERROR",
}
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


class Chat:
    """One conversation's state in both prompt forms."""

    def __init__(self, tok: Any, doc: str, questions: list[str], mode: str) -> None:
        self.tok, self.mode = tok, mode
        self.messages: list[dict[str, str]] = []
        self.ids: list[int] = []
        self.first, self.questions = doc, questions

    def _templated(self, messages: list[dict[str, str]], generation: bool) -> list[int]:
        ids: list[int] = self.tok.apply_chat_template(messages, chat_template=TEMPLATE, tokenize=True,
                                                       add_generation_prompt=generation)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # a BatchEncoding
            ids = list(ids["input_ids"])
        return list(ids)

    def prompt(self, turn: int) -> list[int]:
        msg = {"role": "user", "content": self.first if turn == 0 else self.questions[turn - 1]}
        self.messages.append(msg)
        if self.mode == "text":
            return self._templated(self.messages, True)
        # ids: what was sent and generated so far, then only the new message's own template ids
        self.ids += self._templated([msg], True)
        return list(self.ids)

    def reply(self, prompt: list[int], generated: list[int]) -> None:
        text = self.tok.decode(generated, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": text})
        if self.mode == "ids":
            self.ids = [*prompt, *generated, *self.tok.encode("</s>\n", add_special_tokens=False)]


def _words(rng: random.Random, n: int) -> str:
    syll = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "va", "chi", "zu"]
    return " ".join("".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(n))


def _conversation(tok: Any, seed: int, doc_tokens: int, turns: int, mode: str) -> Chat:
    rng = random.Random(seed)
    doc = _words(rng, doc_tokens)
    while len(tok.encode(doc, add_special_tokens=False)) > doc_tokens:
        doc = doc.rsplit(" ", 20)[0]
    return Chat(tok, doc, [_words(rng, 30) for _ in range(turns - 1)], mode)


def _engine(model: str, max_len: int, lmtier: dict[str, Any] | None) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    kwargs: dict[str, Any] = {}
    if lmtier is not None:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMTierConnector", kv_connector_module_path="lmtier.integrations.vllm",
            kv_role="kv_both", kv_load_failure_policy="recompute", kv_connector_extra_config=lmtier)
    return LLM(model=model, dtype="bfloat16", max_model_len=max_len, seed=0, enforce_eager=True,
               enable_prefix_caching=False, disable_log_stats=False, use_tqdm_on_load=False, **kwargs)


def _run(llm: Any, chat: Chat, turns: int, reply: int) -> list[tuple[int, int, float]]:
    """(prompt tokens, cached tokens, TTFT s) per turn."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=reply, min_tokens=reply, temperature=0.0)
    out = []
    for turn in range(turns):
        prompt = chat.prompt(turn)
        (res,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        chat.reply(prompt, list(res.outputs[0].token_ids))
        ttft = float(res.metrics.first_token_latency) if res.metrics is not None else float("nan")
        out.append((len(prompt), int(res.num_cached_tokens or 0), ttft))
        _settle(llm)
    return out


def _settle(llm: Any) -> None:
    """Run the engine until the finished request's end-of-request save is done and in the tiers."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    for _ in range(10):
        if not scheduler.has_requests():
            break
        engine.step()
    if scheduler.connector is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        lm = getattr(get_kv_transfer_group(), "engine", None)
        if lm is not None:
            lm.flush()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--doc", type=int, default=1500, help="tokens of the first user message (default 1500)")
    p.add_argument("--reply", type=int, default=64, help="tokens generated per turn (default 64)")
    p.add_argument("--mode", choices=["ids", "text", "both"], default="both")
    p.add_argument("--repeats", type=int, default=3, help="conversations per engine (default 3), medians")
    p.add_argument("--preset", default="demo")
    args = p.parse_args(argv)
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    import logging
    import warnings

    logging.getLogger("lmtier").setLevel(logging.WARNING)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"vllm(\.|$)")
    from transformers import AutoTokenizer

    from lmtier.demo import TINY_PRESETS, build_tiny_llama

    model = str(build_tiny_llama(TINY_PRESETS[args.preset]))
    tok = AutoTokenizer.from_pretrained(model)
    modes = ["ids", "text"] if args.mode == "both" else [args.mode]
    max_len = args.doc + args.turns * (args.reply + 120) + 256
    import vllm

    print(f"# vLLM {vllm.__version__} (CPU, in-process) + lmtier; {machine_line()}")
    print(f"# tiny Llama preset {args.preset!r}; {args.turns} turns: a {args.doc}-token document, then "
          f"30-word questions; {args.reply}-token replies; vLLM prefix cache off; tiers cpu -> disk; "
          f"{args.repeats} conversations per engine, medians")
    with tempfile.TemporaryDirectory(prefix="lmtier-vllm-chat-") as tmp:
        def tiers(save_replies: bool, sub: str) -> dict[str, Any]:
            return {"chunk_tokens": 256, "save_replies": save_replies, "tiers": [
                {"name": "hot", "backend": "cpu", "options": {"max_bytes": "1GiB"}},
                {"name": "local", "backend": "disk", "options": {"root": str(Path(tmp) / sub)}}]}

        variants = {"baseline": None, "prompts": tiers(False, "p"), "replies": tiers(True, "r")}
        results: dict[tuple[str, str], list[list[tuple[int, int, float]]]] = {}
        for name, extra in variants.items():
            t0 = time.perf_counter()
            llm = _engine(model, max_len, extra)
            try:
                for m, mode in enumerate(modes):  # each mode its own conversations: no hits across modes
                    seed = 1000 * (m + 1)
                    _run(llm, _conversation(tok, seed - 1, args.doc, args.turns, mode), args.turns, args.reply)  # warm-up
                    results[(name, mode)] = [
                        _run(llm, _conversation(tok, seed + r, args.doc, args.turns, mode), args.turns, args.reply)
                        for r in range(args.repeats)]
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
                gc.collect()
            print(f"-- {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    for mode in modes:
        rows = []
        for turn in range(args.turns):
            def cell(name: str, i: int, turn: int = turn, mode: str = mode) -> float:
                return median([conv[turn][i] for conv in results[(name, mode)]])

            base, prm, rep = cell("baseline", 2), cell("prompts", 2), cell("replies", 2)
            rows.append([turn + 1, int(cell("baseline", 0)), int(cell("prompts", 1)), int(cell("replies", 1)),
                         f"{base * 1e3:.1f}", f"{prm * 1e3:.1f}", f"{rep * 1e3:.1f}",
                         fmt_ratio(prm / base), fmt_ratio(rep / base)])
        print()
        print_table(["turn", "prompt tokens", "hit (prompts)", "hit (replies)", "TTFT base ms",
                     "TTFT prompts ms", "TTFT replies ms", "prompts/base", "replies/base"], rows,
                    title=f"mode {mode}: {'ids kept' if mode == 'ids' else 'history re-rendered and re-tokenized'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
