"""An answer's text as its tokens arrive, without decoding the whole answer again at every token
(quadratic in its length, and the tokenizer's Python wrapper costs more than the decoding).

The incremental form is vLLM's and TGI's: keep a few tokens of context before the tokens not
yet read, decode that window with and without them, and the difference is the new text, taken
only once it does not end in an incomplete character (U+FFFD). A window keeps the decoders that
treat the first token of a decode specially (SentencePiece's leading space) right. Tokenizers
whose decode cleans up spaces afterwards (WordPiece-era `clean_up_tokenization_spaces`), or
that have no Rust backend, decode the whole answer every time, as `tokenizer.decode` does."""


class Detokenizer:
    """What one tokenizer's answers decode with (skipping special tokens, as answers are shown)."""

    def __init__(self, tokenizer):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.incremental = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        if self.incremental:
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    def answer(self) -> "AnswerText":
        return AnswerText(self)


class AnswerText:
    """One answer's tokens and the text they decode to, as `tokenizer.decode` gives it for all
    the tokens at once: `add` returns it without an incomplete last character, `final` with it
    (U+FFFD)."""

    def __init__(self, detokenizer: Detokenizer):
        self._d = detokenizer
        self.tokens: list[int] = []
        self._done = ""  # the text of tokens[:_read]
        self._prefix = self._read = 0  # tokens[_prefix:_read] is the context; tokens[_read:] unread

    def add(self, token: int) -> str:
        """Append a token; returns the text so far, an incomplete last character held back."""
        self.tokens.append(token)
        if not self._d.incremental:
            return self._d.decode(self.tokens).rstrip("\ufffd")
        new = self._tail()
        if new and not new.endswith("\ufffd"):  # context only moves past tokens that gave text
            self._done += new
            self._prefix, self._read = self._read, len(self.tokens)
            return self._done
        return self._done + new.rstrip("\ufffd")

    def final(self) -> str:
        """The whole answer's text, an incomplete last character shown as U+FFFD."""
        if not self._d.incremental:
            return self._d.decode(self.tokens)
        return self._done + self._tail()

    def _tail(self) -> str:
        """The text of the unread tokens: the window decoded, minus its context's text."""
        if self._read == len(self.tokens):
            return ""
        context = self._d.decode(self.tokens[self._prefix:self._read])
        window = self._d.decode(self.tokens[self._prefix:])
        return window[len(context):]
