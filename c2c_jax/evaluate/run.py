"""Multiple-choice evaluation: receiver, sharer, text-to-text and C2C side by side on the same items.

    python -m c2c_jax.evaluate --config=configs/qwen.py --config.eval.fuser=PATH [--workdir=DIR]

Everything is driven by `config.eval` (see `c2c_jax/config.py`); `evaluate(config, workdir)` does the
work and returns the summary, so notebooks and tests call it directly. Protocol (docs/upstream_reference.md §5):

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
  and the controls, the same fusers fed inputs without the prompt's sharer content (c2c_jax/c2c/controls.py),
  and one ablation:
    c2c_mismatched         each item reads the sharer cache of another item of its batch (items are
                           batched by length, so a neighbour in length; a cyclic shift within the batch);
    c2c_zero, c2c_noise    the sharer's K/V replaced by zeros / by Gaussian noise of the cache's
                           per-layer, per-head mean and variance (seeded by `config.seed`);
    c2c_no_receiver_input  the projectors read zeros in place of the receiver's K/V (the sharer-only
                           projection; not for a fuser whose ablation reads no receiver anyway). It
                           keeps the sharer's content: it measures what the fuser takes from the
                           receiver's own cache.
    A gain of c2c over the receiver that a control matches is a format effect, not the sharer's content.
    In logits mode the receiver alone, c2c and the controls are scored from one prefill per batch
    (`SharedPrefill`); each control then adds a fusion and the answer prefix's columns.
* answer modes (`eval.answer_mode`):
    generate  the MC prompt as one user message, chat template with the generation prompt and thinking
              off, greedy `eval.max_new_tokens`, then `scoring.extract_answer`;
    logits    (§5.4) the answer prefix "The correct answer is" is appended as an open assistant turn;
              everything before it is fused; the prediction is the argmax of the option letters'
              logits (" A", " B", ...: first token id, leading space) at the last position.
* items whose prompt does not fit a model's context are skipped for every method (so all methods are
  scored on the same items), with the reason; so are the benchmark's own unscorable items.
* latency: batch size 1, device-synchronised, on the first `eval.latency_items` scored items of each
  benchmark, each measured after an identical warm-up call (compilation excluded). TTFT = prefill
  through the first answer token's logits; total = the whole answer. Text-to-text counts both stages
  and the detokenise/re-tokenise step between them.

Statistics (c2c_jax/evaluate/stats.py), per benchmark and method: accuracy with a 95% percentile bootstrap
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

import json
import logging
import os
import time

import jax
import ml_collections
import numpy as np

from c2c_jax.c2c.controls import CONTROL_METHODS
from c2c_jax.c2c.model import C2CModel
from c2c_jax.c2c.prompt import PromptEncoder
from c2c_jax.evaluate.benchmarks import Benchmark, load_benchmark
from c2c_jax.evaluate.methods import Route, SharedPrefill, SingleModel, TextToText
from c2c_jax.evaluate.report import results_markdown, summarise, write_csv, write_plots
from c2c_jax.evaluate.settings import FUSED_METHODS, EvalSettings, parse_settings
from c2c_jax.infer.generator import Generator

logger = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# Loading.


def evaluation_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
    """The devices every evaluation batch is split over: all of a TPU slice's chips (of every host),
    or of a multi-process launch; None (one device, as a single GPU or CPU runs) otherwise."""
    from c2c_jax import sharding

    if jax.device_count() > 1 and (jax.process_count() > 1 or jax.default_backend() == "tpu"):
        return sharding.make_mesh(config.mesh)
    return None


def _build_methods(config: ml_collections.ConfigDict, settings: EvalSettings, loaded: dict | None = None
                   ) -> tuple[dict, dict]:
    """{method: runner} and a description of the models, loading only what the methods need (each once;
    those in `loaded` not at all)."""
    from c2c_jax.build import load_frozen, prompt_encoder
    from c2c_jax.infer.fuser_io import load_any_fuser

    methods = settings.methods
    loaded = {} if loaded is None else loaded

    def load(path: str, dtype: str):
        return load_frozen(ml_collections.ConfigDict(dict(path=path, dtype=dtype)), loaded=loaded)

    def encoder(receiver_tok, sharer_toks=()) -> PromptEncoder:
        return prompt_encoder(config, receiver_tok, sharer_toks, enable_thinking=False)  # thinking off in eval

    mesh = evaluation_mesh(config)

    def single(name: str, model, tok) -> Route:
        return Route(name, Generator(C2CModel(model), encoder(tok), mesh=mesh), fuse=False,
                     context=model.config.max_position_embeddings, prompt_buckets=settings.prompt_buckets)

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
                              context=context, prompt_buckets=settings.prompt_buckets)

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


def evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None, *,
             loaded: dict | None = None) -> dict:
    """Runs `config.eval` and writes its outputs; returns the summary (also in `summary.json`).

    loaded: models already loaded (`build.load_frozen`), reused and added to."""
    settings = parse_settings(config, workdir)
    from c2c_jax.build import check_before_loading

    check_before_loading(config, list(zip(settings.fusers, settings.sharers)) if "c2c" in settings.methods else [])
    benches = [load_benchmark(name, source=source, limit=settings.limit)
               for name, source in zip(settings.benchmarks, settings.sources)]
    runners, models = _build_methods(config, settings, loaded)
    # In a multi-process launch every process runs the same batches, each on its share of the chips
    # (`evaluation_mesh`); one writes.
    writer = jax.process_index() == 0
    if writer:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
    per_bench = {}
    for bench in benches:
        per_bench[bench.name] = evaluate_benchmark(bench, runners, settings)
        summary = summarise(settings, models, per_bench, config)
        if writer:
            write_csv(settings.output_dir / f"{bench.name}.csv", per_bench[bench.name]["results"])
            # Rewritten after every benchmark, so a long run can be inspected (and survives a crash) midway.
            (settings.output_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
            (settings.output_dir / "results.md").write_text(results_markdown(summary))
    if writer:
        write_plots(summary, settings.output_dir)
        logger.info("wrote %s", settings.output_dir)
    logger.info("%s", summary["verdict"])
    return summary


