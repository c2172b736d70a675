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
  and the controls, the same fusers fed inputs without the prompt's sharer content (c2c_jax/controls.py):
    c2c_mismatched         each item reads the sharer cache of another item of its batch (items are
                           batched by length, so a neighbour in length; a cyclic shift within the batch);
    c2c_zero, c2c_noise    the sharer's K/V replaced by zeros / by Gaussian noise of the cache's
                           per-layer, per-head mean and variance (seeded by `config.seed`);
    c2c_no_receiver_input  the projectors read zeros in place of the receiver's K/V (the sharer-only
                           projection; not for a fuser whose ablation reads no receiver anyway).
    A gain of c2c over the receiver that a control matches is a format effect, not the sharer's content.
    In logits mode the receiver alone, c2c and the controls are scored from one prefill per batch
    (`SharedPrefill`); each control then adds a fusion and the answer prefix's columns.
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

Statistics (c2c_jax/stats.py), per benchmark and method: accuracy with a 95% percentile bootstrap
interval; the paired difference to the receiver alone (and, for the controls, to c2c) with its
interval and McNemar's exact p-value; the share of each answer letter; the chance level; in logits
mode the mean log-probability of the gold letter (moves even when accuracy sits at chance). The
bootstrap is seeded by `config.seed`; `summary.json` records it. `verdict(summary)` puts the result in
one line, printed at the end.

Outputs (under `eval.output_dir`, default `<workdir>/eval`): `<benchmark>.csv` (one row per item and
method), `summary.json`, `results.md` (rows = methods, columns = benchmarks, like the paper's main
table), `accuracy.png`, `answers.png` and `latency.png`.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
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
from c2c_jax.controls import CONTROL_METHODS, FusionControl
from c2c_jax.pipeline import C2CModel, EncodedPrompt, Generator, PromptBatch, PromptEncoder, SamplingConfig
from c2c_jax.stats import BOOTSTRAP_RESAMPLES, bootstrap_interval, paired_comparison

logger = logging.getLogger(__name__)

METHODS = ("receiver", "sharer", "t2t", "c2c", *CONTROL_METHODS)
FUSED_METHODS = ("c2c", *CONTROL_METHODS)  # methods that need eval.fuser
METHOD_LABELS = {"receiver": "Receiver", "sharer": "Sharer", "t2t": "Text-to-Text", "c2c": "C2C",
                 "c2c_mismatched": "C2C, mismatched sharer", "c2c_zero": "C2C, zero sharer",
                 "c2c_noise": "C2C, noise sharer", "c2c_no_receiver_input": "C2C, no receiver input"}
ANSWER_MODES = ("generate", "logits")
# Upstream's text-to-text message budget (new sharer tokens) per answer mode, `eval.t2t_message_tokens=0`.
T2T_MESSAGE_TOKENS = {"generate": 1024, "logits": 64}
# The reference evaluator's default stage-1 prompt (rosetta/baseline/multi_stage.py, TwoStageInference).

CSV_FIELDS = ("id", "subject", "method", "gold", "prediction", "correct", "generated_text", "message",
              "prompt_tokens", "output_tokens", "ttft_ms", "latency_ms", "option_logits", "gold_logprob",
              "sharer_item")


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
    seed: int  # the noise control's and the bootstrap's


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
    # Any name goes with a local file (a multiple-choice set in the same row format); the rest must be known.
    unknown = [b for b, source in zip(benchmarks, sources) if b not in BENCHMARKS and source in ("offline", "hub")]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)} in eval.benchmarks; "
                         f"valid: {', '.join(BENCHMARKS)}, or any name with a local file in eval.source")
    fusers = _split(e.fuser)
    sharers = _split(e.sharers)
    fused = [m for m in methods if m in FUSED_METHODS]
    if fused and not fusers:
        raise ValueError(f"method {', '.join(repr(m) for m in fused)} needs a trained fuser: set eval.fuser to a "
                         "fuser directory (c2c_jax format or the upstream projector_*.pt layout), or drop "
                         f"{', '.join(fused)} from eval.methods")
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
        output_dir=output_dir.expanduser(), seed=int(config.seed))


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
    def _chunks(prompts: Sequence[Prompt], batch_size: int, min_rows: int = 1) -> list[list[int]]:
        """Index lists of at most `batch_size` prompts of similar width (and equal suffix).

        min_rows=2 (the mismatched control, batch_size >= 3): a last list of one prompt takes a prompt from
        the list before it, so only a prompt alone with its suffix length is ever alone in its list.
        """
        order = sorted(range(len(prompts)), key=lambda i: (prompts[i].suffix, prompts[i].width))
        chunks = []
        for _, group in itertools.groupby(order, key=lambda i: prompts[i].suffix):
            group = list(group)
            ours = [group[start:start + batch_size] for start in range(0, len(group), batch_size)]
            if len(ours) > 1 and len(ours[-1]) < min_rows:
                ours[-1].insert(0, ours[-2].pop())
            chunks.extend(ours)
        return chunks

    @staticmethod
    def donors(chunks: list[list[int]]) -> dict[int, int]:
        """The mismatched control's derangement: each prompt reads the sharer cache of the next one of its
        list (cyclically). Lists hold prompts of neighbouring lengths, so donors come from the same bucket."""
        return {i: chunk[(j + 1) % len(chunk)] for chunk in chunks if len(chunk) > 1 for j, i in enumerate(chunk)}

    @staticmethod
    def _batch_control(control: FusionControl | None, index: int, rows: int, size: int, seed: int
                       ) -> FusionControl | None:
        """`control` for the `index`-th batch (`rows` real rows of `size`): its noise key and derangement."""
        if control is None:
            return None
        donor_rows = np.arange(size, dtype=np.int32)
        donor_rows[:rows] = np.roll(donor_rows[:rows], -1)  # as `donors`; filled copies read themselves
        return dataclasses.replace(control, key=jax.random.fold_in(jax.random.key(seed), index),
                                   donor_rows=jax.numpy.asarray(donor_rows))

    @staticmethod
    def _filled(group: list[Prompt], size: int) -> list[Prompt]:
        # A short last batch is filled with copies so every batch has one shape (one compilation).
        return group + [group[-1]] * (size - len(group))

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, batch_size: int, progress=None, *,
                 control: FusionControl | None = None, seed: int = 0, min_rows: int = 1) -> list[tuple[str, int]]:
        """(text, new tokens) per prompt: greedy, batched; `control` for the fused route's controls."""
        sampling = SamplingConfig(max_new_tokens=max_new_tokens)
        size = min(batch_size, len(prompts))
        out: list[tuple[str, int] | None] = [None] * len(prompts)
        for index, chunk in enumerate(self._chunks(prompts, batch_size, min_rows)):
            batch = self.batch(self._filled([prompts[i] for i in chunk], size), max_new_tokens)
            batch_control = self._batch_control(control, index, len(chunk), size, seed)
            generation = jax.device_get(self.generator.generate_batch(batch, sampling, fuse=self.fuse,
                                                                      control=batch_control))
            for row, i in enumerate(chunk):
                out[i] = (self.decode(generation.tokens[row, : generation.lengths[row]]), int(generation.lengths[row]))
            if progress is not None:
                progress.update(len(chunk))
        return out

    def decode(self, ids) -> str:
        return self.tokenizer.decode(np.asarray(ids), skip_special_tokens=True).strip()

    def score(self, prompts: Sequence[Prompt], num_options: int, batch_size: int, progress=None, *,
              control: FusionControl | None = None, seed: int = 0, min_rows: int = 1
              ) -> tuple[np.ndarray, np.ndarray]:
        """float32 [prompts, num_options] option-letter logits after each prompt's answer prefix, and
        float32 [prompts] the log-normaliser over the whole vocabulary (logit - it = log-probability)."""
        ids = np.asarray(self.letter_ids(num_options))
        size = min(batch_size, len(prompts))
        out = np.zeros((len(prompts), num_options), np.float32)
        normaliser = np.zeros((len(prompts),), np.float32)
        for index, chunk in enumerate(self._chunks(prompts, batch_size, min_rows)):
            group = [prompts[i] for i in chunk]
            batch = self.batch(self._filled(group, size), 0)
            batch_control = self._batch_control(control, index, len(chunk), size, seed)
            logits = self.generator.next_token_logits(batch, fuse=self.fuse, suffix_length=group[0].suffix,
                                                      control=batch_control)
            logits = np.asarray(jax.device_get(logits))[: len(chunk)]
            out[chunk] = logits[:, ids]
            peak = logits.max(axis=-1)
            normaliser[chunk] = peak + np.log(np.exp(logits - peak[:, None]).sum(axis=-1))
            if progress is not None:
                progress.update(len(chunk))
        return out, normaliser

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
    gold_logprob: float | None = None  # logits mode: log-probability of the gold letter's token (whole vocabulary)
    sharer_item: str = ""  # c2c_mismatched: the item whose sharer cache this item's fuser read

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["prediction"] = self.prediction or ""
        d["correct"] = int(self.correct)
        d["ttft_ms"] = "" if self.ttft_ms is None else f"{self.ttft_ms:.3f}"
        d["latency_ms"] = "" if self.latency_ms is None else f"{self.latency_ms:.3f}"
        d["option_logits"] = "" if self.option_logits is None else json.dumps([round(x, 5) for x in self.option_logits])
        d["gold_logprob"] = "" if self.gold_logprob is None else f"{self.gold_logprob:.5f}"
        return d


def _answer(method: str, item: MCItem, prompt: Prompt, *, text: str = "", new_tokens: int = 0,
            scores: np.ndarray | None = None, normaliser: float | None = None, message: str = "",
            sharer_item: str = "") -> ItemResult:
    n = len(item.choices)
    gold_logprob = None
    if scores is not None:
        prediction = LETTERS[int(np.argmax(scores[:n]))]
        logits = [float(x) for x in scores[:n]]
        gold_logprob = float(scores[LETTERS.index(item.answer)] - normaliser)
    else:
        prediction, logits = extract_answer(text, num_choices=n), None
    return ItemResult(id=item.id, subject=item.subject, method=method, gold=item.answer, prediction=prediction,
                      correct=prediction == item.answer, generated_text=text, message=message,
                      prompt_tokens=prompt.num_tokens, output_tokens=new_tokens, option_logits=logits,
                      gold_logprob=gold_logprob, sharer_item=sharer_item)


class SingleModel:
    """receiver, sharer, c2c or a control of c2c: one route answers the MC prompt."""

    def __init__(self, method: str, route: Route, settings: EvalSettings, control: FusionControl | None = None):
        self.method, self.route, self.settings, self.control = method, route, settings, control
        self.shared: SharedPrefill | None = None  # set when this method is scored in a shared pass
        self.mismatched = control is not None and control.sharer_input == "mismatched"
        # A derangement needs two real rows in every batch (see Route._chunks).
        self.batch_size = max(settings.batch_size, 3) if self.mismatched else settings.batch_size

    def _new_tokens(self) -> int:
        return self.settings.max_new_tokens if self.settings.answer_mode == "generate" else 0

    def prepare(self, item: MCItem) -> Prompt:
        return self.route.encode(mc_messages(item, use_cot=self.settings.use_cot), self.settings.answer_mode)

    def too_long(self, prepared: Prompt) -> str | None:
        return self.route.too_long(prepared, self._new_tokens())

    def run(self, items: Sequence[MCItem], prepared: Sequence[Prompt], progress=None
            ) -> tuple[list[ItemResult], list[tuple[str, str]]]:
        s = self.settings
        if self.shared is not None:
            return self.shared.results(self.method, items, progress)
        skipped, sharer_items = [], [""] * len(items)
        if self.mismatched:
            # An item alone with its answer-prefix length has no other item to take a sharer cache from.
            donors = Route.donors(Route._chunks(prepared, self.batch_size, 2))
            alone = [i for i in range(len(items)) if i not in donors]
            skipped = [(items[i].id, f"{self.method}: no other item of its length to read a sharer cache from")
                       for i in alone]
            keep = [i for i in range(len(items)) if i in donors]
            items, prepared = [items[i] for i in keep], [prepared[i] for i in keep]
            donors = Route.donors(Route._chunks(prepared, self.batch_size, 2))
            sharer_items = [items[donors[i]].id for i in range(len(items))]
            if progress is not None:
                progress.update(len(alone))
            if not items:
                return [], skipped
        kwargs = dict(control=self.control, seed=s.seed, min_rows=2 if self.mismatched else 1)
        if s.answer_mode == "logits":
            num_options = max(len(it.choices) for it in items)
            scores, normalisers = self.route.score(prepared, num_options, self.batch_size, progress, **kwargs)
            return [_answer(self.method, it, p, scores=sc, normaliser=z, sharer_item=d)
                    for it, p, sc, z, d in zip(items, prepared, scores, normalisers, sharer_items)], skipped
        outputs = self.route.generate(prepared, s.max_new_tokens, self.batch_size, progress, **kwargs)
        return [_answer(self.method, it, p, text=text, new_tokens=n, sharer_item=d)
                for it, p, (text, n), d in zip(items, prepared, outputs, sharer_items)], skipped

    def measure(self, item: MCItem, prepared: Prompt) -> tuple[float, float] | None:
        if self.control is not None:
            return None  # a control costs what c2c costs; its latency is c2c's
        if self.settings.answer_mode == "logits":
            t = self.route.time_first_token(prepared)
            return t, t
        return self.route.time_generate(prepared, self.settings.max_new_tokens)


class SharedPrefill:
    """Logits mode: the receiver alone, c2c and its controls scored from one prefill of the receiver and
    the sharers per batch (`Generator.variant_logits`), instead of one per method: the controls then cost
    a fusion and the answer prefix's columns each. The first method asked runs the pass for all."""

    def __init__(self, route: Route, methods: Sequence[str], settings: EvalSettings):
        self.route, self.methods, self.settings = route, list(methods), settings
        self.mismatched = "c2c_mismatched" in self.methods
        self.batch_size = max(settings.batch_size, 3) if self.mismatched else settings.batch_size
        self._done: tuple[tuple[str, ...], dict] | None = None

    def results(self, method: str, items: Sequence[MCItem], progress=None
                ) -> tuple[list[ItemResult], list[tuple[str, str]]]:
        key = tuple(it.id for it in items)
        if self._done is None or self._done[0] != key:
            self._done = (key, self._run(items, progress))
        elif progress is not None:
            progress.update(len(items))
        return self._done[1][method]

    def _run(self, items: Sequence[MCItem], progress) -> dict:
        s = self.settings
        prompts = [self.route.encode(mc_messages(it, use_cot=s.use_cot), "logits") for it in items]
        ids = np.asarray(self.route.letter_ids(max(len(it.choices) for it in items)))
        receiver_only = "receiver" in self.methods
        fused = [m for m in self.methods if m != "receiver"]
        names = (["receiver"] if receiver_only else []) + fused
        chunks = Route._chunks(prompts, self.batch_size, 2 if self.mismatched else 1)
        donors = Route.donors(chunks)
        size = min(self.batch_size, len(prompts))
        scores = np.zeros((len(names), len(prompts), len(ids)), np.float32)
        normalisers = np.zeros((len(names), len(prompts)), np.float32)
        for index, chunk in enumerate(chunks):
            group = [prompts[i] for i in chunk]
            batch = self.route.batch(Route._filled(group, size), 0)
            controls = [Route._batch_control(CONTROL_METHODS.get(m), index, len(chunk), size, s.seed) for m in fused]
            logits = self.route.generator.variant_logits(batch, controls, suffix_length=group[0].suffix,
                                                         receiver_only=receiver_only)
            logits = np.asarray(jax.device_get(logits))[:, : len(chunk)]
            scores[:, chunk] = logits[..., ids]
            peak = logits.max(axis=-1)
            normalisers[:, chunk] = peak + np.log(np.exp(logits - peak[..., None]).sum(axis=-1))
            if progress is not None:
                progress.update(len(chunk))
        out = {}
        for v, m in enumerate(names):
            rows, skipped = [], []
            for i, (it, p) in enumerate(zip(items, prompts)):
                if m == "c2c_mismatched" and i not in donors:
                    skipped.append((it.id, f"{m}: no other item of its length to read a sharer cache from"))
                    continue
                rows.append(_answer(m, it, p, scores=scores[v, i], normaliser=normalisers[v, i],
                                    sharer_item=items[donors[i]].id if m == "c2c_mismatched" else ""))
            out[m] = (rows, skipped)
        return out


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
            scores, normalisers = self.receiver.score(kept_prompts, num_options, s.batch_size, progress)
            for i, sc, z in zip(keep, scores, normalisers):
                results.append(_answer(self.method, items[i], second[i], scores=sc, normaliser=z,
                                       message=messages[i]))
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


def evaluation_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The devices every evaluation batch is split over: all of a TPU slice's chips (of every host),
    or of a multi-process launch; None (one device, as a single GPU or CPU runs) otherwise."""
    from c2c_jax import sharding

    if jax.device_count() > 1 and (jax.process_count() > 1 or jax.default_backend() == "tpu"):
        return sharding.make_mesh(config.mesh)
    return None


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

    mesh = evaluation_mesh(config)

    def single(name: str, model, tok) -> Route:
        return Route(name, Generator(C2CModel(model), encoder(tok), mesh=mesh), fuse=False,
                     context=model.config.max_position_embeddings)

    routes: dict[str, Route] = {}
    fused = [m for m in methods if m in FUSED_METHODS]
    if {"receiver", "t2t"} & set(methods) or fused:
        receiver, receiver_tok = load(config.receiver.path, config.receiver.dtype)
        if {"receiver", "t2t"} & set(methods):
            routes["receiver"] = single("receiver", receiver, receiver_tok)
    if {"sharer", "t2t"} & set(methods):
        sharer, sharer_tok = load(settings.sharers[0], config.sharer.dtype)
        routes["sharer"] = single("sharer", sharer, sharer_tok)
    if fused:
        sharers, sharer_toks, fusers = [], [], []
        for path, fuser_dir in zip(settings.sharers, settings.fusers):
            sharer, sharer_tok = load(path, config.sharer.dtype)
            # Raises FuserCheckpointError when the fuser was trained for another pair.
            fusers.append(load_any_fuser(fuser_dir, receiver.config, sharer.config))
            if "c2c_no_receiver_input" in methods and not fusers[-1].config.uses_receiver:
                raise ValueError(f"c2c_no_receiver_input: fuser {fuser_dir} (ablation {fusers[-1].config.ablation!r}) "
                                 "reads no receiver input, so the control would repeat c2c; drop it from "
                                 "eval.methods")
            sharers.append(sharer)
            sharer_toks.append(sharer_tok)
        model = C2CModel(receiver, sharers, fusers, multi_sharer_mode="sequential")
        context = min(m.config.max_position_embeddings for m in [receiver, *sharers])
        routes["c2c"] = Route("c2c", Generator(model, encoder(receiver_tok, sharer_toks), mesh=mesh), fuse=True,
                              context=context)

    runners = {}
    shared = None
    if settings.answer_mode == "logits" and fused:
        # One prefill per batch for c2c and its controls, and for the receiver alone when it reads the same
        # tokens (no token alignment: the fused route's encoding is then the receiver's own).
        aligned = any(a is not None for a in routes["c2c"].generator.encoder.aligners)
        members = [m for m in methods if m in FUSED_METHODS or (m == "receiver" and not aligned)]
        if len(members) > 1:
            shared = SharedPrefill(routes["c2c"], members, settings)
    for m in methods:
        if m == "t2t":
            runners[m] = TextToText(routes["sharer"], routes["receiver"], settings)
        elif m in CONTROL_METHODS:
            runners[m] = SingleModel(m, routes["c2c"], settings, CONTROL_METHODS[m])
        else:
            runners[m] = SingleModel(m, routes[m], settings)
        if shared is not None and m in shared.methods:
            runners[m].shared = shared
    models = {"receiver": config.receiver.path if {"receiver", "t2t"} & set(methods) or fused else None,
              "sharer": settings.sharers[0] if {"sharer", "t2t"} & set(methods) else None,
              "c2c_sharers": list(settings.sharers[: len(settings.fusers)]) if fused else [],
              "fusers": list(settings.fusers) if fused else [],
              # What each fuser was trained to read as the sharer's K/V ("real", or a trained control).
              "fuser_sharer_inputs": [f.config.sharer_input for f in fusers] if fused else [],
              # (open, all) gates per fuser: with none open, C2C and its controls are the receiver alone.
              "fuser_gates_open": [[int(np.sum(f.gates_open())), int(np.size(f.gates_open()))] for f in fusers]
              if fused else []}
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
    return dict(results=results, skipped=skipped, run_seconds=run_seconds,
                num_choices={it.id: len(it.choices) for it in kept_items})


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
    statistics = {b: _statistics(settings, out) for b, out in per_bench.items()}
    t2t_total = latency.get("t2t", {}).get("total_ms")
    speedup = {m: (t2t_total / v["total_ms"] if t2t_total and v["total_ms"] else None) for m, v in latency.items()}
    try:
        config_dict = json.loads(config.to_json_best_effort())
    except Exception:  # noqa: BLE001 -- the summary must not fail on an exotic config value
        config_dict = str(config)
    summary = dict(
        benchmarks=list(per_bench), pending_benchmarks=[b for b in settings.benchmarks if b not in per_bench],
        methods=list(settings.methods), answer_mode=settings.answer_mode,
        models=models, accuracy=accuracy, counts=counts, statistics=statistics,
        seeds=dict(seed=settings.seed, bootstrap=f"numpy default_rng({settings.seed}) per statistic, "
                   f"{BOOTSTRAP_RESAMPLES} resamples", noise_control=f"jax.random.key({settings.seed}) folded with "
                   "the batch index, then the sharer index"),
        skip_reasons=skip_reasons,
        skipped={b: out["skipped"] for b, out in per_bench.items()},
        latency=latency, latency_per_benchmark=lat_bench, speedup_vs_t2t=speedup,
        run_seconds={b: out["run_seconds"] for b, out in per_bench.items()},
        files=dict(csv={b: f"{b}.csv" for b in per_bench}, summary="summary.json", results="results.md",
                   plots=["accuracy.png", "answers.png"] + (["latency.png"] if settings.latency_items else [])),
        config=config_dict)
    summary["verdict"] = verdict(summary)
    return summary


def _statistics(settings: EvalSettings, out: dict) -> dict:
    """One benchmark's statistics per method (see the module docstring); every bootstrap starts from
    `default_rng(seed)`, so a number does not depend on which other methods ran."""
    rows = {m: {r.id: r for r in out["results"].get(m, [])} for m in settings.methods}
    choices = out["num_choices"]
    scored = sorted(set().union(*(set(r) for r in rows.values()))) if rows else []
    stats = dict(chance=float(np.mean([1 / choices[i] for i in scored])) if scored else None, methods={})
    letters = LETTERS[: max(choices.values(), default=0)]

    def compare(m: str, reference: str) -> dict | None:
        if m == reference or reference not in rows or not rows[reference] or not rows[m]:
            return None
        common = sorted(set(rows[m]) & set(rows[reference]))
        return paired_comparison([rows[m][i].correct for i in common], [rows[reference][i].correct for i in common],
                                 np.random.default_rng(settings.seed))

    def answers_of(rs: list[ItemResult]) -> dict:
        """Share of each predicted letter (and of no answer) among `rs`."""
        if not rs:
            return {}
        return {**{L: sum(r.prediction == L for r in rs) / len(rs) for L in letters},
                "none": sum(r.prediction is None for r in rs) / len(rs)}

    # The gold letters' shares, to read the answer distribution against.
    gold = {i: r.gold for by_id in rows.values() for i, r in by_id.items()}
    stats["gold_letters"] = {L: sum(g == L for g in gold.values()) / len(gold) for L in letters} if gold else {}
    for m, by_id in rows.items():
        rs = list(by_id.values())
        correct = [r.correct for r in rs]
        logprobs = [r.gold_logprob for r in rs if r.gold_logprob is not None]
        low, high = bootstrap_interval(correct, np.random.default_rng(settings.seed))
        entry = dict(items=len(rs), accuracy=float(np.mean(correct)) if rs else None,
                     low=low if rs else None, high=high if rs else None,
                     vs_receiver=compare(m, "receiver"),
                     vs_c2c=compare(m, "c2c") if m in CONTROL_METHODS else None,
                     answers=answers_of(rs),
                     gold_logprob=float(np.mean(logprobs)) if logprobs else None)
        if logprobs:
            entry["gold_logprob_low"], entry["gold_logprob_high"] = bootstrap_interval(
                logprobs, np.random.default_rng(settings.seed))
        stats["methods"][m] = entry
    return stats


def _beyond(comparison: dict | None) -> int:
    """+1 / -1 when the paired difference's interval lies above / below zero, else 0."""
    if not comparison or comparison["difference"] is None:
        return 0
    return 1 if comparison["low"] > 0 else -1 if comparison["high"] < 0 else 0


def _pp(comparison: dict) -> str:
    return (f"{100 * comparison['difference']:+.1f} pp [{100 * comparison['low']:+.1f}, "
            f"{100 * comparison['high']:+.1f}]")


def verdict(summary: dict) -> str:
    """One line: what the run shows, from the paired differences to the receiver alone and the controls."""
    clauses, at_chance = [], True
    for b in summary["benchmarks"]:
        stats = summary["statistics"][b]
        methods = stats["methods"]
        if "receiver" not in methods or not methods["receiver"]["items"]:
            continue
        receiver = methods["receiver"]
        at_chance &= receiver["low"] <= stats["chance"] <= receiver["high"]
        found = []
        for m, entry in methods.items():
            direction = _beyond(entry["vs_receiver"])
            if not direction:
                continue
            text = f"{m} {_pp(entry['vs_receiver'])}"
            if m == "c2c" and direction > 0:
                controls = {c: methods[c] for c in CONTROL_METHODS if c in methods and methods[c]["items"]}
                if not controls:
                    text += " (no controls run: a format effect cannot be ruled out)"
                else:
                    matched = [c for c, e in controls.items() if _beyond(e["vs_c2c"]) >= 0]
                    text += (f", but {', '.join(matched)} {'does' if len(matched) == 1 else 'do'} not fall below "
                             "it: not the sharer's content" if matched else ", above every control: the sharer's "
                             "content helps")
            found.append(text)
        if found:
            clauses.append(f"{b}: " + "; ".join(found) + f" ({receiver['items']} items)")
    gates = summary.get("models", {}).get("fuser_gates_open") or []
    closed = " (every gate of the fuser is closed, so C2C and its controls are the receiver alone)" \
        if gates and not any(g[0] for g in gates) else ""
    if not clauses:
        if not any(summary["statistics"][b]["methods"].get("receiver", {}).get("items") for b in summary["benchmarks"]):
            return "Verdict: no receiver-alone run to compare with (add 'receiver' to eval.methods)."
        prefix = "pipeline check at this model size: the receiver is at chance and " if at_chance else ""
        return f"Verdict: {prefix}no method differs from the receiver alone beyond its 95% interval{closed}."
    return "Verdict: " + "; ".join(clauses) + closed + "."


def _write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for rows in results.values():
            for r in rows:
                writer.writerow(r.row())


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _interval(entry: dict | None, scale: float = 100, spec: str = ".1f") -> str:
    if not entry or entry.get("accuracy") is None:
        return "–"
    return f"{scale * entry['accuracy']:{spec}} [{scale * entry['low']:{spec}}, {scale * entry['high']:{spec}}]"


def _comparison_cell(comparison: dict | None) -> str:
    if not comparison or comparison["difference"] is None:
        return "–"
    return f"{_pp(comparison)}, p={comparison['p_mcnemar']:.2g}"


def results_markdown(summary: dict) -> str:
    """The paper's main-table layout (rows = methods, columns = benchmarks: accuracy % with its 95% interval),
    then the paired differences, the answer distribution, the gold letter's log-probability and the verdict."""
    benches, methods = summary["benchmarks"], summary["methods"]
    models, stats = summary["models"], summary["statistics"]
    lines = ["# C2C evaluation", ""]
    desc = [f"answer mode `{summary['answer_mode']}`"]
    if models.get("receiver"):
        desc.append(f"receiver `{models['receiver']}`")
    if models.get("sharer"):
        desc.append(f"sharer `{models['sharer']}`")
    if models.get("fusers"):
        inputs = models.get("fuser_sharer_inputs") or ["real"] * len(models["fusers"])
        gates = models.get("fuser_gates_open") or [None] * len(models["fusers"])
        desc.append("C2C: " + ", ".join(
            f"`{s}` via fuser `{f}`" + (f" ({g[0]} of {g[1]} gates open)" if g else "")
            + (f" (trained control: sharer input `{i}`)" if i != "real" else "")
            for s, f, i, g in zip(models["c2c_sharers"], models["fusers"], inputs, gates)))
    lines += ["; ".join(desc) + ".", ""]
    header = ["Method", *benches, "TTFT (ms)", "Latency (ms)", "Speedup vs T2T"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for m in methods:
        acc = [_interval(stats[b]["methods"].get(m)) for b in benches]
        lat = summary["latency"][m]
        cells = [METHOD_LABELS[m], *acc, _fmt(lat["ttft_ms"], ".1f"), _fmt(lat["total_ms"], ".1f"),
                 _fmt(summary["speedup_vs_t2t"][m], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| Chance | " + " | ".join(_fmt(None if stats[b]["chance"] is None else 100 * stats[b]["chance"],
                                                   ".1f") for b in benches) + " | | | |")
    lines += ["", "Accuracy in % on the scored items, [95% percentile bootstrap interval]; chance = the mean of "
              "1 / options. Latency: batch size 1, mean over the first items of each benchmark, after a warm-up "
              "call; text-to-text counts both stages; the controls are not timed (a control runs C2C's computation "
              "on other inputs).", ""]

    lines += ["## Paired differences", "",
              "Accuracy of each method minus the receiver alone (and, for the controls, minus C2C) on the same "
              "items, in percentage points [95% bootstrap interval], with McNemar's exact p-value.", ""]
    header = ["Method"] + [f"{b}: vs receiver" for b in benches]
    controls = [m for m in methods if m in CONTROL_METHODS]
    if controls and "c2c" in methods:
        header += [f"{b}: vs C2C" for b in benches]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m in methods:
        cells = [METHOD_LABELS[m]] + [_comparison_cell(stats[b]["methods"].get(m, {}).get("vs_receiver"))
                                      for b in benches]
        if controls and "c2c" in methods:
            cells += [_comparison_cell(stats[b]["methods"].get(m, {}).get("vs_c2c")) for b in benches]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Answer distribution", "",
              "Share of each predicted letter (%), against the gold letters' share; a method that answers one "
              "letter to everything scores that letter's gold share.", ""]
    for b in benches:
        letters = list(stats[b]["gold_letters"])
        header = ["Method", *letters, "none"]
        lines += [f"**{b}**", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines.append("| Gold | " + " | ".join(f"{100 * stats[b]['gold_letters'][L]:.0f}" for L in letters) + " | |")
        for m in methods:
            shares = stats[b]["methods"].get(m, {}).get("answers") or {}
            lines.append("| " + " | ".join([METHOD_LABELS[m]] + [_fmt(None if L not in shares else 100 * shares[L],
                                                                       ".0f") for L in letters + ["none"]]) + " |")
        lines.append("")

    if any(stats[b]["methods"].get(m, {}).get("gold_logprob") is not None for b in benches for m in methods):
        lines += ["## Log-probability of the gold letter", "",
                  "Mean over items of log p(gold letter | prompt) over the whole vocabulary [95% interval]; "
                  "it moves even when accuracy sits at chance.", "",
                  "| Method | " + " | ".join(benches) + " |", "|:---|" + "---:|" * len(benches)]
        for m in methods:
            cells = []
            for b in benches:
                e = stats[b]["methods"].get(m, {})
                cells.append("–" if e.get("gold_logprob") is None else
                             f"{e['gold_logprob']:.3f} [{e['gold_logprob_low']:.3f}, {e['gold_logprob_high']:.3f}]")
            lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")

    for b in benches:
        parts = [f"{m}: {summary['counts'][b][m]['scored']} scored, {summary['counts'][b][m]['skipped']} skipped"
                 for m in methods]
        lines.append(f"- **{b}**: " + "; ".join(parts))
    lines += ["", f"Seeds: {summary['seeds']['seed']} (bootstrap and the noise control).", "", summary["verdict"]]
    return "\n".join(lines) + "\n"


def _plots(summary: dict, output_dir: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches, methods, stats = summary["benchmarks"], summary["methods"], summary["statistics"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(benches) * max(1, len(methods) / 3) + 3), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    x = np.arange(len(benches))
    for j, m in enumerate(methods):
        entries = [stats[b]["methods"].get(m) or {} for b in benches]
        values = np.array([100 * (e.get("accuracy") or 0.0) for e in entries])
        errors = np.array([[100 * (e["accuracy"] - e["low"]) if e.get("accuracy") is not None else 0.0
                            for e in entries],
                           [100 * (e["high"] - e["accuracy"]) if e.get("accuracy") is not None else 0.0
                            for e in entries]])
        bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                      label=METHOD_LABELS[m], error_kw=dict(linewidth=0.8))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    for i, b in enumerate(benches):  # chance, per benchmark
        if stats[b]["chance"] is not None:
            ax.hlines(100 * stats[b]["chance"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      linewidth=1, label="chance" if i == 0 else None)
    ax.set_xticks(x, benches)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.set_title(f"Accuracy ({summary['answer_mode']})")
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy.png", dpi=120)

    # Answer distribution: one panel per benchmark, one stacked bar per method (and the gold letters).
    fig = Figure(figsize=(max(6.0, 0.7 * (len(methods) + 1) * len(benches) + 2.5), 4.2))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(benches), sharey=True, squeeze=False)[0])
    for ax, b in zip(axes, benches):
        letters = list(stats[b]["gold_letters"]) + ["none"]
        rows = [("Gold", stats[b]["gold_letters"])] + [(METHOD_LABELS[m], stats[b]["methods"].get(m, {}).get("answers")
                                                         or {}) for m in methods]
        bottom = np.zeros(len(rows))
        for k, L in enumerate(letters):
            share = np.array([100 * r.get(L, 0.0) for _, r in rows])
            color = "lightgray" if L == "none" else f"C{k}"
            ax.bar(np.arange(len(rows)), share, 0.7, bottom=bottom, label=L, color=color)
            bottom += share
        ax.set_xticks(np.arange(len(rows)), [name for name, _ in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(b)
    axes[0].set_ylabel("share of answers (%)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0, title="answer")
    fig.suptitle("Answer distribution")
    fig.tight_layout()
    fig.savefig(output_dir / "answers.png", dpi=120)

    timed = [m for m in methods if summary["latency"][m]["items"]]
    if not timed:  # eval.latency_items=0: nothing was timed, and an empty plot would say nothing
        return
    fig = Figure(figsize=(max(6.0, 1.2 * len(timed) + 3), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(timed))
    ttft = [summary["latency"][m]["ttft_ms"] or 0.0 for m in timed]
    total = [summary["latency"][m]["total_ms"] or 0.0 for m in timed]
    ax.bar(x - 0.2, ttft, 0.4, label="time to first token")
    ax.bar(x + 0.2, total, 0.4, label="total")
    ax.set_xticks(x, [METHOD_LABELS[m] for m in timed])
    ax.set_ylabel("ms per item (batch size 1)")
    # Outside the axes: text-to-text's bars are the tallest and a legend inside would cover them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Latency")
    fig.tight_layout()
    fig.savefig(output_dir / "latency.png", dpi=120)


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> dict:
    """Runs `config.eval` and writes its outputs; returns the summary (also in `summary.json`)."""
    settings = parse_settings(config, workdir)
    from c2c_jax.build import check_before_loading

    check_before_loading(config, list(zip(settings.fusers, settings.sharers)) if "c2c" in settings.methods else [])
    benches = [load_benchmark(name, source=source, limit=settings.limit)
               for name, source in zip(settings.benchmarks, settings.sources)]
    runners, models = _build_methods(config, settings)
    # In a multi-process launch every process runs the same batches, each on its share of the chips
    # (`evaluation_mesh`); one writes.
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
    logger.info("%s", summary["verdict"])
    return summary


def main() -> None:
    from absl import flags
    from ml_collections import config_flags

    from c2c_jax import cli
    from c2c_jax.config import use_inference_xla_flags

    cli.starting("evaluate")  # after this module's own imports (jax), before transformers'
    use_inference_xla_flags()

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    workdir_flag = flags.DEFINE_string("workdir", "", "Run directory; outputs go to <workdir>/eval unless "
                                       "eval.output_dir is set.")
    flags.mark_flags_as_required(["config"])

    def run():
        from c2c_jax import sharding

        sharding.maybe_initialize_distributed()
        summary = evaluate(config_flag.value, workdir_flag.value)
        print(results_markdown(summary))  # ends with the verdict line

    cli.run(run)


if __name__ == "__main__":
    main()
