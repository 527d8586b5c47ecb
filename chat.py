"""A conversation with an Instruct model in the terminal, and what the KV cache does across turns.

The model keeps, for every position it has read, the keys and values of each layer: the KV
cache. A conversation only ever grows at its end, so each turn needs to feed the model only
what is new. The earlier turns' keys and values are already in the cache, at the positions they
were computed at, and the model reads them from there. Turn N costs turn N's tokens, not the
whole conversation's. Here is the token layout of a two-turn Llama 3 conversation:

    positions  0..10  <|begin_of_text|> <|start_header_id|>system<|end_header_id|>\\n\\n Be brief.<|eot_id|>
              11..19  <|start_header_id|>user<|end_header_id|>\\n\\n Hi!<|eot_id|>
              20..23  <|start_header_id|>assistant<|end_header_id|>\\n\\n          turn 1 feeds 0..23 (one prefill)
              24..26  Hello there.                    the model writes these one by one; each is
                      <|eot_id|>                      fed back, except the stop token: written, not read
              27..    <|eot_id|> <|start_header_id|>user<|end_header_id|>\\n\\n Name a colour.<|eot_id|>
                      <|start_header_id|>assistant<|end_header_id|>\\n\\n          turn 2 feeds 27.. only

(Token counts are illustrative.) SmolLM2 writes the same thing in ChatML, <|im_start|>user\\n ...
<|im_end|>\\n: llama_models.ChatFormat knows both. When a conversation outgrows MAX_SEQ_LEN,
the oldest exchanges are dropped (never the system prompt), with a notice, and what remains is
fed again from position 0: the cache cannot shift positions, since they are part of every key.

Edit the globals below and run it, or override them with flags:
    python chat.py --model-dir ~/.llama/checkpoints/SmolLM2-135M-Instruct
    python chat.py --system "Answer in one sentence." --decoding sample --temperature 0.7
    printf 'Name a colour.\\nNow name a fruit of that colour.\\n' | python chat.py
In the chat, /help lists the commands; Ctrl-C stops a reply; Ctrl-D or /bye leaves.
"""

import json
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch.distributed as dist

import llama_models
from llama_models import cli, compiled, generation
from llama_models.report import Stats

# --- the conversation (the model, the device and the rest: llama_models/cli.py, or --help) ---
# A first message that sets the assistant's behaviour for the whole conversation; "" for none.
SYSTEM_PROMPT = ""
# The longest reply; a conversation always keeps room for one this long in the KV cache
# (--max-seq-len positions: a longer cache costs memory, 2 x layers x kv heads x head size x
# positions, but no time until it is used).
MAX_NEW_TOKENS = 512
# "greedy" or "sample" (temperature, top-k, top-p: llama_models.generation.sampling_distribution;
# beam search answers one prompt: run_inference.py). Reply n of a conversation draws with seed
# --seed + n: repeatable, yet not the same draws each turn.
DECODING = "greedy"

COMMANDS = """\
/help           this list
/system TEXT    a new system prompt, and a new conversation (/system alone shows the current one)
/reset          a new conversation, same system prompt
/stats          the last reply's speed, and how much of the context the conversation uses
/save FILE      the conversation as JSON: [{"role": ..., "content": ...}, ...]
/load FILE      continue a conversation saved with /save
/bye            leave (or Ctrl-D)
A message over several lines: a line starting with \"\"\" opens it, a line ending with \"\"\" closes it.
Ctrl-C stops a reply (what was written stays in the conversation)."""


class Turn(NamedTuple):
    """What to feed the model for a new user message."""
    tokens: list[int]  # the tokens to prefill, ending with the assistant's header
    start_pos: int  # where they go: the cache holds the conversation's tokens before it
    messages: list[dict]  # the conversation they continue (some dropped, if it overflowed) + the new message


class Conversation:
    """The messages so far, and the tokens the model has seen for them: the KV cache's contents."""

    def __init__(self, chat_format: llama_models.ChatFormat, system_prompt: str, max_seq_len: int,
                 max_new_tokens: int):
        self.chat_format, self.max_seq_len, self.max_new_tokens = chat_format, max_seq_len, max_new_tokens
        self.restart([{"role": "system", "content": system_prompt}] if system_prompt else [])

    def restart(self, messages: list[dict]) -> None:
        """A conversation of these messages, which the model has not read yet."""
        self.messages = messages
        self.tokens: list[int] = []  # position i of the conversation holds tokens[i]
        self.cached = 0  # positions 0 .. cached-1 are in the KV cache
        self.last_turn: Optional[Turn] = None

    def next_turn(self, text: str) -> Turn:
        """The tokens to feed for a new user message, dropping the oldest exchanges if need be.

        Raises ValueError if the message, with room for a reply, does not fit even alone.
        """
        message = {"role": "user", "content": text}
        room = self.max_seq_len - self.max_new_tokens  # for the conversation, the new message included
        if self.tokens:
            # Continue the cache: anything it lacks (after a cut reply, its last token), the end
            # of the last reply, the new message and the header the reply starts after.
            chat = self.chat_format
            new = (self.tokens[self.cached:] + chat.encode_end() + chat.encode_message(message)
                   + chat.encode_header("assistant"))
            if self.cached + len(new) <= room:
                return Turn(new, self.cached, self.messages + [message])
        # Start from position 0: a new conversation, a loaded one, or one that outgrew the cache.
        # Drop whole exchanges from the oldest, each starting at a user message, until it fits.
        system = self.messages[:1] if self.messages and self.messages[0]["role"] == "system" else []
        rest = self.messages[len(system):]
        for start in range(len(rest) + 1):
            if start < len(rest) and rest[start]["role"] != "user":
                continue
            messages = system + rest[start:] + [message]
            tokens = self.chat_format.encode_dialog_prompt(messages)
            if len(tokens) <= room:
                return Turn(tokens, 0, messages)
        raise ValueError(f"this message does not fit: with the system prompt it is {len(tokens)} tokens, and "
                         f"with room for a {self.max_new_tokens}-token reply that exceeds --max-seq-len "
                         f"{self.max_seq_len} (the conversation is unchanged)")

    def add(self, turn: Turn, reply: list[int], text: str, all_fed: bool) -> None:
        """Record a turn and its reply (tokens without the stop token, and their text).

        all_fed: whether the model read every reply token; a reply stopped by Ctrl-C may have been
        cut while its last token went in, so that one is fed again next turn.
        """
        self.messages = turn.messages + [{"role": "assistant", "content": text}]
        self.tokens = self.tokens[:turn.start_pos] + turn.tokens + reply
        self.cached = len(self.tokens) - (0 if all_fed else 1)
        self.last_turn = turn


def respond(model, tokenizer, conversation: Conversation, turn: Turn, sampling: dict, stats: Stats) -> None:
    """Feed the turn and stream the reply to stdout; record both in the conversation.

    sampling: {} for greedy, else generation.sample()'s temperature, top_k, top_p and seed.
    """
    # A turn from position 0 overwrites the cache: should it be cut short, the conversation's
    # own tokens are fed again from there.
    conversation.cached = min(conversation.cached, turn.start_pos)
    options = dict(max_new_tokens=conversation.max_new_tokens, stop_tokens=tokenizer.stop_tokens,
                   start_pos=turn.start_pos)
    if sampling:
        tokens = generation.sample(model, turn.tokens, **sampling, **options)
    else:
        tokens = generation.greedy(model, turn.tokens, **options)
    reply, text, cut = [], generation.TextStream(tokenizer), False  # reply: every token, kept on Ctrl-C
    try:
        for token in tokens:
            stats.step()
            reply.append(token)
            print(text.add(token), end="", flush=True)
        print(text.end(), end="")
    except KeyboardInterrupt:
        cut = True
        print(text.end() + (" [cut]" if reply else "[stopped before the reply began: the message is not kept]"),
              end="")
    print(flush=True)
    if not cut and (not reply or reply[-1] not in tokenizer.stop_tokens):
        print(f"[the reply reached --max-new-tokens {conversation.max_new_tokens} and stops there]", file=sys.stderr)
    print(flush=True)  # a blank line between turns
    content = [t for t in reply if t not in tokenizer.stop_tokens]
    if reply or not cut:
        conversation.add(turn, content, tokenizer.decode(content), all_fed=not cut)


def read_message(interactive: bool) -> Optional[str]:
    """The next message or command as typed (a line, or a block between \"\"\" lines); None at the end
    of input. Not stripped: a line that begins with a space is a message, even one like " /etc"."""

    def line(prompt):
        if interactive:
            return input(prompt)  # with readline imported: line editing and history
        text = sys.stdin.readline()
        if not text:
            raise EOFError
        return text.removesuffix("\n")

    try:
        text = line(">>> ")
    except EOFError:
        return None
    if text.startswith('"""'):
        lines = [text[3:]]
        try:
            while not (lines[-1].endswith('"""') and (len(lines) > 1 or len(text) >= 6)):
                lines.append(line("... "))
            lines[-1] = lines[-1][:-3]
        except EOFError:  # the input ended inside the block: so does the block
            pass
        text = "\n".join(lines)
    return text


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def shared_message(interactive: bool) -> Optional[str]:
    """read_message() on the first process, handed to all: under torchrun each process holds a
    slice of the model, and all must run the same steps, in step."""
    message = [read_message(interactive) if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(message, src=0)
    return message[0]


def run_command(line: str, conversation: Conversation, stats, device) -> bool:
    """Do a /command; False means leave."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name == "/bye":
        return False
    if name == "/help":
        print(COMMANDS, file=sys.stderr)
    elif name == "/system":
        if argument:
            conversation.restart([{"role": "system", "content": argument}])
            print("[new system prompt: a new conversation]", file=sys.stderr)
        else:
            system = [m["content"] for m in conversation.messages[:1] if m["role"] == "system"]
            print(f"[system prompt: {system[0]!r}]" if system else "[no system prompt]", file=sys.stderr)
    elif name == "/reset":
        conversation.restart([m for m in conversation.messages[:1] if m["role"] == "system"])
        print("[a new conversation]", file=sys.stderr)
    elif name == "/stats":
        turn = conversation.last_turn
        if stats and turn:
            print(stats.report(device), file=sys.stderr)
            print(f"the last message fed {len(turn.tokens)} new tokens at positions {turn.start_pos}.."
                  f"{turn.start_pos + len(turn.tokens) - 1}; the cache held the {turn.start_pos} before them",
                  file=sys.stderr)
        print(f"context: {len(conversation.tokens)} of {conversation.max_seq_len} positions used "
              f"({plural(len(conversation.messages), 'message')}; a reply needs room for "
              f"{conversation.max_new_tokens})",
              file=sys.stderr)
    elif name in ("/save", "/load") and not argument:
        print(f"[{name} needs a file name: {name} FILE]", file=sys.stderr)
    elif name == "/save":
        if dist.get_rank() == 0:  # one writer under torchrun
            try:
                Path(argument).write_text(json.dumps(conversation.messages, indent=2, ensure_ascii=False) + "\n")
            except OSError as e:
                print(f"[cannot save to {argument}: {e.strerror}]", file=sys.stderr)
                return True
        print(f"[saved {plural(len(conversation.messages), 'message')} to {argument}]", file=sys.stderr)
    elif name == "/load":
        try:
            messages = json.loads(Path(argument).read_text())
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ValueError("expected a JSON list of {\"role\": ..., \"content\": ...} messages")
            conversation.chat_format.encode_dialog_prompt(messages)  # raises for a bad role or content
        except (OSError, ValueError) as e:
            print(f"[cannot load {argument}: {getattr(e, 'strerror', None) or e}]", file=sys.stderr)
            return True
        conversation.restart([{"role": m["role"], "content": m["content"]} for m in messages])
        print(f"[loaded {plural(len(messages), 'message')} from {argument}; the next message feeds them to the model]",
              file=sys.stderr)
    else:
        print(f"[unknown command {name}: /help lists them; to send a message starting with /, "
              f"begin it with a space]", file=sys.stderr)
    return True


def parse_args(argv=None):
    parser = cli.ArgumentParser(__doc__)
    cli.add_flags(parser, "--model-dir", "--system", "--max-new-tokens", "--max-seq-len", "--device", "--dtype",
                  "--threads", "--quantize", "--max-memory", "--compile", system=SYSTEM_PROMPT,
                  max_new_tokens=MAX_NEW_TOKENS)
    parser.add_argument("--decoding", choices=["greedy", "sample"], default=DECODING, help="how to pick tokens")
    cli.add_flags(parser, "--temperature", "--top-k", "--top-p", "--seed")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with cli.user_errors():  # bad input or a missing checkpoint: one line and exit status 1
        if args.max_seq_len <= args.max_new_tokens:
            raise ValueError(f"--max-seq-len ({args.max_seq_len}) must exceed --max-new-tokens "
                             f"({args.max_new_tokens}): room for a message and a reply")
        device = cli.start(args.threads, args.device)
        args.model_dir = cli.checkpoint_dir(args.model_dir)
        start = time.perf_counter()
        model, tokenizer = llama_models.load(args.model_dir, device=device, dtype=args.dtype,
                                             max_seq_len=args.max_seq_len, quantize=args.quantize,
                                             max_memory=args.max_memory)
        load_s = time.perf_counter() - start
        chat_format = llama_models.ChatFormat(tokenizer)  # ValueError for a model without a chat format
        if args.compile:
            compiled.compile_decode_step(model, args.model_dir)

    llama_models.print_on_first_process_only()
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # Windows
            pass
    conversation = Conversation(chat_format, args.system, args.max_seq_len, args.max_new_tokens)
    dtype = str(model.dtype).removeprefix("torch.") + (f", {args.quantize}" if args.quantize else "")
    print(f"{args.model_dir.name} on {device}, {dtype}, context {args.max_seq_len} tokens, loaded in {load_s:.1f} s"
          f"{'; /help for commands, /bye or Ctrl-D to leave' if interactive else ''}", file=sys.stderr)
    if model.block_streamer:
        print(model.block_streamer, file=sys.stderr)
    sampling = (dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
                if args.decoding == "sample" else {})
    messages = converse(model, tokenizer, conversation, sampling, model.compiled_step is not None, load_s,
                        interactive)
    if not interactive and not messages:
        print("[standard input held no message: nothing to answer]", file=sys.stderr)


def converse(model, tokenizer, conversation: Conversation, sampling: dict, compiled: bool, load_s: float,
             interactive: bool) -> int:
    """Read a message, answer it, until /bye or the end of input; return how many messages came.

    sampling: {} for greedy, else generation.sample()'s arguments, the seed that of the first reply.
    """
    stats, messages, replies = None, 0, 0
    while True:
        try:
            line = shared_message(interactive)
        except KeyboardInterrupt:
            print("\n[Ctrl-C stops a reply; to leave: /bye or Ctrl-D]", file=sys.stderr)
            continue
        if line is None:
            return messages
        if line.startswith("/"):  # a command; " /..." is a message
            if not run_command(line, conversation, stats, model.device):
                return messages
            continue
        if not line.strip():
            continue
        messages += 1
        try:
            turn = conversation.next_turn(line.strip())
        except ValueError as e:
            print(f"[{e}]", file=sys.stderr)
            continue
        dropped = len(conversation.messages) + 1 - len(turn.messages)
        if dropped:
            used = turn.start_pos + len(turn.tokens)
            print(f"[the conversation outgrew --max-seq-len {conversation.max_seq_len}: dropped the {dropped} "
                  f"oldest messages (the system prompt stays); {used} positions used, "
                  f"{conversation.max_seq_len - used} left for the reply]", file=sys.stderr)
        stats = Stats(load_s, len(turn.tokens), compiled=compiled and not replies)
        # Reply n draws with seed + n: repeatable, yet not the same draws each turn.
        this_reply = dict(sampling, seed=sampling["seed"] + replies) if sampling else {}
        respond(model, tokenizer, conversation, turn, this_reply, stats)
        replies += 1


if __name__ == "__main__":
    cli.run(main)
