"""c2c-jax as an lm-evaluation-harness model, so that any harness task runs on the receiver alone or fused.

    pip install 'c2c-jax[lm_eval]'
    lm_eval --model c2c-jax --model_args config=configs/demo.py,fuser=runs/demo/final,route=c2c --tasks arc_easy

(`import c2c_jax.evaluate.lm_eval_adapter` registers the model; the `lm_eval` command line needs the import, see
`python -m c2c_jax.evaluate.lm_eval_adapter`, which is `lm_eval`'s own CLI with the model registered.)

Routes: `route=receiver` is the receiver alone; `route=c2c` (needs `fuser=`) fuses the sharer's cache of
the request's context into the receiver's, as C2C does for a prompt:

* loglikelihood(context, continuation): the context's columns but its last token are fused; the last
  context token and the continuation run on the fused cache (as an answer after a fused prompt), and the
  continuation's log-probability is summed over its tokens. Tokens are split as the harness's own HF
  model does: the continuation is what encoding context + continuation adds to the context's encoding.
* loglikelihood_rolling(text): the harness's disjoint rolling windows over the text, each scored as a
  loglikelihood request (the first window's context is the end-of-text token).
* generate_until(context, gen_kwargs): greedy (or sampled with `do_sample`/`temperature`) decoding of up
  to `max_gen_toks` tokens after the fused context, cut at the first `until` string.

Requests are grouped by continuation length and batched by width (`batch_size`, default 8).
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("c2c_jax.evaluate.lm_eval_adapter needs lm-evaluation-harness: "
                      "pip install 'c2c-jax[lm_eval]'") from error

from c2c_jax.c2c.prompt import PromptBatch
from c2c_jax.infer.decode import SamplingConfig
from c2c_jax.infer.generator import Generator

ROUTES = ("receiver", "c2c")


class _ScoringProgram:
    """log p(targets) of a prompt's last `suffix_length` columns, after fusing the columns before them."""

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef = graphdef
        self._run = jax.jit(self._program, static_argnames=("fuse", "suffix_length"))

    def __call__(self, state, batch: PromptBatch, targets, *, fuse: bool, suffix_length: int):
        return self._run(state, batch, targets, fuse=fuse, suffix_length=suffix_length)

    def _program(self, state, batch, targets, *, fuse, suffix_length):
        model = nnx.merge(self.graphdef, state)
        width = batch.tokens.shape[1]
        cache = model.prompt_cache(batch, fuse=fuse, suffix_length=suffix_length)
        suffix = slice(width - suffix_length, width)
        hidden, _ = model.receiver(batch.tokens[:, suffix], batch.positions[:, suffix], cache.with_capacity(width),
                                   batch.valid[:, suffix], output="hidden")
        logits = model.receiver.logits(hidden)  # float32 [B, suffix, vocab]
        logprobs = jax.nn.log_softmax(logits, axis=-1)
        target_logprobs = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
        greedy = jnp.all(jnp.argmax(logits, axis=-1) == targets, axis=-1)
        return target_logprobs.sum(axis=-1), greedy


@register_model("c2c-jax", "c2c_jax")
class C2CHarnessModel(LM):
    """A `Generator` (receiver alone, or receiver + sharer(s) + fuser(s)) answering harness requests."""

    def __init__(self, config: str | None = None, fuser: str = "", route: str = "c2c", batch_size: int | str = 8,
                 max_gen_toks: int = 256, *, generator: Generator | None = None):
        super().__init__()
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; choose one of {', '.join(ROUTES)}")
        if generator is None:
            if not config:
                raise ValueError("c2c-jax needs config=<configs/*.py> (and fuser=<directory> for route=c2c)")
            if route == "c2c" and not fuser:
                raise ValueError("route=c2c needs fuser=<fuser directory>; use route=receiver for the receiver alone")
            generator = _load_generator(config, fuser if route == "c2c" else "")
        elif route == "c2c" and not generator.model.fusers:
            raise ValueError("route=c2c needs a generator with at least one fuser")
        self.generator = generator
        self.fuse = route == "c2c"
        self.batch_size = int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.tokenizer = generator.encoder.receiver_tokenizer
        self.max_length = generator.model.receiver.config.max_position_embeddings
        if self.fuse:
            self.max_length = min([self.max_length] + [s.config.max_position_embeddings
                                                       for s in generator.model.sharers])
        self._scoring = _ScoringProgram(nnx.split(generator.model)[0])

    # -- tokens ----------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @property
    def _prefix_token(self) -> int:
        for token in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id):
            if token is not None:
                return int(token)
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start a rolling window with")

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as the harness's HF model splits them."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # a trailing space of the context belongs to the continuation's first token
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        context_ids = self._encode(context)
        if not context_ids:
            context_ids = [self._prefix_token]
            whole = context_ids + whole
        return context_ids, whole[len(context_ids):]

    # -- scoring ---------------------------------------------------------------------------------

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), greedy) per (context ids, continuation ids)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for i, (context, continuation) in enumerate(pairs):
            if not continuation:
                out[i] = (0.0, True)
            elif len(context) + len(continuation) - 1 > self.max_length:
                raise ValueError(f"request {i}: {len(context)} context + {len(continuation)} continuation tokens "
                                 f"exceed the context of {self.max_length} tokens")
        order = sorted((i for i in range(len(pairs)) if out[i] is None),
                       key=lambda i: (len(pairs[i][1]), len(pairs[i][0])))
        encoder = self.generator.encoder
        while order:
            n = len(pairs[order[0]][1])
            chunk = [i for i in order[: self.batch_size] if len(pairs[i][1]) == n]
            order = order[len(chunk):]
            # Inputs: context + continuation minus its last token; the last n columns predict the continuation.
            rows = [np.asarray(pairs[i][0] + pairs[i][1][:-1], np.int32) for i in chunk]
            rows += [rows[-1]] * (self.batch_size - len(rows))  # one batch shape per width bucket
            longest = max(len(r) for r in rows)
            width = min(encoder.padded_width(longest), self.max_length)
            if width - n < 1:  # the fused prefix needs a column: one more column of left padding
                width = n + 1
            batch = encoder.batch([encoder.encode_ids(r) for r in rows], width=width)
            targets = np.asarray([pairs[i][1] for i in chunk] + [pairs[chunk[-1]][1]] * (self.batch_size - len(chunk)),
                                 np.int32)
            logprobs, greedy = jax.device_get(self._scoring(self.generator.state, batch, jnp.asarray(targets),
                                                            fuse=self.fuse, suffix_length=n))
            for row, i in enumerate(chunk):
                out[i] = (float(logprobs[row]), bool(greedy[row]))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score([self._split(*req.args) for req in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        totals = []
        for req in requests:
            (text,) = req.args
            windows = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=self._prefix_token, max_seq_len=self.max_length,
                context_len=1)]
            totals.append(sum(score for score, _ in self._score([(list(c), list(t)) for c, t in windows])))
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        encoder = self.generator.encoder
        for req in requests:
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            ids = np.asarray(self._encode(context) or [self._prefix_token], np.int32)
            if len(ids) + max_new > self.max_length:
                ids = ids[-(self.max_length - max_new):]  # keep the end of an over-long context, as the harness does
            if len(ids) < 2:  # the fused prefix needs a column before the last token
                ids = np.concatenate([[self._prefix_token], ids]).astype(np.int32)
            batch = encoder.batch([encoder.encode_ids(ids)])
            generation = jax.device_get(self.generator.generate_batch(
                batch, SamplingConfig(max_new_tokens=max_new, temperature=temperature), fuse=self.fuse))
            text = self.tokenizer.decode(generation.tokens[0, : generation.lengths[0]], skip_special_tokens=True)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            out.append(text[: min(cuts)] if cuts else text)
        return out


def _load_generator(config_path: str, fuser: str) -> Generator:
    import importlib.util

    from c2c_jax.build import load_generator

    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"config {config_path!r}: no such file (give a configs/*.py path)")
    spec = importlib.util.spec_from_file_location("_c2c_harness_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return load_generator(module.get_config(), fuser)


def main() -> None:
    """`lm_eval`'s command line with the c2c-jax model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
