"""``rlfuse chat``: talk to a trained policy in the terminal.

The conversation is rendered with the tokenizer's chat template (what SFT and PPO trained
on) and answered by the engine's own sampler, the reply streamed token by token. Commands:

    /reset          forget the conversation (the system message stays)
    /system TEXT    set the system message (and start over); "/system" alone removes it
    /quit           leave (so do /exit, Ctrl-D and Ctrl-C)

When the history no longer fits the model's context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys

import torch

HELP = "commands: /reset, /system TEXT, /quit"


class TextStream:
    """Turns a growing list of token ids into newly printable text. Decoding the whole reply
    each time (not token by token) keeps multi-byte characters and merged tokens right; text
    ending in an incomplete UTF-8 sequence is held back until the next token completes it."""

    def __init__(self, tokenizer, write):
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class Chat:
    """One conversation with a backbone's ``policy`` adapter."""

    def __init__(self, backbone, *, temperature: float | None = 1.0, max_new_tokens: int = 256,
                 system: str | None = None, seed: int = 0, adapter: str = "policy"):
        self.bb, self.adapter = backbone, adapter
        self.temperature, self.max_new_tokens, self.seed = temperature, max_new_tokens, seed
        self.system = system
        self.history: list[dict] = []
        self.turn = 0  # the sampler's key: (seed, turn) makes a session reproducible

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def _prompt_ids(self) -> list[int]:
        from .data import encode_prompt

        limit = getattr(self.bb.base.config.get_text_config(), "max_position_embeddings", None)
        room = None if limit is None else limit - self.max_new_tokens
        if room is not None and room < 1:
            raise ValueError(f"--max-new-tokens {self.max_new_tokens} leaves no room for a prompt in the "
                             f"model's {limit} positions")
        while True:
            ids = encode_prompt(self.bb.tokenizer, self.messages())
            if room is None or len(ids) <= room or len(self.history) <= 1:
                break
            self.history = self.history[2:]  # drop the oldest user + assistant turn
        return ids if room is None else ids[-room:]  # one overlong message: keep its end

    @torch.no_grad()
    def reply(self, user: str, write=sys.stdout.write) -> str:
        """Answer ``user``, writing the reply as it is sampled; returns its text."""
        from .generate import completion_text
        from .sampler import sample

        self.history.append({"role": "user", "content": user})
        ids = torch.tensor([self._prompt_ids()], device=self.bb.device)
        eos = set(self.bb.eos_token_ids())
        stream = TextStream(self.bb.tokenizer, write)

        def on_token(rows, tokens):
            t = int(tokens[0])
            if t not in eos:
                stream.push(t)

        greedy = not self.temperature
        out = sample(self.bb, ids, torch.ones_like(ids), max_new_tokens=self.max_new_tokens,
                     temperature=self.temperature or 1.0, adapter=self.adapter, greedy=greedy,
                     row_keys=None if greedy else [(self.seed, self.turn)], on_token=on_token)
        self.turn += 1
        text, _ = completion_text(self.bb.tokenizer, out.tokens[0].tolist(), eos)
        self.history.append({"role": "assistant", "content": text})
        return text


def chat_loop(chat: Chat, input_fn=input, write=sys.stdout.write) -> int:
    """Read lines with ``input_fn`` until /quit or end of input; returns 0."""
    write(f"[rlfuse] chatting with {chat.adapter}; {HELP}\n")
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            chat.reset()
            write("[rlfuse] conversation cleared\n")
            continue
        if line == "/system" or line.startswith("/system "):
            chat.system = line[len("/system"):].strip() or None
            chat.reset()
            write(f"[rlfuse] system message {'set' if chat.system else 'removed'}; conversation cleared\n")
            continue
        if line.startswith("/"):
            write(f"[rlfuse] unknown command {line.split()[0]!r}; {HELP}\n")
            continue
        write("bot> ")
        chat.reply(line, write)
        write("\n")


def main(args) -> int:
    """The ``rlfuse chat`` verb (arguments parsed by engine/cli.py)."""
    from .trained import find_checkpoint, load_trained

    if args.temperature is not None and not args.temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    find_checkpoint(args.checkpoint)
    trained = load_trained(args.checkpoint, device=args.device, overrides=args.overrides)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()  # stream: show each piece as it arrives

    chat = Chat(trained.backbone, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                system=args.system, seed=args.seed)
    return chat_loop(chat, input, write)
