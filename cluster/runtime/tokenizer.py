"""Tokenizers behind one small interface: Hugging Face's, and bytes for the tiny test models."""

from __future__ import annotations

from typing import Protocol, Sequence

from ..speculation import InvalidRequest


class Tokenizer(Protocol):
    eos_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, prompt: str) -> list[int]: ...

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """A chat ({"role", "content"} dicts) in the model's chat template, ready for the assistant's turn."""


class HFTokenizer:
    def __init__(self, tok):
        self._tok = tok
        self.eos_token_id = int(tok.eos_token_id)
        self.vocab_size = len(tok)
        self.has_chat_template = bool(getattr(tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def save(self, folder) -> None:
        """Writes the tokenizer's files into a Hugging Face folder."""
        self._tok.save_pretrained(folder)

    def encode_chat(self, prompt: str) -> list[int]:
        return self.encode_messages([{"role": "user", "content": prompt}])

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        if not self.has_chat_template:
            raise InvalidRequest("messages", "this model has no chat template: send a prompt instead")
        text = self._tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return self.encode(text)

    def vocab(self) -> dict[str, int]:
        return self._tok.get_vocab()


class ByteTokenizer:
    """UTF-8 bytes 0..255, then BOS 256 and EOS 257. For the tiny random models."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258
    has_chat_template = False

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def encode_chat(self, prompt: str) -> list[int]:
        return self.encode(prompt)

    def encode_messages(self, messages: Sequence[dict]) -> list[int]:
        """The tiny test models' template: "<|role|>\ncontent\n" per message, then "<|assistant|>\n"."""
        return self.encode("".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n")

    def vocab(self) -> dict[str, int]:
        return {f"<0x{i:02X}>": i for i in range(256)} | {"<bos>": 256, "<eos>": 257}
