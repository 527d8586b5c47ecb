"""How a conversation becomes tokens for an Instruct model."""

from .tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class ChatFormat:
    """Llama 3's chat template:

        <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>
        <|start_header_id|>assistant<|end_header_id|>\\n\\n      <- the model writes from here

    (without the line breaks shown). The model answers, then emits <|eot_id|>, a stop token.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
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
        tokens = self.encode_header(role)
        tokens += self.tokenizer.encode(content, bos=False, eos=False)
        return tokens + [self.tokenizer.special_tokens["<|eot_id|>"]]

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, ending where the assistant's reply starts.

        Args:
            messages: [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...]
        Returns:
            the prompt's token ids, starting with <|begin_of_text|>.
        """
        tokens = [self.tokenizer.bos_id]
        for message in messages:
            tokens += self.encode_message(message)
        return tokens + self.encode_header("assistant")
