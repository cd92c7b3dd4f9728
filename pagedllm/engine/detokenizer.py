"""Incremental detokenization and stop strings, one request at a time (the prefix/read offset technique of
vLLM and TGI).

Decoding one token alone is wrong for most tokenizers: SentencePiece drops the leading space of the first
token of a decode, and a multi-byte character may be split over several byte tokens. So each step decodes a
short window that starts at the tokens emitted last, and emits only what the new token adds to it:

    ids:   ... | already emitted ......... | emitted last step | new token(s) |
                                           ^ prefix_offset     ^ read_offset
    emit   decode(ids[prefix:]) minus decode(ids[prefix:read])

While the window's text ends in U+FFFD (an incomplete multi-byte character) nothing is emitted and the
offsets stay, so the window grows until the character completes. Emitted text therefore always ends on a
character boundary, which keeps the next window's start on one too.

A request whose text is read only once, at its end, with no stop string to look for (LLM.generate, a
non-streamed completion) defers all of this: its ids gather, and the end decodes them in one call (output
processing of a decode step of 256 demo-model rows on CPU: 3.3-4.1 -> 1.1-1.6 ms). Where that text is valid
(no U+FFFD) it is what the windows emit; otherwise the windows run over the ids then, so a request's text is the
same streamed or not.
"""
from pagedllm.engine.decode_after import CONTEXT_TOKENS
from pagedllm.engine.tokenizer import raw_decoder
from pagedllm.sampling_params import SamplingParams

_MAX_CHAR_TOKENS = 4   # a UTF-8 character spans at most 4 byte tokens
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 single_texts: dict[int, str] | None = None, deferred: bool = False):
        """single_texts: the text of one-token windows by id, shared by the requests of one tokenizer and
        skip_special_tokens setting (OutputProcessor's): after each emission the window is the last token alone,
        so half of the decodes per token become a dict lookup. deferred: decode once, when the text is first
        read (see above); only without stop strings, which must be looked for as tokens come."""
        self.tokenizer = tokenizer
        self._single_texts = {} if single_texts is None else single_texts
        self.output_text = ""  # full output text so far, after stop-string trimming
        self.enabled = params.detokenize
        self.skip_special_tokens = params.skip_special_tokens
        self.min_tokens = params.min_tokens
        self.stop = params.stop
        self.include_stop_str_in_output = params.include_stop_str_in_output
        # Held back from streaming so an excluded stop string is never streamed in part. When the stop string
        # is included anyway there is nothing to hide (vLLM behaves the same).
        hide_stop = self.stop and not self.include_stop_str_in_output
        self.stop_buffer_length = max(len(s) for s in self.stop) - 1 if hide_stop else 0
        self._num_streamed_chars = 0
        self._ids, self._read_offset = [], 0
        self._deferred = deferred and not self.stop
        self._pending: list[int] = []   # deferred ids not decoded yet
        self.tokens_to_stop: int | None = None   # see update()
        if not self.enabled:   # the tokenizer is not touched (skip_tokenizer_init: there is none)
            return
        self._vocab_size = len(tokenizer)
        # No clean-up: it rewrites spaces depending on what follows, so windows would not be prefix-stable.
        self._decode = raw_decoder(tokenizer, self.skip_special_tokens)
        # Only the decode window is kept, so prefix_offset is always 0: ids = window, read_offset splits it.
        self._ids = self._context_ids(prompt_token_ids)
        self._read_offset = len(self._ids)

    def _context_ids(self, prompt_token_ids: list[int]) -> list[int]:
        """The prompt's last few tokens, starting on a character boundary (a window opening mid-character
        would turn a byte-fallback run into U+FFFD as a whole). Skipped special tokens do not count, so a
        prompt ending in them still gives the first word its leading space."""
        tail = prompt_token_ids[-(CONTEXT_TOKENS + _MAX_CHAR_TOKENS + 2):]
        if self.skip_special_tokens:
            special = set(self.tokenizer.all_special_ids)
            tail = [t for t in tail if t not in special]
        start = max(len(tail) - CONTEXT_TOKENS, 0)
        limit = max(start - _MAX_CHAR_TOKENS, 0)
        while start > limit and self._decode(tail[start:]).startswith(_REPLACEMENT):
            start -= 1
        return tail[start:]

    def update(self, new_token_ids: list[int], num_output_tokens: int, stop_terminated: bool = False) -> str | None:
        """Append newly generated ids; returns the stop string that matched (and trims output_text), or None.
        num_output_tokens counts output tokens including these; a stop string must end in text of a token
        numbered > min_tokens (vLLM's: min_tokens tokens come before the one that stops, as for EOS).
        stop_terminated: the last id is the EOS / stop token id that ended the request; like vLLM, its text is
        left out unless include_stop_str_in_output. When a stop string matched,
        `tokens_to_stop` is how many of these ids the sequence keeps: up to the one whose text completed it
        (several ids come at once from speculative decoding; the ids after it were never output one by one)."""
        self.tokens_to_stop = None
        if not self.enabled or not new_token_ids:
            return None
        num_before = num_output_tokens - len(new_token_ids)
        if stop_terminated and not self.include_stop_str_in_output:
            new_token_ids = new_token_ids[:-1]
        if self._deferred:
            self._pending += new_token_ids
            return None
        pieces, ends = [], []   # each id's text, and where it ends in output_text
        end = check_from = len(self.output_text)
        for i, token_id in enumerate(new_token_ids):
            piece = self._decode_next(token_id)
            pieces.append(piece)
            end += len(piece)
            ends.append(end)
            if num_before + i + 1 <= self.min_tokens:
                check_from = end  # text of the first min_tokens tokens may not end a stop string
        self.output_text += "".join(pieces)
        match = self._check_stop_strings(check_from) if self.stop else None
        if match is None:
            return None
        stop, end = match
        self.tokens_to_stop = next(i + 1 for i, e in enumerate(ends) if e >= end)
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Full text (delta=False) or the text not yet returned (delta=True). Until finished, the last
        stop_buffer_length characters are held back: they may be the start of a stop string."""
        if self._pending:
            self._decode_pending()
        end = len(self.output_text) if finished else max(len(self.output_text) - self.stop_buffer_length, 0)
        if not delta:
            return self.output_text[:end]
        start, self._num_streamed_chars = self._num_streamed_chars, max(end, self._num_streamed_chars)
        return self.output_text[start:end]

    def _decode_pending(self):
        ids, self._pending = [t for t in self._pending if 0 <= t < self._vocab_size], []
        if self._deferred:   # nothing decoded yet: deferral ends at the first read
            self._deferred = False   # later ids (none for a finished request) go through the windows
            prefix = self._decode(self._ids)
            text = self._decode(self._ids + ids)
            if text.startswith(prefix) and _REPLACEMENT not in text:
                self.output_text = text[len(prefix):]
                self._ids += ids
                self._read_offset = len(self._ids)
                return
        # Invalid bytes (the windows may group them into U+FFFD otherwise than one decode does) or a decode that
        # is not prefix-stable: the windows, token by token, as a streamed request's
        self.output_text += "".join(self._decode_next(t) for t in ids)

    def _decode_next(self, token_id: int) -> str:
        if 0 <= token_id < self._vocab_size:  # ids past the tokenizer (padded model vocab) decode to ""
            self._ids.append(token_id)
        prefix_text = (self._single_text(self._ids[0]) if self._read_offset == 1
                       else self._decode(self._ids[:self._read_offset]))
        new_text = self._decode(self._ids)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""  # nothing new yet (skipped special token) or an incomplete character: wait
        # The next window starts at the tokens emitted now; older ids are never decoded again.
        del self._ids[:self._read_offset]
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]

    def _single_text(self, token_id: int) -> str:
        text = self._single_texts.get(token_id)
        if text is None:
            text = self._single_texts[token_id] = self._decode([token_id])
        return text

    def _check_stop_strings(self, check_from: int) -> tuple[str, int] | None:
        """Search only text after check_from, plus len(stop) - 1 chars before it for a stop string that
        straddles the boundary. Of several matches the one that ends first wins: it would have been found
        first had the tokens come one at a time. Returns it and where it ended in the untrimmed text."""
        best = None  # (end, start, stop)
        for stop in self.stop:
            start = self.output_text.find(stop, max(check_from - len(stop) + 1, 0))
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        self.output_text = self.output_text[:end if self.include_stop_str_in_output else start]
        return stop, end
