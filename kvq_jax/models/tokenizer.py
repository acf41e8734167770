"""Tokenizers for the Llama-family models: rebuilt from GGUF metadata, or a Hugging Face tokenizer.json.

A GGUF file of a byte-level BPE model ("tokenizer.ggml.model" == "gpt2") stores the
vocabulary, the merges and the token types; `tokenizers` rebuilds the same BPE, with
the pre-tokenizer named by "tokenizer.ggml.pre" (SmolLM2: "smollm" = every digit
alone, then the GPT-2 regex, byte-level, no prefix space).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import warnings

import gguf
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

_CONTROL, _USER_DEFINED = int(gguf.TokenType.CONTROL), int(gguf.TokenType.USER_DEFINED)

_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2 = {"default", "gpt2", "mpt", "olmo", "jais"}


def _pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    regex = {"llama-bpe": _LLAMA3_REGEX, "llama3": _LLAMA3_REGEX, "qwen2": _QWEN2_REGEX}.get(pre)
    if regex is not None:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre not in _GPT2:
        warnings.warn(f"unknown GGUF pre-tokenizer {pre!r}: using the GPT-2 regex", stacklevel=3)
    return byte_level


def _default_system_prompt(template: str | None) -> str | None:
    match = re.search(r"<\|im_start\|>system\n(.+?)<\|im_end\|>", template or "", re.DOTALL)
    return match.group(1) if match else None


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids and chat format a generate loop needs.

    Attributes:
      hf: the underlying `tokenizers.Tokenizer`.
      bos_id, eos_id: beginning/end-of-sequence ids (None if the model has none).
      add_bos: whether `encode` prepends bos_id (GGUF "tokenizer.ggml.add_bos_token";
        a tokenizer.json adds it through its own post-processor instead).
      chat_template: the model's Jinja chat template text, or None; only its ChatML
        form is implemented (`apply_chat_template`).
    """

    def __init__(self, hf: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        self.hf, self.bos_id, self.eos_id = hf, bos_id, eos_id
        self.add_bos, self.chat_template = add_bos, chat_template

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> token ids. Special tokens written in the text (e.g. "<|im_start|>") map to their ids.

        Args:
          add_special_tokens: prepend bos when the model asks for it (SmolLM2 does not).
        """
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Token ids (any int sequence or 1-D array) -> text."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (byte-level form, e.g. "Ġthe"), or None."""
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary entry of an id (byte-level form), or None."""
        return self.hf.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Format a conversation in ChatML, as SmolLM2-Instruct (and Qwen2) expect.

        Each message {"role": ..., "content": ...} becomes "<|im_start|>{role}\\n{content}<|im_end|>\\n".
        When the first message is not a system message and the model's template has a
        default system prompt (SmolLM2: "You are a helpful AI assistant named SmolLM,
        trained by Hugging Face"), that system message is put first.

        Args:
          messages: the conversation, oldest first.
          add_generation_prompt: end with "<|im_start|>assistant\\n" for the model to answer.
        Returns:
          the prompt text; pass it to `encode`.
        """
        if self.chat_template is not None and "<|im_start|>" not in self.chat_template:
            raise NotImplementedError("only ChatML chat templates are implemented")
        parts = []
        system = _default_system_prompt(self.chat_template)
        if messages and messages[0]["role"] != "system" and system is not None:
            parts.append(f"<|im_start|>system\n{system}<|im_end|>\n")
        parts += [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)


def tokenizer_from_gguf_metadata(meta: dict) -> Tokenizer:
    """Rebuild a byte-level BPE tokenizer from GGUF metadata (`gguf_loader.gguf_metadata`).

    Uses tokenizer.ggml.{model, pre, tokens, token_type, merges, bos_token_id,
    eos_token_id, add_bos_token} and tokenizer.chat_template. CONTROL tokens become
    special added tokens, USER_DEFINED ones plain added tokens.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2'); "
                                  "load the model's Hugging Face tokenizer.json instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _CONTROL])
    hf.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
    return Tokenizer(hf, bos_id=meta.get("tokenizer.ggml.bos_token_id"),
                     eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"))


def _token_id(hf: tokenizers.Tokenizer, token) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    return hf.token_to_id(token) if isinstance(token, str) else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a .gguf file, or of a Hugging Face directory holding tokenizer.json.

    For a directory, bos/eos ids come from config.json, else from tokenizer_config.json,
    and the chat template from tokenizer_config.json.
    """
    path = pathlib.Path(path)
    if path.is_file():
        from kvq_jax.models.gguf_loader import gguf_metadata

        return tokenizer_from_gguf_metadata(gguf_metadata(gguf.GGUFReader(path)))
    hf = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    read = lambda name: json.loads((path / name).read_text()) if (path / name).is_file() else {}  # noqa: E731
    config, tok_config = read("config.json"), read("tokenizer_config.json")
    bos = config.get("bos_token_id", _token_id(hf, tok_config.get("bos_token")))
    eos = config.get("eos_token_id", _token_id(hf, tok_config.get("eos_token")))
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    template = tok_config.get("chat_template")
    return Tokenizer(hf, bos_id=bos, eos_id=eos, add_bos=False,
                     chat_template=template if isinstance(template, str) else None)
