"""The evaluation's methods: one `Generator` used one way (a `Route`: receiver-only, sharer-only, or
fused), and the methods built on routes: a single model, the receiver with C2C and its controls from one
prefill (`SharedPrefill`), and text-to-text."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from typing import Callable, Sequence

import jax
import numpy as np

from c2c_jax.c2c.controls import CONTROL_METHODS, FusionControl
from c2c_jax.c2c.prompt import PromptBatch
from c2c_jax.evaluate.benchmarks import MCItem
from c2c_jax.evaluate.scoring import ANSWER_PREFIX, LETTERS, Prompt, answer_prefix_columns, background_messages, \
    extract_answer, mc_messages, option_token_ids, t2t_messages
from c2c_jax.evaluate.settings import EvalSettings
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.generator import Generator

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Routes: one Generator used one way (receiver-only, sharer-only, or fused).


def _timed(fn: Callable):
    """(result, seconds), the result's device computation included."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


class Route:
    """A `Generator` used with one `fuse` setting, with its context limit and option-letter ids."""

    def __init__(self, name: str, generator: Generator, *, fuse: bool, context: int,
                 prompt_buckets: Sequence[int] = ()):
        """prompt_buckets: batch widths (`eval.prompt_buckets`); each must be a multiple of the encoder's `pad_to`."""
        pad_to = generator.encoder.pad_to
        if any(b < 1 or b % pad_to for b in prompt_buckets):
            raise ValueError(f"eval.prompt_buckets {tuple(prompt_buckets)}: every bucket must be a positive multiple "
                             f"of {pad_to} (the prompts' padding unit on this platform)")
        self.name = name
        self.generator = generator
        self.fuse = fuse
        self.context = context
        self.prompt_buckets = tuple(sorted(prompt_buckets))
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
            return Prompt(encoded, answer_prefix_columns(encoded, self.tokenizer))
        return Prompt(encoder.encode_chat(messages), 1)

    def too_long(self, prompt: Prompt, new_tokens: int) -> str | None:
        """Why `prompt` plus `new_tokens` does not fit this route's context, or None."""
        if prompt.width + new_tokens > self.context:
            extra = f" + {new_tokens} new tokens" if new_tokens else ""
            return (f"{self.name}: prompt of {prompt.width} tokens{extra} exceeds the context of "
                    f"{self.context} tokens")
        return None

    def batch(self, prompts: Sequence[Prompt], new_tokens: int) -> PromptBatch:
        """Left-padded to the smallest prompt bucket that holds the longest prompt, else to a multiple of
        the encoder's `pad_to` (each width compiles its programs once), within context."""
        encoder = self.generator.encoder
        longest = max(p.width for p in prompts)
        width = next((b for b in self.prompt_buckets if b >= longest), encoder.padded_width(longest))
        return encoder.batch([p.encoded for p in prompts], width=min(width, self.context - new_tokens))

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
    def batch_control(control: FusionControl | None, index: int, rows: int, size: int, seed: int
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
            batch_control = self.batch_control(control, index, len(chunk), size, seed)
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
            batch_control = self.batch_control(control, index, len(chunk), size, seed)
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
            controls = [Route.batch_control(CONTROL_METHODS.get(m), index, len(chunk), size, s.seed) for m in fused]
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
    """t2t (docs/upstream_reference.md §5.8): the sharer writes background text, the receiver answers with it."""

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


