"""`config.eval`, parsed and validated: the evaluation's settings, methods and answer modes."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import ml_collections

from c2c_jax.c2c.controls import CONTROL_METHODS
from c2c_jax.evaluate.benchmarks import BENCHMARKS

logger = logging.getLogger(__name__)

METHODS = ("receiver", "sharer", "t2t", "c2c", *CONTROL_METHODS)
FUSED_METHODS = ("c2c", *CONTROL_METHODS)  # methods that need eval.fuser
METHOD_LABELS = {"receiver": "Receiver", "sharer": "Sharer", "t2t": "Text-to-Text", "c2c": "C2C",
                 "c2c_mismatched": "C2C, mismatched sharer", "c2c_zero": "C2C, zero sharer",
                 "c2c_noise": "C2C, noise sharer", "c2c_no_receiver_input": "C2C, no receiver input"}
ANSWER_MODES = ("generate", "logits")
# Upstream's text-to-text message budget (new sharer tokens) per answer mode, `eval.t2t_message_tokens=0`.
T2T_MESSAGE_TOKENS = {"generate": 1024, "logits": 64}


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`config.eval`, parsed and validated (no model or data is touched)."""

    benchmarks: tuple[str, ...]
    sources: tuple[str, ...]  # one per benchmark
    methods: tuple[str, ...]
    answer_mode: str
    limit: int | None
    batch_size: int
    prompt_buckets: tuple[int, ...]  # batch widths; () = multiples of the encoder's pad_to
    max_new_tokens: int
    t2t_message_tokens: int
    use_cot: bool
    latency_items: int
    fusers: tuple[str, ...]
    sharers: tuple[str, ...]  # sharer model paths: one per fuser, or just the default sharer
    background_prompt: str
    output_dir: Path
    seed: int  # the noise control's and the bootstrap's


def split_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def parse_settings(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None) -> EvalSettings:
    """Validates `config.eval`; raises ValueError with the valid choices on any bad field."""
    e = config.eval
    benchmarks = split_list(e.benchmarks)
    if not benchmarks:
        raise ValueError(f"eval.benchmarks is empty; choose from {', '.join(BENCHMARKS)}")
    if len(set(benchmarks)) != len(benchmarks):
        raise ValueError(f"eval.benchmarks lists a benchmark twice: {','.join(benchmarks)}")
    methods = split_list(e.methods)
    if not methods:
        raise ValueError(f"eval.methods is empty; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)} in eval.methods; valid: {', '.join(METHODS)}")
    if len(set(methods)) != len(methods):
        raise ValueError(f"eval.methods lists a method twice: {','.join(methods)}")
    if e.answer_mode not in ANSWER_MODES:
        raise ValueError(f"unknown eval.answer_mode {e.answer_mode!r}; valid: {', '.join(ANSWER_MODES)}")
    sources = split_list(e.source) or ["offline"]
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
    fusers = split_list(e.fuser)
    sharers = split_list(e.sharers)
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
    try:
        prompt_buckets = tuple(int(b) for b in split_list(e.prompt_buckets))
    except ValueError:
        raise ValueError(f"eval.prompt_buckets must be token counts, e.g. 256,512; got {e.prompt_buckets!r}") from None
    if any(b < 1 for b in prompt_buckets):
        raise ValueError(f"eval.prompt_buckets must be positive token counts; got {e.prompt_buckets!r}")
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
        limit=int(e.limit) or None, batch_size=int(e.batch_size), prompt_buckets=prompt_buckets,
        max_new_tokens=int(e.max_new_tokens),
        t2t_message_tokens=t2t_message_tokens, use_cot=bool(e.use_cot), latency_items=latency_items,
        fusers=tuple(fusers), sharers=tuple(sharers), background_prompt=background_prompt,
        output_dir=output_dir.expanduser(), seed=int(config.seed))


