"""Fused inference's jitted programs and the text-in, text-out `Generator` around them.

The model's work (prefill, fuse, finish the prompt, decode-time fusion) is `c2c.model.C2CModel`'s;
the prompts are `c2c.prompt.PromptEncoder`'s; decoding is `infer.decode`'s.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from c2c_jax.c2c.controls import FusionControl
from c2c_jax.c2c.model import C2CModel, LockstepCaches
from c2c_jax.c2c.prompt import PromptBatch, PromptEncoder
from c2c_jax.infer.decode import Generation, SamplingConfig, decode
from c2c_jax.models.kv_cache import decode_capacity

class InferencePrograms:
    """Fused inference's jitted programs for one `C2CModel` structure (its graphdef); each call takes its state.

    The programs close over the model's graphdef instead of taking it as a static argument, which
    every call would hash and compare: 0.16 ms per program for Qwen3-0.6B <- Qwen2.5-0.5B on a
    2-core CPU host, against a time to first token of a few milliseconds.

    Every route is two programs: the prompt's cache (`C2CModel.prompt_cache`, fused unless
    `fuse=False`), then the last prompt token (`finish_prompt`) and any decoding. C2C's last token
    waits for the fusion of every layer anyway, and on a GPU the host starts the second program's
    CUDA graph while the GPU still runs the first: on an H200 that took a 512-token C2C time to
    first token from 7.23 to 6.57 ms. Receiver-only takes the same cut, so that with closed gates
    both routes compile the last token alike and give bit-identical logits (in one program XLA may
    round it differently); the cut costs it nothing measurable (4.46 ms against 4.58 ms as one
    program, same H200).
    """

    def __init__(self, graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh | None = None):
        """graphdef: `nnx.split(c2c_model)[0]`.

        mesh: None (one device), or the devices that share each batch (its rows split over the
        mesh's batch axes, weights replicated): the programs trace under it, so the attention
        kernels run per device, and the logits and generations come back replicated, which every
        process of a multi-host slice can read.
        """
        self.graphdef = graphdef
        self.mesh = mesh
        replicated = {} if mesh is None else dict(out_shardings=NamedSharding(mesh, P()))
        self._prompt_cache = jax.jit(self._prompt_cache_program, static_argnames=("fuse", "suffix_length"))
        # Controls are pytrees (their kind static), so each kind compiles once.
        self._logits = jax.jit(self._logits_program, static_argnames=("suffix_length",), **replicated)
        self._generate = jax.jit(self._generate_program, static_argnames=("sampling", "eos_ids", "pad_id", "stream"),
                                 **replicated)
        self._sink = None  # where a streaming program's tokens go (`stream`)
        self._streaming = threading.Lock()
        self._variants = jax.jit(self._variants_program, static_argnames=("suffix_length", "receiver_only"),
                                 **replicated)

    def _under_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.sharding.use_abstract_mesh(
            self.mesh.abstract_mesh)

    def variant_logits(self, state, batch: PromptBatch, controls: tuple, *, suffix_length: int,
                       receiver_only: bool) -> jax.Array:
        """float32 [variants, B, vocab]: the receiver alone (first, if `receiver_only`), then one fused
        route per entry of `controls` (None: the fusers' own inputs), all from one pass of the receiver
        and the sharers over the prompt. Evaluation compares them on the same items at this cost."""
        return self._variants(state, batch, controls, suffix_length=suffix_length, receiver_only=receiver_only)

    def _variants_program(self, state, batch, controls, *, suffix_length, receiver_only):
        with self._under_mesh():
            model = nnx.merge(self.graphdef, state)
            width = batch.tokens.shape[1]
            prefix = batch.prefix(suffix_length)
            receiver_cache, sharer_caches = model.prefill_kv(prefix)
            variants = ([([], None)] if receiver_only else []) + [(sharer_caches, c) for c in controls]
            logits = []
            for sharers, control in variants:
                if logits:
                    # One variant at a time: its inputs wait for the previous variant's logits, so XLA
                    # cannot schedule several fusions side by side, each holding its fused cache and the
                    # fuser's activations (memory would grow with the number of controls).
                    _, receiver_cache, sharers = jax.lax.optimization_barrier((logits[-1], receiver_cache, sharers))
                cache = model.fused_prefix(batch, prefix, receiver_cache, sharers, suffix_length=suffix_length,
                                           control=control)
                logits.append(model.finish_prompt(batch, cache, width, suffix_length=suffix_length)[0])
            return jnp.stack(logits)

    def next_token_logits(self, state, batch: PromptBatch, *, fuse: bool = True, suffix_length: int = 1,
                          control: FusionControl | None = None) -> jax.Array:
        """float32 [B, vocab] logits after each prompt (the time to first token's work)."""
        cache = self._prompt_cache(state, batch, control, fuse=fuse, suffix_length=suffix_length)
        return self._logits(state, batch, cache, suffix_length=suffix_length)

    def generate(self, state, batch: PromptBatch, key, *, sampling: SamplingConfig, eos_ids: tuple[int, ...],
                 pad_id: int, fuse: bool = True, control: FusionControl | None = None) -> Generation:
        cache = self._prompt_cache(state, batch, control, fuse=fuse, suffix_length=1)
        return self._generate(state, batch, cache, key, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                              stream=False)

    def stream(self, state, batch: PromptBatch, key, *, sampling: SamplingConfig, eos_ids: tuple[int, ...],
               pad_id: int, fuse: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`generate`'s tokens as the device samples them: (tokens [B], new [B]) per step.

        A program of its own, with a host callback per step; `generate`'s has none, so streaming
        costs the non-streaming route nothing. One stream at a time per `InferencePrograms`.
        """
        if not self._streaming.acquire(blocking=False):
            raise RuntimeError("another stream of these inference programs is still running; finish it first")
        steps: queue.Queue = queue.Queue()
        out = None
        try:
            self._sink = lambda tokens, new: steps.put((np.asarray(tokens), np.asarray(new)))
            cache = self._prompt_cache(state, batch, None, fuse=fuse, suffix_length=1)
            out = self._generate(state, batch, cache, key, sampling=sampling, eos_ids=eos_ids, pad_id=pad_id,
                                 stream=True)
            while True:  # the program runs on while the host reads its steps
                try:
                    yield steps.get(timeout=0.005)
                except queue.Empty:
                    if out.lengths.is_ready() and steps.empty():  # every callback has returned
                        break
            jax.block_until_ready(out)  # raises what the program raised
        finally:
            if out is not None:  # a reader that stopped early: let the program finish into this stream's queue
                jax.block_until_ready(out)
            self._sink = None
            self._streaming.release()

    def _emit(self, tokens, new):
        self._sink(tokens, new)

    def _prompt_cache_program(self, state, batch, control, *, fuse, suffix_length):
        with self._under_mesh():
            return nnx.merge(self.graphdef, state).prompt_cache(batch, fuse=fuse, suffix_length=suffix_length,
                                                                control=control)

    def _logits_program(self, state, batch, cache, *, suffix_length):
        with self._under_mesh():
            logits, _ = nnx.merge(self.graphdef, state).finish_prompt(batch, cache, batch.tokens.shape[1],
                                                                       suffix_length=suffix_length)
        return logits

    def _generate_program(self, state, batch, cache, key, *, sampling, eos_ids, pad_id, stream):
        with self._under_mesh():
            model = nnx.merge(self.graphdef, state)
            capacity = decode_capacity(batch.tokens.shape[1] + sampling.max_new_tokens, model.receiver.platform)
            logits, cache = model.finish_prompt(batch, cache, capacity)
            step = model.decode_step(batch) if isinstance(cache, LockstepCaches) else None
            return decode(model.receiver, logits, cache, batch.positions[:, -1] + 1, key, sampling, eos_ids, pad_id,
                          step=step, on_token=self._emit if stream else None)


class Generator:
    """Text in, text out: receiver-only or C2C generation over batches of chats."""

    def __init__(self, model: C2CModel, encoder: PromptEncoder, *, eos_ids: Sequence[int] | None = None,
                 mesh: jax.sharding.Mesh | None = None):
        """mesh: None (one device), or the devices (of every process) that share each batch: the
        weights are replicated on all of them and a batch's rows split over them (a batch is
        filled up to a multiple of the mesh's size with copies of its last row)."""
        self.model = model
        self.encoder = encoder
        self.mesh = mesh
        graphdef, self.state = nnx.split(model)
        if mesh is not None:
            self.state = jax.device_put(self.state, NamedSharding(mesh, P()))
        self.programs = InferencePrograms(graphdef, mesh)
        tok = encoder.receiver_tokenizer
        if eos_ids is None:
            eos_ids = set(model.receiver.config.eos_token_ids)
            eos_ids.update(i for i in (tok.eos_token_id,) if i is not None)
            im_end = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
            eos_ids.update(i for i in (im_end,) if i is not None)
        self.eos_ids = tuple(sorted(int(i) for i in eos_ids))

    def generate_batch(self, batch: PromptBatch, sampling: SamplingConfig, *, fuse: bool = True,
                       seed: int = 0, control: FusionControl | None = None) -> Generation:
        self._check_fits(batch, sampling)
        return self.programs.generate(self.state, self.placed(batch), jax.random.key(seed), sampling=sampling,
                                      eos_ids=self.eos_ids, pad_id=self.encoder.pad_id, fuse=fuse, control=control)

    def _check_fits(self, batch: PromptBatch, sampling: SamplingConfig) -> None:
        max_len = self.model.receiver.config.max_position_embeddings
        if batch.tokens.shape[1] + sampling.max_new_tokens > max_len:
            raise ValueError(f"prompt width {batch.tokens.shape[1]} + max_new_tokens {sampling.max_new_tokens} "
                             f"exceeds the receiver's context of {max_len} tokens")

    def next_token_logits(self, batch: PromptBatch, *, fuse: bool = True, suffix_length: int = 1,
                          control: FusionControl | None = None) -> jax.Array:
        """float32 [B, vocab] logits after each prompt: the first-token prediction (time to first token).
        `control`: an evaluation control for the fusers' inputs (`controls.FusionControl`)."""
        return self.programs.next_token_logits(self.state, self.placed(batch), fuse=fuse, suffix_length=suffix_length,
                                               control=control)

    def variant_logits(self, batch: PromptBatch, controls: Sequence[FusionControl | None], *, suffix_length: int = 1,
                       receiver_only: bool = False) -> jax.Array:
        """float32 [variants, B, vocab]: `InferencePrograms.variant_logits` (receiver alone and fused
        variants from one prefill)."""
        return self.programs.variant_logits(self.state, self.placed(batch), tuple(controls),
                                            suffix_length=suffix_length, receiver_only=receiver_only)

    def placed(self, batch: PromptBatch) -> PromptBatch:
        """The batch on the mesh, its rows split over all its devices (rows past the batch's own are
        copies of its last, so that every device gets whole rows); unchanged without a mesh."""
        if self.mesh is None:
            return batch
        rows = batch.tokens.shape[0]
        filled = -(-rows // self.mesh.size) * self.mesh.size
        from c2c_jax.sharding import batch_sharding

        def put(x):
            x = np.asarray(x)
            x = np.concatenate([x, np.repeat(x[-1:], filled - rows, axis=0)]) if filled > rows else x
            # Every process holds the same batch; each device takes its rows from it.
            return jax.make_array_from_callback(x.shape, batch_sharding(self.mesh, x.ndim, 0), lambda index: x[index])

        return jax.tree.map(put, batch)

    def stream_chat(self, conversations: Sequence[list[dict]], sampling: SamplingConfig = SamplingConfig(), *,
                    fuse: bool = True, seed: int = 0) -> Iterator[list[str]]:
        """`chat`'s answers as they decode: per step, one new piece of text per conversation ("" when
        a row has nothing new). Joined, a row's pieces are its `chat` answer before stripping."""
        batch = self.encoder.batch([self.encoder.encode_chat(c) for c in conversations])
        self._check_fits(batch, sampling)
        texts = [IncrementalText(self.encoder.receiver_tokenizer) for _ in conversations]
        for tokens, new in self.programs.stream(self.state, self.placed(batch), jax.random.key(seed), sampling=sampling,
                                                eos_ids=self.eos_ids, pad_id=self.encoder.pad_id, fuse=fuse):
            yield [text.add(int(t)) if n else "" for text, t, n in zip(texts, tokens, new)]
        tail = [text.flush() for text in texts]
        if any(tail):
            yield tail

    def chat(self, conversations: Sequence[list[dict]], sampling: SamplingConfig = SamplingConfig(), *,
             fuse: bool = True, seed: int = 0) -> list[str]:
        """One answer per conversation (a list of {"role", "content"} messages)."""
        batch = self.encoder.batch([self.encoder.encode_chat(c) for c in conversations])
        out = jax.device_get(self.generate_batch(batch, sampling, fuse=fuse, seed=seed))
        tok = self.encoder.receiver_tokenizer
        return [tok.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True).strip()
                for r in range(len(conversations))]


class IncrementalText:
    """One row's text, token by token: each `add` returns the text the new token completes.

    Decoding the whole row each time keeps tokenizers' merging of pieces (spaces, byte-level
    tokens) exact; text ending in an incomplete character (U+FFFD) waits for the next token.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.shown = text[self.shown:], len(text)
        return piece
