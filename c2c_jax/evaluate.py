"""Multiple-choice evaluation: receiver, sharer, text-to-text and C2C side by side on the same items.

    python -m c2c_jax.evaluate --config=configs/qwen.py --config.eval.fuser=PATH [--workdir=DIR]

Everything is driven by `config.eval` (see `c2c_jax/config.py`); `evaluate(config, workdir)` does the
work and returns the summary, so notebooks and tests call it directly. Protocol (c2c_reference.md §5):

* methods (`eval.methods`, comma-separated):
    receiver  the receiver alone;
    sharer    the sharer alone, with its own tokenizer and chat template;
    t2t       text-to-text (§5.8): the sharer writes background for the question (no options), greedy,
              `eval.t2t_message_tokens` new tokens (default: upstream's 1024 in generate mode, 64 in logits
              mode); the receiver then answers the chat
              [user: background prompt, assistant: sharer's text, user: full MC prompt];
    c2c       receiver + sharer(s) + fuser(s). `eval.fuser` may list several fuser directories
              (comma-separated); `eval.sharers` then lists one sharer model per fuser (default:
              `config.sharer.path` for each). Several fusers are applied sequentially.
* answer modes (`eval.answer_mode`):
    generate  the MC prompt as one user message, chat template with the generation prompt and thinking
              off, greedy `eval.max_new_tokens`, then `benchmarks.extract_answer`;
    logits    (§5.4) the answer prefix "The correct answer is" is appended as an open assistant turn;
              everything before it is fused; the prediction is the argmax of the option letters'
              logits (" A", " B", ...: first token id, leading space) at the last position.
* items whose prompt does not fit a model's context are skipped for every method (so all methods are
  scored on the same items), with the reason; so are the benchmark's own unscorable items.
* latency: batch size 1, device-synchronised, on the first `eval.latency_items` scored items of each
  benchmark, each measured after an identical warm-up call (compilation excluded). TTFT = prefill
  through the first answer token's logits; total = the whole answer. Text-to-text counts both stages
  and the detokenise/re-tokenise step between them.

Outputs (under `eval.output_dir`, default `<workdir>/eval`): `<benchmark>.csv` (one row per item and
method), `summary.json`, `results.md` (rows = methods, columns = benchmarks, like the paper's main
table), `accuracy.png` and `latency.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np

from c2c_jax.benchmarks import ANSWER_PREFIX, BENCHMARKS, LETTERS, Benchmark, MCItem, build_mc_prompt, \
    extract_answer, load_benchmark
from c2c_jax.benchmarks import T2T_BACKGROUND_PROMPT as BACKGROUND_PROMPT
from c2c_jax.pipeline import C2CModel, EncodedPrompt, Generator, PromptBatch, PromptEncoder, SamplingConfig

logger = logging.getLogger(__name__)

METHODS = ("receiver", "sharer", "t2t", "c2c")
METHOD_LABELS = {"receiver": "Receiver", "sharer": "Sharer", "t2t": "Text-to-Text", "c2c": "C2C"}
ANSWER_MODES = ("generate", "logits")
# Upstream's text-to-text message budget (new sharer tokens) per answer mode, `eval.t2t_message_tokens=0`.
T2T_MESSAGE_TOKENS = {"generate": 1024, "logits": 64}
# The reference evaluator's default stage-1 prompt (rosetta/baseline/multi_stage.py, TwoStageInference).

CSV_FIELDS = ("id", "subject", "method", "gold", "prediction", "correct", "generated_text", "message",
              "prompt_tokens", "output_tokens", "ttft_ms", "latency_ms", "option_logits")


# ------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`config.eval`, parsed and validated (no model or data is touched)."""

    benchmarks: tuple[str, ...]
    sources: tuple[str, ...]  # one per benchmark
    methods: tuple[str, ...]
    answer_mode: str
    limit: int | None
    batch_size: int
    max_new_tokens: int
    t2t_message_tokens: int
    use_cot: bool
    latency_items: int
    fusers: tuple[str, ...]
    sharers: tuple[str, ...]  # sharer model paths: one per fuser, or just the default sharer
    background_prompt: str
    output_dir: Path


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_settings(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> EvalSettings:
    """Validates `config.eval`; raises ValueError with the valid choices on any bad field."""
    e = config.eval
    benchmarks = _split(e.benchmarks)
    if not benchmarks:
        raise ValueError(f"eval.benchmarks is empty; choose from {', '.join(BENCHMARKS)}")
    unknown = [b for b in benchmarks if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)} in eval.benchmarks; "
                         f"valid: {', '.join(BENCHMARKS)}")
    if len(set(benchmarks)) != len(benchmarks):
        raise ValueError(f"eval.benchmarks lists a benchmark twice: {','.join(benchmarks)}")
    methods = _split(e.methods)
    if not methods:
        raise ValueError(f"eval.methods is empty; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} in eval.methods; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"eval.methods lists a method twice: {','.join(methods)}")
    if e.answer_mode not in ANSWER_MODES:
        raise ValueError(f"unknown eval.answer_mode {e.answer_mode!r}; valid: {', '.join(ANSWER_MODES)}")
    sources = _split(e.source) or ["offline"]
    if len(sources) == 1:
        sources = sources * len(benchmarks)
    elif len(sources) != len(benchmarks):
        raise ValueError(f"eval.source lists {len(sources)} sources for {len(benchmarks)} benchmarks; give one "
                         "source for all, or one per benchmark (comma-separated, in the same order)")
    fusers = _split(e.fuser)
    sharers = _split(e.sharers)
    if "c2c" in methods and not fusers:
        raise ValueError("method 'c2c' needs a trained fuser: set eval.fuser to a fuser directory (c2c_jax format "
                         "or the upstream projector_*.pt layout), or drop 'c2c' from eval.methods")
    if sharers and fusers and len(sharers) != len(fusers):
        raise ValueError(f"eval.sharers lists {len(sharers)} sharer model(s) for {len(fusers)} fuser(s) in "
                         "eval.fuser; give one sharer per fuser, in the same order")
    if not sharers:
        sharers = [config.sharer.path] * max(1, len(fusers))
    for name in ("batch_size", "max_new_tokens"):
        if int(e[name]) < 1:
            raise ValueError(f"eval.{name} must be >= 1, got {e[name]}")
    t2t_message_tokens = int(e.t2t_message_tokens) or T2T_MESSAGE_TOKENS[e.answer_mode]
    if t2t_message_tokens < 1:
        raise ValueError(f"eval.t2t_message_tokens must be >= 1 (or 0: upstream's budget for the answer mode, "
                         f"{T2T_MESSAGE_TOKENS}), got {e.t2t_message_tokens}")
    latency_items = int(e.latency_items)
    if latency_items < 0:
        raise ValueError(f"eval.latency_items must be >= 0, got {latency_items}")
    if int(e.limit) < 0:
        raise ValueError(f"eval.limit must be >= 0 (0 = all items), got {e.limit}")
    background_prompt = e.background_prompt
    if "{question}" not in background_prompt:
        raise ValueError("eval.background_prompt must contain '{question}'")
    if e.output_dir:
        output_dir = Path(e.output_dir)
    elif workdir:
        output_dir = Path(workdir) / "eval"
    else:
        raise ValueError("no output directory: pass a workdir (--workdir) or set eval.output_dir")
    return EvalSettings(
        benchmarks=tuple(benchmarks), sources=tuple(sources), methods=tuple(methods), answer_mode=e.answer_mode,
        limit=int(e.limit) or None, batch_size=int(e.batch_size), max_new_tokens=int(e.max_new_tokens),
        t2t_message_tokens=t2t_message_tokens, use_cot=bool(e.use_cot), latency_items=latency_items,
        fusers=tuple(fusers), sharers=tuple(sharers), background_prompt=background_prompt,
        output_dir=output_dir.expanduser())


# ------------------------------------------------------------------------------------------------
# Prompts.


def mc_messages(item: MCItem, *, use_cot: bool = False) -> list[dict]:
    """The MC prompt as a single user message (c2c_reference.md §5.3)."""
    return [{"role": "user", "content": build_mc_prompt(item, use_cot=use_cot)}]


def background_messages(item: MCItem, background_prompt: str = BACKGROUND_PROMPT) -> list[dict]:
    """Text-to-text stage 1: the sharer is asked for background on the question, without the options."""
    return [{"role": "user", "content": background_prompt.format(question=item.question)}]


def t2t_messages(item: MCItem, message: str, *, background_prompt: str = BACKGROUND_PROMPT,
                 use_cot: bool = False) -> list[dict]:
    """Text-to-text stage 2: [user: background prompt, assistant: the sharer's text, user: MC prompt]."""
    return (background_messages(item, background_prompt) + [{"role": "assistant", "content": message}]
            + mc_messages(item, use_cot=use_cot))


def option_token_ids(tokenizer, num_options: int) -> list[int]:
    """Token ids scored for the option letters: the first token of " A", " B", ... (the reference).

    Tokenizers that split off the space (byte-level vocabularies without merges) would give every
    letter the same id; those fall back to the first token of the bare letter "A", "B", ...
    """
    for fmt in (" {}", "{}"):
        ids = []
        for letter in LETTERS[:num_options]:
            encoded = tokenizer(fmt.format(letter), add_special_tokens=False)["input_ids"]
            ids.append(int(encoded[0]) if encoded else -1)
        if -1 not in ids and len(set(ids)) == num_options:
            if fmt == "{}":
                logger.warning("the tokenizer has no distinct first tokens for ' A', ' B', ...; scoring the bare "
                               "letters 'A', 'B', ... instead")
            return ids
    raise ValueError(f"the tokenizer has no distinct tokens for the {num_options} option letters")


@dataclasses.dataclass(frozen=True)
class Prompt:
    """An encoded prompt and the number of trailing columns that run after fusion."""

    encoded: EncodedPrompt
    suffix: int  # 1 in generate mode; the answer prefix's columns in logits mode

    @property
    def width(self) -> int:
        return len(self.encoded.tokens)

    @property
    def num_tokens(self) -> int:
        return int(np.sum(self.encoded.valid))


def _answer_prefix_columns(encoded: EncodedPrompt, tokenizer) -> int:
    """Trailing columns whose receiver tokens spell the answer prefix (at least)."""
    ids: list[int] = []
    for n in range(1, len(encoded.tokens)):
        column = len(encoded.tokens) - n
        if encoded.valid[column]:
            ids.insert(0, int(encoded.tokens[column]))
            if ANSWER_PREFIX in tokenizer.decode(ids):
                return n
    raise ValueError(f"the encoded prompt does not end with the answer prefix {ANSWER_PREFIX!r} (or has nothing "
                     "before it); does the chat template drop a continued assistant message?")


# ------------------------------------------------------------------------------------------------
# Routes: one Generator used one way (receiver-only, sharer-only, or fused).


def _timed(fn: Callable):
    """(result, seconds), the result's device computation included."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


class Route:
    """A `Generator` used with one `fuse` setting, with its context limit and option-letter ids."""

    def __init__(self, name: str, generator: Generator, *, fuse: bool, context: int):
        self.name = name
        self.generator = generator
        self.fuse = fuse
        self.context = context
        self._letter_ids: dict[int, list[int]] = {}

    @property
    def tokenizer(self):
        return self.generator.encoder.receiver_tokenizer

    def letter_ids(self, num_options: int) -> list[int]:
        if num_options not in self._letter_ids:
            self._letter_ids[num_options] = option_token_ids(self.tokenizer, num_options)
        return self._letter_ids[num_options]

    def encode(self, messages: list[dict], answer_mode: str) -> Prompt:
        encoder = self.generator.encoder
        if answer_mode == "logits":
            encoded = encoder.encode_chat(messages + [{"role": "assistant", "content": ANSWER_PREFIX}],
                                          add_generation_prompt=False, continue_final_message=True)
            return Prompt(encoded, _answer_prefix_columns(encoded, self.tokenizer))
        return Prompt(encoder.encode_chat(messages), 1)

    def too_long(self, prompt: Prompt, new_tokens: int) -> str | None:
        """Why `prompt` plus `new_tokens` does not fit this route's context, or None."""
        if prompt.width + new_tokens > self.context:
            extra = f" + {new_tokens} new tokens" if new_tokens else ""
            return (f"{self.name}: prompt of {prompt.width} tokens{extra} exceeds the context of "
                    f"{self.context} tokens")
        return None

    def batch(self, prompts: Sequence[Prompt], new_tokens: int) -> PromptBatch:
        """Left-padded to a multiple of the encoder's `pad_to` (buckets limit recompilation), within context."""
        pad_to = self.generator.encoder.pad_to
        longest = max(p.width for p in prompts)
        width = min(-(-longest // pad_to) * pad_to, self.context - new_tokens)
        return self.generator.encoder.batch([p.encoded for p in prompts], width=width)

    @staticmethod
    def _chunks(prompts: Sequence[Prompt], batch_size: int):
        """Index lists of at most `batch_size` prompts of similar width (and equal suffix)."""
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i].suffix, prompts[i].width))
        chunk: list[int] = []
        for i in order:
            if chunk and (len(chunk) == batch_size or prompts[chunk[0]].suffix != prompts[i].suffix):
                yield chunk
                chunk = []
            chunk.append(i)
        if chunk:
            yield chunk

    @staticmethod
    def _filled(group: list[Prompt], size: int) -> list[Prompt]:
        # A short last batch is filled with copies so every batch has one shape (one compilation).
        return group + [group[-1]] * (size - len(group))

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int, progress=None
                 ) -> list[tuple[str, int]]:
        """(text, new tokens) per prompt: greedy, batched."""
        sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        size = min(batch_size, len(prompts))
        out: list[tuple[str, int] | None] = [None] * len(prompts)
        for chunk in self._chunks(prompts, batch_size):
            batch = self.batch(self._filled([prompts[i] for i in chunk], size), max_new_tokens)
            generation = jax.device_get(self.generator.generate_batch(batch, sampling, fuse=self.fuse))
            for row, i in enumerate(chunk):
                out[i] = (self.decode(generation.tokens[row, : generation.lengths[row]]), int(generation.lengths[row]))
            if progress is not None:
                progress.update(len(chunk))
        return out

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids), skip_special_tokens=True).strip()

    def score(self, prompts: Sequence[Prompt], num_options: int, batch_size: int, progress=None) -> np.ndarray:
        """float32 [prompts, num_options]: option-letter logits after each prompt's answer prefix."""
        ids = np.asarray(self.letter_ids(num_options))
        size = min(batch_size, len(prompts))
        out = np.zeros((len(prompts), num_options), np.float32)
        for chunk in self._chunks(prompts, batch_size):
            group = [prompts[i] for i in chunk]
            batch = self.batch(self._filled(group, size), 0)
            logits = self.generator.next_token_logits(batch, fuse=self.fuse, suffix_length=group[0].suffix)
            out[chunk] = np.asarray(jax.device_get(logits))[: len(chunk), ids]
            if progress is not None:
                progress.update(len(chunk))
        return out

    # Batch-1 latency pieces (seconds). The caller warms up by running the same measurement twice.

    def time_first_token(self, prompt: Prompt) -> float:
        batch = jax.block_until_ready(self.batch([prompt], 0))
        return _timed(lambda: self.generator.next_token_logits(batch, fuse=self.fuse, suffix_length=prompt.suffix))[1]

    def time_generate(self, prompt: Prompt, max_new_tokens: int) -> tuple[float, float]:
        """(time to first token, total) of a greedy generation."""
        batch = jax.block_until_ready(self.batch([prompt], max_new_tokens))
        ttft = _timed(lambda: self.generator.next_token_logits(batch, fuse=self.fuse, suffix_length=1))[1]
        sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        total = _timed(lambda: self.generator.generate_batch(batch, sampling, fuse=self.fuse))[1]
        return ttft, total


# ------------------------------------------------------------------------------------------------
# Methods.


@dataclasses.dataclass
class ItemResult:
    id: str
    subject: str
    method: str
    gold: str
    prediction: str | None
    correct: bool
    generated_text: str = ""
    message: str = ""  # text-to-text: the sharer's background text
    prompt_tokens: int = 0  # tokens of the prompt the answering model read
    output_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float | None = None
    option_logits: list[float] | None = None

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["prediction"] = self.prediction or ""
        d["correct"] = int(self.correct)
        d["ttft_ms"] = "" if self.ttft_ms is None else f"{self.ttft_ms:.3f}"
        d["latency_ms"] = "" if self.latency_ms is None else f"{self.latency_ms:.3f}"
        d["option_logits"] = "" if self.option_logits is None else json.dumps([round(x, 5) for x in self.option_logits])
        return d


def _answer(method: str, item: MCItem, prompt: Prompt, *, text: str = "", new_tokens: int = 0,
            scores: np.ndarray | None = None, message: str = "") -> ItemResult:
    n = len(item.choices)
    if scores is not None:
        prediction = LETTERS[int(np.argmax(scores[:n]))]
        logits = [float(x) for x in scores[:n]]
    else:
        prediction, logits = extract_answer(text, num_choices=n), None
    return ItemResult(id=item.id, subject=item.subject, method=method, gold=item.answer, prediction=prediction,
                      correct=prediction == item.answer, generated_text=text, message=message,
                      prompt_tokens=prompt.num_tokens, output_tokens=new_tokens, option_logits=logits)


class SingleModel:
    """receiver, sharer or c2c: one route answers the MC prompt."""

    def __init__(self, method: str, route: Route, settings: EvalSettings):
        self.method, self.route, self.settings = method, route, settings

    def _new_tokens(self) -> int:
        return self.settings.max_new_tokens if self.settings.answer_mode == "generate" else 0

    def prepare(self, item: MCItem) -> Prompt:
        return self.route.encode(mc_messages(item, use_cot=self.settings.use_cot), self.settings.answer_mode)

    def too_long(self, prepared: Prompt) -> str | None:
        return self.route.too_long(prepared, self._new_tokens())

    def run(self, items: Sequence[MCItem], prepared: Sequence[Prompt], progress=None
            ) -> tuple[list[ItemResult], list[tuple[str, str]]]:
        s = self.settings
        if s.answer_mode == "logits":
            num_options = max(len(it.choices) for it in items)
            scores = self.route.score(prepared, num_options, s.batch_size, progress)
            return [_answer(self.method, it, p, scores=sc) for it, p, sc in zip(items, prepared, scores)], []
        outputs = self.route.generate(prepared, s.max_new_tokens, s.batch_size, progress)
        return [_answer(self.method, it, p, text=text, new_tokens=n)
                for it, p, (text, n) in zip(items, prepared, outputs)], []

    def measure(self, item: MCItem, prepared: Prompt) -> tuple[float, float] | None:
        if self.settings.answer_mode == "logits":
            t = self.route.time_first_token(prepared)
            return t, t
        return self.route.time_generate(prepared, self.settings.max_new_tokens)


class TextToText:
    """t2t (c2c_reference.md §5.8): the sharer writes background text, the receiver answers with it."""

    method = "t2t"

    def __init__(self, sharer: Route, receiver: Route, settings: EvalSettings):
        self.sharer, self.receiver, self.settings = sharer, receiver, settings

    def _new_tokens(self) -> int:
        return self.settings.max_new_tokens if self.settings.answer_mode == "generate" else 0

    def prepare(self, item: MCItem) -> Prompt:
        return self.sharer.encode(background_messages(item, self.settings.background_prompt), "generate")

    def too_long(self, prepared: Prompt) -> str | None:
        return self.sharer.too_long(prepared, self.settings.t2t_message_tokens)

    def stage2(self, item: MCItem, message: str) -> Prompt:
        s = self.settings
        return self.receiver.encode(t2t_messages(item, message, background_prompt=s.background_prompt,
                                                 use_cot=s.use_cot), s.answer_mode)

    def run(self, items: Sequence[MCItem], prepared: Sequence[Prompt], progress=None
            ) -> tuple[list[ItemResult], list[tuple[str, str]]]:
        s = self.settings
        messages = [text for text, _ in self.sharer.generate(prepared, s.t2t_message_tokens, s.batch_size)]
        second = [self.stage2(it, m) for it, m in zip(items, messages)]
        keep, skipped = [], []
        for i, (it, p) in enumerate(zip(items, second)):
            reason = self.receiver.too_long(p, self._new_tokens())
            if reason:
                skipped.append((it.id, "t2t stage 2 " + reason))
                if progress is not None:
                    progress.update(1)
            else:
                keep.append(i)
        kept_prompts = [second[i] for i in keep]
        results: list[ItemResult] = []
        if not keep:
            return results, skipped
        if s.answer_mode == "logits":
            num_options = max(len(items[i].choices) for i in keep)
            scores = self.receiver.score(kept_prompts, num_options, s.batch_size, progress)
            for i, sc in zip(keep, scores):
                results.append(_answer(self.method, items[i], second[i], scores=sc, message=messages[i]))
        else:
            outputs = self.receiver.generate(kept_prompts, s.max_new_tokens, s.batch_size, progress)
            for i, (text, n) in zip(keep, outputs):
                results.append(_answer(self.method, items[i], second[i], text=text, new_tokens=n,
                                       message=messages[i]))
        return results, skipped

    def measure(self, item: MCItem, prepared: Prompt) -> tuple[float, float] | None:
        s = self.settings
        sampling = SamplingConfig(max_new_tokens=s.t2t_message_tokens)
        batch = jax.block_until_ready(self.sharer.batch([prepared], s.t2t_message_tokens))
        generation, stage1 = _timed(lambda: self.sharer.generator.generate_batch(batch, sampling, fuse=False))
        # The hand-over (detokenise, re-template, re-tokenise, upload) is part of text-to-text's cost.
        start = time.perf_counter()
        generation = jax.device_get(generation)
        message = self.sharer.decode(generation.tokens[0, : generation.lengths[0]])
        second = self.stage2(item, message)
        if self.receiver.too_long(second, self._new_tokens()):
            return None
        jax.block_until_ready(self.receiver.batch([second], self._new_tokens()))
        handover = time.perf_counter() - start
        if s.answer_mode == "logits":
            t = self.receiver.time_first_token(second)
            return stage1 + handover + t, stage1 + handover + t
        ttft, total = self.receiver.time_generate(second, s.max_new_tokens)
        return stage1 + handover + ttft, stage1 + handover + total


# ------------------------------------------------------------------------------------------------
# Loading.


def _build_methods(config: ml_collections.ConfigDict, settings: EvalSettings) -> tuple[dict, dict]:
    """{method: runner} and a description of the models, loading only what the methods need."""
    from c2c_jax.build import load_frozen, prompt_encoder
    from c2c_jax.checkpoint import load_any_fuser

    methods = settings.methods
    cache: dict[tuple[str, str], tuple] = {}

    def load(path: str, dtype: str):
        if (path, dtype) not in cache:
            cache[(path, dtype)] = load_frozen(ml_collections.ConfigDict(dict(path=path, dtype=dtype)))
        return cache[(path, dtype)]

    def encoder(receiver_tok, sharer_toks=()) -> PromptEncoder:
        return prompt_encoder(config, receiver_tok, sharer_toks, enable_thinking=False)  # thinking off in eval

    def single(name: str, model, tok) -> Route:
        return Route(name, Generator(C2CModel(model), encoder(tok)), fuse=False,
                     context=model.config.max_position_embeddings)

    routes: dict[str, Route] = {}
    if {"receiver", "t2t", "c2c"} & set(methods):
        receiver, receiver_tok = load(config.receiver.path, config.receiver.dtype)
        if {"receiver", "t2t"} & set(methods):
            routes["receiver"] = single("receiver", receiver, receiver_tok)
    if {"sharer", "t2t"} & set(methods):
        sharer, sharer_tok = load(settings.sharers[0], config.sharer.dtype)
        routes["sharer"] = single("sharer", sharer, sharer_tok)
    if "c2c" in methods:
        sharers, sharer_toks, fusers = [], [], []
        for path, fuser_dir in zip(settings.sharers, settings.fusers):
            sharer, sharer_tok = load(path, config.sharer.dtype)
            # Raises FuserCheckpointError when the fuser was trained for another pair.
            fusers.append(load_any_fuser(fuser_dir, receiver.config, sharer.config))
            sharers.append(sharer)
            sharer_toks.append(sharer_tok)
        model = C2CModel(receiver, sharers, fusers, multi_sharer_mode="sequential")
        context = min(m.config.max_position_embeddings for m in [receiver, *sharers])
        routes["c2c"] = Route("c2c", Generator(model, encoder(receiver_tok, sharer_toks)), fuse=True, context=context)

    runners = {}
    for m in methods:
        if m == "t2t":
            runners[m] = TextToText(routes["sharer"], routes["receiver"], settings)
        else:
            runners[m] = SingleModel(m, routes[m], settings)
    models = {"receiver": config.receiver.path if {"receiver", "t2t", "c2c"} & set(methods) else None,
              "sharer": settings.sharers[0] if {"sharer", "t2t"} & set(methods) else None,
              "c2c_sharers": list(settings.sharers[: len(settings.fusers)]) if "c2c" in methods else [],
              "fusers": list(settings.fusers) if "c2c" in methods else []}
    return runners, models


# ------------------------------------------------------------------------------------------------
# The evaluation.


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="item", leave=False)


def evaluate_benchmark(bench: Benchmark, runners: dict, settings: EvalSettings) -> dict:
    """Runs every method on `bench`'s items; returns results, skips, latencies and run times."""
    items = list(bench.items)
    prepared = {m: [r.prepare(it) for it in items] for m, r in runners.items()}
    # An item too long for any method is skipped for all of them, so every method sees the same items.
    skipped: list[dict] = [dict(id=i, reason=reason, methods=list(runners)) for i, reason in bench.skipped]
    kept = []
    for i, it in enumerate(items):
        reasons = [why for m, r in runners.items() if (why := r.too_long(prepared[m][i]))]
        if reasons:
            skipped.append(dict(id=it.id, reason="; ".join(reasons), methods=list(runners)))
        else:
            kept.append(i)
    kept_items = [items[i] for i in kept]
    results, run_seconds = {}, {}
    for m, runner in runners.items():
        if not kept_items:
            results[m] = []
            continue
        start = time.perf_counter()
        with _progress(len(kept_items), f"{bench.name}/{m}") as bar:
            rows, extra = runner.run(kept_items, [prepared[m][i] for i in kept], bar)
        run_seconds[m] = time.perf_counter() - start
        skipped.extend(dict(id=i, reason=reason, methods=[m]) for i, reason in extra)
        # Latency at batch size 1 on the first scored items, each after a warm-up run of the same call.
        by_id = {r.id: r for r in rows}
        measured = 0
        for i in kept:
            if measured >= settings.latency_items:
                break
            if items[i].id not in by_id:
                continue
            runner.measure(items[i], prepared[m][i])  # warm-up: compiles and caches
            timing = runner.measure(items[i], prepared[m][i])
            if timing is None:
                continue
            by_id[items[i].id].ttft_ms, by_id[items[i].id].latency_ms = timing[0] * 1e3, timing[1] * 1e3
            measured += 1
        results[m] = rows
        logger.info("%s/%s: %d scored, accuracy %.4f, %.1f s", bench.name, m, len(rows),
                    np.mean([r.correct for r in rows]) if rows else float("nan"), run_seconds[m])
    return dict(results=results, skipped=skipped, run_seconds=run_seconds)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _summarise(settings: EvalSettings, models: dict, per_bench: dict, config) -> dict:
    """summary.json's content for the benchmarks in `per_bench` (those finished so far)."""
    accuracy, counts, skip_reasons, lat_bench = {}, {}, {}, {}
    for b, out in per_bench.items():
        accuracy[b], counts[b], skip_reasons[b], lat_bench[b] = {}, {}, {}, {}
        for m in settings.methods:
            rows = out["results"].get(m, [])
            skips = [s for s in out["skipped"] if m in s["methods"]]
            accuracy[b][m] = float(np.mean([r.correct for r in rows])) if rows else None
            counts[b][m] = dict(scored=len(rows), correct=int(sum(r.correct for r in rows)), skipped=len(skips),
                                unanswered=int(sum(r.prediction is None for r in rows)))
            reasons: dict[str, int] = {}
            for s in skips:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
            skip_reasons[b][m] = reasons
            timed = [r for r in rows if r.latency_ms is not None]
            lat_bench[b][m] = dict(items=len(timed), ttft_ms=_mean(r.ttft_ms for r in timed),
                                   total_ms=_mean(r.latency_ms for r in timed))
    latency = {}
    for m in settings.methods:
        timed = [r for out in per_bench.values() for r in out["results"].get(m, []) if r.latency_ms is not None]
        latency[m] = dict(items=len(timed), batch_size=1, ttft_ms=_mean(r.ttft_ms for r in timed),
                          total_ms=_mean(r.latency_ms for r in timed))
    t2t_total = latency.get("t2t", {}).get("total_ms")
    speedup = {m: (t2t_total / v["total_ms"] if t2t_total and v["total_ms"] else None) for m, v in latency.items()}
    try:
        config_dict = json.loads(config.to_json_best_effort())
    except Exception:  # noqa: BLE001 -- the summary must not fail on an exotic config value
        config_dict = str(config)
    return dict(
        benchmarks=list(per_bench), pending_benchmarks=[b for b in settings.benchmarks if b not in per_bench],
        methods=list(settings.methods), answer_mode=settings.answer_mode,
        models=models, accuracy=accuracy, counts=counts, skip_reasons=skip_reasons,
        skipped={b: out["skipped"] for b, out in per_bench.items()},
        latency=latency, latency_per_benchmark=lat_bench, speedup_vs_t2t=speedup,
        run_seconds={b: out["run_seconds"] for b, out in per_bench.items()},
        files=dict(csv={b: f"{b}.csv" for b in per_bench}, summary="summary.json", results="results.md",
                   plots=["accuracy.png", "latency.png"]),
        config=config_dict)


def _write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for rows in results.values():
            for r in rows:
                writer.writerow(r.row())


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def results_markdown(summary: dict) -> str:
    """The paper's main-table layout: rows = methods, columns = benchmarks (accuracy %), then latency."""
    benches, methods = summary["benchmarks"], summary["methods"]
    models = summary["models"]
    lines = ["# C2C evaluation", ""]
    desc = [f"answer mode `{summary['answer_mode']}`"]
    if models.get("receiver"):
        desc.append(f"receiver `{models['receiver']}`")
    if models.get("sharer"):
        desc.append(f"sharer `{models['sharer']}`")
    if models.get("fusers"):
        desc.append("C2C: " + ", ".join(f"`{s}` via fuser `{f}`" for s, f in zip(models["c2c_sharers"],
                                                                                 models["fusers"])))
    lines += ["; ".join(desc) + ".", ""]
    header = ["Method", *benches, "TTFT (ms)", "Latency (ms)", "Speedup vs T2T"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for m in methods:
        acc = [_fmt(None if summary["accuracy"][b][m] is None else 100 * summary["accuracy"][b][m], ".2f")
               for b in benches]
        lat = summary["latency"][m]
        cells = [METHOD_LABELS[m], *acc, _fmt(lat["ttft_ms"], ".1f"), _fmt(lat["total_ms"], ".1f"),
                 _fmt(summary["speedup_vs_t2t"][m], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Accuracy in %, on the scored items. Latency: batch size 1, mean over the first items of each "
              "benchmark, after a warm-up call; text-to-text counts both stages.", ""]
    for b in benches:
        parts = [f"{m}: {summary['counts'][b][m]['scored']} scored, {summary['counts'][b][m]['skipped']} skipped"
                 for m in methods]
        lines.append(f"- **{b}**: " + "; ".join(parts))
    return "\n".join(lines) + "\n"


def _plots(summary: dict, output_dir: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches, methods = summary["benchmarks"], summary["methods"]
    fig = Figure(figsize=(max(5.0, 1.6 * len(benches) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    x = np.arange(len(benches))
    for j, m in enumerate(methods):
        values = [100 * (summary["accuracy"][b][m] or 0.0) for b in benches]
        bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, values, width, label=METHOD_LABELS[m])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(x, benches)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    ax.set_title(f"Accuracy ({summary['answer_mode']})")
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy.png", dpi=120)

    fig = Figure(figsize=(max(5.0, 1.2 * len(methods) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(methods))
    ttft = [summary["latency"][m]["ttft_ms"] or 0.0 for m in methods]
    total = [summary["latency"][m]["total_ms"] or 0.0 for m in methods]
    ax.bar(x - 0.2, ttft, 0.4, label="time to first token")
    ax.bar(x + 0.2, total, 0.4, label="total")
    ax.set_xticks(x, [METHOD_LABELS[m] for m in methods])
    ax.set_ylabel("ms per item (batch size 1)")
    ax.legend()
    ax.set_title("Latency")
    fig.tight_layout()
    fig.savefig(output_dir / "latency.png", dpi=120)


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> dict:
    """Runs `config.eval` and writes its outputs; returns the summary (also in `summary.json`)."""
    settings = parse_settings(config, workdir)
    benches = [load_benchmark(name, source=source, limit=settings.limit)
               for name, source in zip(settings.benchmarks, settings.sources)]
    runners, models = _build_methods(config, settings)
    # In a multi-process launch every process evaluates (redundantly, on its own devices); one writes.
    writer = jax.process_index() == 0
    if writer:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
    per_bench = {}
    for bench in benches:
        per_bench[bench.name] = evaluate_benchmark(bench, runners, settings)
        summary = _summarise(settings, models, per_bench, config)
        if writer:
            _write_csv(settings.output_dir / f"{bench.name}.csv", per_bench[bench.name]["results"])
            # Rewritten after every benchmark, so a long run can be inspected (and survives a crash) midway.
            (settings.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            (settings.output_dir / "results.md").write_text(results_markdown(summary))
    if writer:
        _plots(summary, settings.output_dir)
        logger.info("wrote %s", settings.output_dir)
    return summary


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from c2c_jax.config import parse_flags, use_inference_xla_flags

    use_inference_xla_flags()

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", "", "Run directory; outputs go to <workdir>/eval unless "
                                       "eval.output_dir is set.")
    flags.mark_flags_as_required(["config"])

    def run(argv):
        del argv
        from c2c_jax import sharding

        sharding.maybe_initialize_distributed()
        summary = evaluate(config_flag.value, workdir_flag.value)
        print(results_markdown(summary))

    app.run(run, flags_parser=parse_flags)


if __name__ == "__main__":
    main()
