"""Llama 3's tokenizer: byte-level BPE over a base64 vocabulary file, run by tiktoken.

Other byte-level BPE vocabularies (e.g. SmolLM2's, converted by tools/convert_gguf.py) load too,
described by a tokenizer_config.json beside tokenizer.model."""

import base64
import binascii
import json
import re
from pathlib import Path
from typing import AbstractSet, Collection, Iterator, Literal, Sequence, Union

import tiktoken

# How Llama 3 cuts text into pieces before BPE merges bytes inside each piece: contractions,
# words with one leading non-letter, numbers of up to 3 digits, punctuation runs, newlines, spaces.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>", "<|image|>",
]
LLAMA3_NUM_SPECIAL_TOKENS = 256  # the named ones, then <|reserved_special_token_2|> ... up to 256

# The keys of tokenizer_config.json, the sidecar a vocabulary other than Llama 3's needs (written
# by tools/convert_gguf.py): pattern (the split regex), special_tokens ({text: id}; control tokens,
# never produced from plain text), bos_token, eos_token, stop_tokens (texts), chat_format
# ("llama3", "chatml" or null) and default_system_prompt (a string or null).
CONFIG_KEYS = ("pattern", "special_tokens", "bos_token", "eos_token", "stop_tokens", "chat_format",
               "default_system_prompt")

# Meta's reference cuts the text before handing it to tiktoken: every 400,000 characters (longer
# inputs made tiktoken panic), then wherever a run of whitespace or of non-whitespace reaches
# 25,000 characters (tiktoken issue 195: BPE time quadratic in the length of one piece, and a run
# without whitespace is one piece). The tiktoken we pin encodes such runs in linear time on its
# own (measured: docs/benchmarks.md#tokenizing-long-runs), but a cut changes the ids next to it,
# so we cut at exactly Meta's places: the ids are the same as Meta's on any input.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
_RUNS = re.compile(r"\s+|\S+")


def _chunks(s: str) -> Iterator[str]:
    for i in range(0, len(s), MAX_ENCODE_CHARS):
        part, start = s[i:i + MAX_ENCODE_CHARS], 0
        for run in _RUNS.finditer(part):
            for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield part[start:cut]
                start = cut
        yield part[start:]


def _llama3_config(n_base: int) -> dict:
    """What a tokenizer.model without a tokenizer_config.json means: Llama 3's vocabulary, whose
    256 special tokens follow the base tokens and are not listed in the file."""
    names = LLAMA3_NAMED_SPECIAL_TOKENS + [
        f"<|reserved_special_token_{i}|>"
        for i in range(2, 2 + LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
    ]
    return {
        "pattern": LLAMA3_PATTERN,
        "special_tokens": {name: n_base + i for i, name in enumerate(names)},
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        # Generation stops at any of these: end of text, end of message (tool call), end of turn.
        "stop_tokens": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        "chat_format": "llama3",
        "default_system_prompt": None,
    }


def read_vocabulary(path: Path) -> dict[bytes, int]:
    """tokenizer.model's `base64(token bytes) rank` lines as {token bytes: rank}.

    What tiktoken's load_tiktoken_bpe reads too, but that function also keeps a copy of every file
    it reads in a cache under /tmp keyed by the file's *path*: a tokenizer.model replaced at the
    same path would silently be read as the old one. An unreadable line is reported by number.
    """
    ranks = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(f"{path}, line {number}: not a `base64-token rank` pair; "
                                 f"is this a BPE vocabulary (Llama 3's tokenizer.model)?") from None
    return ranks


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    missing = [key for key in CONFIG_KEYS if not isinstance(config, dict) or key not in config]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    named = [config["bos_token"], config["eos_token"], *config["stop_tokens"]]
    unknown = [name for name in named if name not in config["special_tokens"]]
    if unknown:
        raise ValueError(f"{path}: {', '.join(unknown)} not among its special_tokens")
    return config


class Tokenizer:
    def __init__(self, model_path: Union[str, Path]):
        """Load a tokenizer.model: one `base64(token bytes) rank` pair per line.

        A tokenizer_config.json beside it describes a vocabulary other than Llama 3's (see
        CONFIG_KEYS); without one, the file is Llama 3's.

        Args:
            model_path: path to tokenizer.model (Llama 3's, or one written by our tools).
        """
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {model_path}")
        ranks = read_vocabulary(model_path)
        config_path = model_path.with_name("tokenizer_config.json")
        config = _read_config(config_path) if config_path.is_file() else _llama3_config(len(ranks))

        self.special_tokens = config["special_tokens"]
        self.model = tiktoken.Encoding(
            name=model_path.name, pat_str=config["pattern"], mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.n_words = self.model.n_vocab
        self.bos_id = self.special_tokens[config["bos_token"]]
        self.eos_id = self.special_tokens[config["eos_token"]]
        self.stop_tokens = [self.special_tokens[name] for name in config["stop_tokens"]]
        self.chat_format = config["chat_format"]  # "llama3", "chatml", or None (no chat template)
        self.default_system_prompt = config["default_system_prompt"]  # used when a chat has none
        # Bytes without a token of their own. tiktoken cannot encode them (it panics), while
        # Hugging Face's BPE drops them. Llama 3 has all 256; SmolLM2 lacks 21: six ASCII
        # control characters (e.g. \x04) and bytes that only unassigned or invalid code points use.
        self._missing_bytes = frozenset(b for b in range(256) if bytes([b]) not in ranks)

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Union[Literal["all"], AbstractSet[str]] = frozenset(),
        disallowed_special: Union[Literal["all"], Collection[str]] = (),
    ) -> list[int]:
        """Encode text to token ids.

        Args:
            s: the text.
            bos, eos: add the begin-of-text / end-of-text id.
            allowed_special: special-token texts that become control tokens. By default none:
                "<|eot_id|>" typed by a user is encoded as plain text, so user input cannot
                forge the structure of a chat.
            disallowed_special: special-token texts that raise an error instead; default none.
        Returns:
            the token ids.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() takes a str, got {type(s).__name__}")
        if self._missing_bytes:
            s = self._drop_missing_bytes(s)
        tokens = [self.bos_id] if bos else []
        for chunk in _chunks(s):
            tokens.extend(self.model.encode(chunk, allowed_special=allowed_special,
                                            disallowed_special=disallowed_special))
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def _drop_missing_bytes(self, s: str) -> str:
        def spellable(text):  # surrogatepass: tiktoken itself deals with lone surrogates
            return self._missing_bytes.isdisjoint(text.encode("utf-8", "surrogatepass"))
        return s if spellable(s) else "".join(c for c in s if spellable(c))

    def decode(self, tokens: Sequence[int]) -> str:
        """Token ids to text; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self.model.decode(list(tokens))

    def decode_bytes(self, tokens: Sequence[int]) -> bytes:
        """Token ids to raw bytes: what a streaming printer needs, since one character (an emoji,
        a CJK ideograph) can be split across tokens."""
        return self.model.decode_bytes(list(tokens))
