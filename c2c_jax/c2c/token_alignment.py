"""Token alignment between a receiver and a sharer tokenizer (docs/upstream_reference.md §3).

C2C fuses the sharer's KV-cache into the receiver's position by position, so the sharer must be fed
exactly one token per receiver token. The receiver tokenisation is the master:

* `TokenAligner.map_token` maps one receiver token to one sharer token (decode it, re-encode it with
  the sharer, keep one piece: the first, or the longest);
* `TokenAligner.align_chat` renders a chat with each model's OWN chat template, keeps the template
  tokens of both models verbatim (the shorter one right-padded with its own pad id) and maps the
  message-content tokens of the receiver with `map_token`. Only message tokens are fused by C2C.

Pairs that share a vocabulary (`tokenizers_compatible`, e.g. Qwen2.5 / Qwen3) need none of this:
feed the receiver ids to the sharer directly.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

STRATEGIES = ("first", "longest")
_TEMPLATE, _MESSAGE = "template", "message"
# Role lookup order for special tokens: when the receiver pads with eos (no pad of its own), the
# shared id is treated as eos, the more meaningful role.
_ROLES = ("eos", "bos", "unk", "pad")


def pad_id_of(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad, else eos, else 0."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def tokenizers_compatible(receiver_tok, sharer_tok) -> bool:
    """True when receiver ids can be fed to the sharer unchanged (no alignment needed).

    Every (token string -> id) pair with id below the smaller vocab size must agree in both
    directions; ids past that size are only added by the larger tokenizer (Qwen3's <think> tags
    on top of Qwen2.5's vocab), which does not make the pair incompatible.
    """
    if receiver_tok is sharer_tok:
        return True
    r_vocab, s_vocab = receiver_tok.get_vocab(), sharer_tok.get_vocab()
    n = min(len(receiver_tok), len(sharer_tok))

    def agrees(a: dict, b: dict) -> bool:
        return all(b.get(tok) == i for tok, i in a.items() if i < n)

    return agrees(r_vocab, s_vocab) and agrees(s_vocab, r_vocab)


@dataclasses.dataclass(frozen=True)
class AlignedChat:
    """One chat, tokenised for both models with identical length N (position i <-> position i)."""

    receiver_ids: np.ndarray  # int32 [N]
    sharer_ids: np.ndarray  # int32 [N]
    message_mask: np.ndarray  # bool [N]; True on message-content tokens (the only ones C2C fuses)
    receiver_valid: np.ndarray  # bool [N]; False where a pad was inserted into the receiver sequence
    sharer_valid: np.ndarray  # bool [N]; False where a pad was inserted into the sharer sequence
    sections: tuple  # ((start, end, "template"|"message"), ...) tiling [0, N)


def _role_ids(tok) -> dict:
    ids = {role: getattr(tok, f"{role}_token_id") for role in _ROLES}
    if ids["pad"] is None:  # pad falls back to eos, without touching the caller's tokenizer
        ids["pad"] = ids["eos"]
    return ids


def _decode_one(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


class TokenAligner:
    """Maps receiver tokens to sharer tokens and aligns chats (reference `rosetta/model/aligner.py`)."""

    def __init__(self, receiver_tok, sharer_tok, strategy: str = "first"):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown alignment strategy {strategy!r}; allowed values: {', '.join(STRATEGIES)}")
        self.receiver_tok = receiver_tok
        self.sharer_tok = sharer_tok
        self.strategy = strategy
        self._receiver_roles = _role_ids(receiver_tok)
        self._sharer_roles = _role_ids(sharer_tok)
        self._sharer_unk = sharer_tok.unk_token_id if sharer_tok.unk_token_id is not None else 0
        self._sharer_vocab = sharer_tok.get_vocab()
        # Named special tokens plus added tokens flagged special (e.g. Llama-3's header tokens, which
        # are not listed in all_special_ids): their text must not be re-encoded piece by piece.
        self._receiver_special = set(receiver_tok.all_special_ids) | {
            i for i, t in receiver_tok.added_tokens_decoder.items() if t.special
        }
        self._cache: dict[int, int] = {}  # the mapping is context free, so cache per id

    # ------------------------------------------------------------------ per-token mapping
    def map_token(self, receiver_id: int) -> int:
        """The sharer token standing in for one receiver token (§3 per-token mapping)."""
        receiver_id = int(receiver_id)
        sharer_id = self._cache.get(receiver_id)
        if sharer_id is None:
            sharer_id = self._cache[receiver_id] = self._map_uncached(receiver_id)
        return sharer_id

    def map_ids(self, receiver_ids) -> np.ndarray:
        """`map_token` over an array of receiver ids (any shape), as int32."""
        ids = np.asarray(receiver_ids)
        mapped = [self.map_token(i) for i in ids.reshape(-1).tolist()]
        return np.asarray(mapped, dtype=np.int32).reshape(ids.shape)

    def _map_uncached(self, receiver_id: int) -> int:
        if receiver_id in self._receiver_special:
            return self._map_special(receiver_id)
        text = _decode_one(self.receiver_tok, receiver_id)
        pieces = self.sharer_tok.encode(text, add_special_tokens=False)
        if not pieces:  # e.g. characters the sharer cannot represent and silently drops
            return self._sharer_unk
        if len(pieces) == 1 or self.strategy == "first":
            return pieces[0]
        # "longest": the piece with the longest decoded string, first one on ties. The other pieces
        # are dropped (lossy by design: one sharer token per receiver token).
        lengths = [len(_decode_one(self.sharer_tok, p)) for p in pieces]
        return pieces[lengths.index(max(lengths))]

    def _map_special(self, receiver_id: int) -> int:
        for role in _ROLES:
            if self._receiver_roles[role] == receiver_id and self._sharer_roles[role] is not None:
                return self._sharer_roles[role]
        # Same special-token text in the sharer vocab (e.g. both use <|im_start|>), else unk.
        sharer_id = self._sharer_vocab.get(self.receiver_tok.convert_ids_to_tokens(receiver_id))
        return sharer_id if sharer_id is not None else self._sharer_unk

    # ------------------------------------------------------------------ chat alignment
    def align_chat(
        self,
        messages: list[dict],
        *,
        add_generation_prompt: bool,
        enable_thinking: bool = False,
        continue_final_message: bool = False,
    ) -> AlignedChat:
        """Align one chat rendered by both models' own chat templates (§3 chat-message alignment).

        Sections alternate template / message. Template sections keep both models' own tokens and
        right-pad the shorter one with its pad id (eos when it has none); message sections keep the
        receiver tokens and map each with `map_token`.

        Boundary rule: a token that overlaps any character of a message's content is a message token,
        even if it also covers template characters (so the receiver never loses message text; a
        sharer token straddling the boundary is replaced by mapped receiver tokens). A token
        overlapping two contents belongs to the earlier message. A message whose content falls into
        no receiver token is merged into the surrounding template (both models). Messages whose
        content is not a non-blank string (None, content-block lists) are template text.
        """
        render = dict(
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            continue_final_message=continue_final_message,
        )
        r_text, r_ids, r_offsets = _render_chat(self.receiver_tok, "receiver", messages, **render)
        s_text, s_ids, s_offsets = _render_chat(self.sharer_tok, "sharer", messages, **render)

        contents = [
            (k, m["content"])
            for k, m in enumerate(messages)
            if isinstance(m.get("content"), str) and m["content"].strip()
        ]
        r_ranges = _token_ranges(r_offsets, _find_spans(r_text, contents, messages, "receiver"))
        s_ranges = _token_ranges(s_offsets, _find_spans(s_text, contents, messages, "sharer"))

        out = _Builder(self)
        r_prev = s_prev = 0
        for (r_start, r_end), (s_start, s_end) in zip(r_ranges, s_ranges):
            if r_start == r_end:
                continue  # no receiver token carries this content: leave it inside the template
            out.template(r_ids[r_prev:r_start], s_ids[s_prev:s_start])
            out.message(r_ids[r_start:r_end])
            r_prev, s_prev = r_end, s_end
        out.template(r_ids[r_prev:], s_ids[s_prev:])
        return out.build()


class _Builder:
    """Accumulates aligned sections."""

    def __init__(self, aligner: TokenAligner):
        self.aligner = aligner
        self.r_ids, self.s_ids, self.mask, self.r_valid, self.s_valid = [], [], [], [], []
        self.sections = []

    def _pad_id(self, side: str) -> int:
        pad = (self.aligner._receiver_roles if side == "receiver" else self.aligner._sharer_roles)["pad"]
        if pad is None:
            raise ValueError(f"the {side} tokenizer has neither a pad nor an eos token to pad template sections with")
        return pad

    def _add(self, r_ids, s_ids, r_valid, s_valid, kind):
        start = len(self.r_ids)
        self.r_ids += r_ids
        self.s_ids += s_ids
        self.r_valid += r_valid
        self.s_valid += s_valid
        self.mask += [kind == _MESSAGE] * len(r_ids)
        self.sections.append((start, len(self.r_ids), kind))

    def template(self, r_ids: list, s_ids: list):
        n = max(len(r_ids), len(s_ids))
        if n == 0:
            return
        r_pad, s_pad = n - len(r_ids), n - len(s_ids)
        self._add(
            list(r_ids) + [self._pad_id("receiver")] * r_pad if r_pad else list(r_ids),
            list(s_ids) + [self._pad_id("sharer")] * s_pad if s_pad else list(s_ids),
            [True] * len(r_ids) + [False] * r_pad,
            [True] * len(s_ids) + [False] * s_pad,
            _TEMPLATE,
        )

    def message(self, r_ids: list):
        s_ids = [self.aligner.map_token(i) for i in r_ids]
        self._add(list(r_ids), s_ids, [True] * len(r_ids), [True] * len(r_ids), _MESSAGE)

    def build(self) -> AlignedChat:
        return AlignedChat(
            receiver_ids=np.asarray(self.r_ids, dtype=np.int32),
            sharer_ids=np.asarray(self.s_ids, dtype=np.int32),
            message_mask=np.asarray(self.mask, dtype=bool),
            receiver_valid=np.asarray(self.r_valid, dtype=bool),
            sharer_valid=np.asarray(self.s_valid, dtype=bool),
            sections=tuple(self.sections),
        )


def _render_chat(tok, side: str, messages, *, add_generation_prompt, enable_thinking, continue_final_message):
    """Render `messages` with the tokenizer's own template; return (text, ids, char offsets)."""
    if not getattr(tok, "chat_template", None):
        raise ValueError(f"the {side} tokenizer has no chat template; align_chat needs one for each model")
    template = tok.get_chat_template()
    # Only templates that read `enable_thinking` get it (Qwen3 renders an empty think block for False).
    extra = {"enable_thinking": enable_thinking} if "enable_thinking" in template else {}
    text = tok.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        **extra,
    )
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _candidates(text: str, content: str, lo: int, hi: int) -> list:
    """Spans of `content` inside text[lo:hi], most plausible first.

    A real message content is normally followed by a special token ("<") or ends the text; templates
    that trim the content (Llama-3's `| trim`) are covered by also trying the stripped content.
    """
    preferred, others = [], []
    for needle in dict.fromkeys((content, content.strip())):
        i = text.find(needle, lo, hi)
        while i >= 0:
            end = i + len(needle)
            (preferred if end == len(text) or text[end] == "<" else others).append((i, end))
            i = text.find(needle, i + 1, hi)
    return preferred + others


def _find_spans(text: str, contents: Sequence, messages, side: str) -> list:
    """Char span of each content in `text`, in message order, never overlapping.

    A backward pass places every message as late as possible, which bounds where each message may
    end while still leaving room for all later ones; the forward pass then takes the most plausible
    candidate within those bounds (plain sequential search could bind a short content to a later
    message's text and then fail).
    """
    latest = [len(text)] * (len(contents) + 1)  # latest[j]: max start of message j over feasible placements
    for j in range(len(contents) - 1, -1, -1):
        k, content = contents[j]
        starts = [text.rfind(n, 0, latest[j + 1]) for n in dict.fromkeys((content, content.strip()))]
        if max(starts) < 0:
            role = messages[k].get("role", "?")
            raise ValueError(
                f"message {k} ({role}: {content[:40]!r}) was not found, in order, in the {side}'s rendered "
                "chat template; the template must render every message content verbatim"
            )
        latest[j] = max(starts)
    spans, pos = [], 0
    for j, (_, content) in enumerate(contents):
        span = _candidates(text, content, pos, latest[j + 1])[0]  # non-empty: the backward pass found one
        spans.append(span)
        pos = span[1]
    return spans


def _token_ranges(offsets: list, spans: list) -> list:
    """Token range [start, end) of each char span: the tokens overlapping it (see the boundary rule)."""
    ranges, t, n = [], 0, len(offsets)
    for s, e in spans:
        while t < n and offsets[t][1] <= s:  # ends before the content starts
            t += 1
        start = t
        while t < n and offsets[t][0] < e:  # starts before the content ends
            t += 1
        ranges.append((start, t))
    return ranges


