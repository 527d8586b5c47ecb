"""How a conversation becomes tokens for an Instruct model."""

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatFormat:
    """The chat template named by tokenizer.chat_format. Llama 3's ("llama3"):

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model writes from here

    (without the line breaks shown). The model answers, then emits <|eot_id|>, a stop token.
    ChatML ("chatml", e.g. SmolLM2), with no begin-of-text token:

        <|im_start|>system\\n{content}<|im_end|>\\n
        <|im_start|>user\\n{content}<|im_end|>\\n
        <|im_start|>assistant\\n                                  <- the model writes from here

    The model answers, then emits <|im_end|>, a stop token. When the conversation has no system
    message, the model's default system prompt (tokenizer.default_system_prompt) comes first,
    as in the model's own template.
    """

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.chat_format not in ("llama3", "chatml"):
            raise ValueError(f"this model has no chat format we know ({tokenizer.chat_format!r}); "
                             f"use plain completion")
        self.tokenizer = tokenizer
        self.chatml = tokenizer.chat_format == "chatml"

    def encode_header(self, role: str) -> list[int]:
        if self.chatml:
            start = self.tokenizer.special_tokens["<|im_start|>"]
            return [start] + self.tokenizer.encode(f"{role}\n", bos=False, eos=False)
        special = self.tokenizer.special_tokens
        tokens = [special["<|start_header_id|>"]]
        # Meta's name for the role of tool output is "ipython".
        tokens += self.tokenizer.encode("ipython" if role == "tool" else role, bos=False, eos=False)
        tokens.append(special["<|end_header_id|>"])
        return tokens + self.tokenizer.encode("\n\n", bos=False, eos=False)

    def encode_message(self, message: dict) -> list[int]:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message role must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"message content must be a str, got {type(content).__name__}")
        if self.chatml:
            # Role, newline and content in one piece of text, as the model's template renders
            # them: encoded apart, a content that starts with spaces would split differently.
            special = self.tokenizer.special_tokens
            tokens = [special["<|im_start|>"]]
            tokens += self.tokenizer.encode(f"{role}\n{content}", bos=False, eos=False)
            return tokens + self.encode_end()
        tokens = self.encode_header(role)
        tokens += self.tokenizer.encode(content, bos=False, eos=False)
        return tokens + self.encode_end()

    def encode_end(self) -> list[int]:
        """What closes a message: Llama 3's <|eot_id|>; ChatML's <|im_end|> and a newline. (A chat
        that keeps its KV cache feeds these after a reply: the model wrote the stop token but,
        stopping there, never read it.)"""
        if self.chatml:
            return [self.tokenizer.special_tokens["<|im_end|>"]] + self.tokenizer.encode("\n", bos=False, eos=False)
        return [self.tokenizer.special_tokens["<|eot_id|>"]]

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, ending where the assistant's reply starts.

        Args:
            messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]
        Returns:
            the prompt's token ids (Llama 3: starting with <|begin_of_text|>).
        """
        if self.chatml:
            tokens = []
            default_system = self.tokenizer.default_system_prompt
            if default_system and messages and messages[0].get("role") != "system":
                messages = [{"role": "system", "content": default_system}] + list(messages)
        else:
            tokens = [self.tokenizer.bos_id]
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")
