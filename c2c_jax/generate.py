"""Ask the receiver alone and the receiver with C2C, side by side.

    python -m c2c_jax.generate --config=configs/qwen.py --config.generate.fuser=runs/qwen/final \\
        --prompt="What is the boiling point of water at the top of Mount Everest?"
    python -m c2c_jax.generate --config=configs/qwen.py --config.generate.fuser=... --chat   # interactive

Answers are printed as they decode; --nostream answers all prompts as one batch instead.

The fuser may be one trained here (runs/.../final) or a published upstream one (a `final/`
directory with projector_{i}.pt files).
"""

from __future__ import annotations

import textwrap


def side_by_side(question: str, receiver_answer: str, c2c_answer: str, width: int = 100) -> str:
    wrap = lambda text: textwrap.indent(textwrap.fill(text, width - 4) or "(empty)", "    ")  # noqa: E731
    return (f"> {question}\n\n  receiver alone:\n{wrap(receiver_answer)}\n\n  receiver + C2C:\n{wrap(c2c_answer)}\n"
            + "-" * width)


def answer_prompts(generator, prompts, sampling) -> list[str]:
    """Side-by-side blocks for a batch of single-turn prompts."""
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    alone = generator.chat(conversations, sampling, fuse=False)
    fused = generator.chat(conversations, sampling, fuse=True)
    return [side_by_side(p, a, f) for p, a, f in zip(prompts, alone, fused)]


def stream_answer(generator, conversation, sampling, *, fuse: bool, write) -> str:
    """One answer, written piece by piece as it decodes (indented); returns it, stripped."""
    pieces, line_start = [], True
    for (piece,) in generator.stream_chat([conversation], sampling, fuse=fuse):
        if not pieces and not piece.strip():
            continue  # leading blank text (the chat template's newlines) is not shown
        pieces.append(piece)
        for part in piece.splitlines(keepends=True):
            write(("    " if line_start else "") + part)
            line_start = part.endswith("\n")
    write("\n" if pieces else "    (empty)\n")
    return "".join(pieces).strip()


def stream_side_by_side(generator, alone, fused, sampling, write, width: int = 100) -> tuple[str, str]:
    """`side_by_side`'s block for the last user turn of two conversations (receiver alone, receiver
    + C2C), each answer streamed as it decodes. Returns both answers."""
    write(f"> {alone[-1]['content']}\n\n  receiver alone:\n")
    alone_answer = stream_answer(generator, alone, sampling, fuse=False, write=write)
    write("\n  receiver + C2C:\n")
    fused_answer = stream_answer(generator, fused, sampling, fuse=True, write=write)
    write("-" * width + "\n")
    return alone_answer, fused_answer


def _stdout_write(text: str) -> None:
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(generator, sampling, read=input, write=print, *, stream: bool = False) -> None:
    """Two parallel conversations (receiver alone, receiver + C2C) fed the same user turns.

    stream: write each answer as it decodes (`write` then takes text pieces, no newline added)."""
    alone, fused = [], []
    write("Chat with the receiver alone and with C2C. An empty line or Ctrl-D quits; /reset starts over.")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            alone, fused = [], []
            continue
        alone.append({"role": "user", "content": line})
        fused.append({"role": "user", "content": line})
        if stream:
            a, f = stream_side_by_side(generator, alone, fused, sampling, write)
        else:
            (a,) = generator.chat([alone], sampling, fuse=False)
            (f,) = generator.chat([fused], sampling, fuse=True)
            write(side_by_side(line, a, f))
        alone.append({"role": "assistant", "content": a})
        fused.append({"role": "assistant", "content": f})


def main() -> None:
    from c2c_jax import cli

    cli.starting("generate")
    from absl import app, flags
    from ml_collections import config_flags

    from c2c_jax.config import use_inference_xla_flags

    use_inference_xla_flags()

    config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    prompt_flag = flags.DEFINE_multi_string("prompt", [], "A user message; repeat the flag for a batch.")
    chat_flag = flags.DEFINE_bool("chat", False, "Interactive multi-turn chat, both answers at every turn.")
    stream_flag = flags.DEFINE_bool("stream", True, "Print answers as they decode (--nostream: one batch, "
                                    "printed when done).")
    flags.mark_flags_as_required(["config"])

    def run():
        from c2c_jax import build, sharding
        from c2c_jax.infer.decode import SamplingConfig

        sharding.maybe_initialize_distributed()
        g = config_flag.value.generate
        if not g.fuser:
            raise app.UsageError("set --config.generate.fuser to a fuser directory (ours or the upstream layout)")
        if not prompt_flag.value and not chat_flag.value:
            raise app.UsageError("give --prompt=... (repeatable) or --chat")
        build.check_before_loading(config_flag.value, [(g.fuser, config_flag.value.sharer.path)])
        generator = build.load_generator(config_flag.value, g.fuser)
        sampling = SamplingConfig(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                                  top_p=g.top_p)
        if prompt_flag.value and stream_flag.value:
            for prompt in prompt_flag.value:
                conversation = [{"role": "user", "content": prompt}]
                stream_side_by_side(generator, conversation, conversation, sampling, _stdout_write)
        elif prompt_flag.value:
            print("\n".join(answer_prompts(generator, prompt_flag.value, sampling)))
        if chat_flag.value:
            if stream_flag.value:
                chat_loop(generator, sampling, write=_stdout_write, stream=True)
            else:
                chat_loop(generator, sampling)

    cli.run(run)


if __name__ == "__main__":
    main()
