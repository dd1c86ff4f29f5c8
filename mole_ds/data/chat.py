"""The one prompt builder: training, generation and evaluation render conversations through these functions.

Messages are LLaVA-style ``[{"from": "human"|"gpt", "value": str}, ...]`` ("user"/"assistant" are accepted as
aliases), alternating and starting with a human turn.  Two formats (``chat_format``):

* ``vicuna_v1``: LLaVA-1.5's training format (``conv_vicuna_v1``)::

      {SYSTEM} USER: {q1} ASSISTANT: {a1}{eos}USER: {q2} ASSISTANT: {a2}{eos}

  ``{eos}`` is the tokenizer's eos token text (``</s>`` for Llama/Vicuna tokenizers, and when there is no
  tokenizer).  A generation prompt ends with ``ASSISTANT:`` (no trailing space): the reply starts with a space.
* ``template``: the tokenizer's own ``chat_template`` (roles user/assistant) through ``apply_chat_template``.

What is supervised (:func:`render_training`): each assistant reply from where the generation prompt ends up to
and including its end-of-turn marker, i.e. exactly what the model must generate after the prompt that
:func:`build_prompt` gives at that point:

* ``vicuna_v1``: ``" {a}{eos}"``.
* ``template``: for assistant turn k, P = render(messages[:k], add_generation_prompt=True) and
  Q = render(messages[:k + 1]); the span runs from len(P) through the first special token (end-of-turn, e.g.
  ``<|im_end|>``, ``<|eot_id|>``, ``</s>``) after the reply's text in Q, or to the end of Q without its
  trailing white space when the template writes none (llava-hf's llava-1.5 template: the model then learns
  no end-of-turn token; ``vicuna_v1`` is LLaVA-1.5's own training format, with ``</s>``). Templates that
  iterate typed content parts get typed content when string content fails or loses words.  P must be a prefix of Q and Q of the whole text (true for the usual templates); a template
  that re-renders earlier turns differently is refused with a message (use ``vicuna_v1`` then).

``"<image>"`` is replaced by ``image_expansion`` (the processor's N image tokens) in the rendered text, before
spans are measured.  Tokenize the returned text with :func:`tokenize_prompt` (training does the same): the
tokenizer's leading special tokens (bos) are put in front only when the text does not already start with the
bos (templates that write ``{{ bos_token }}`` themselves), so the bos is never doubled; trailing specials that
some tokenizers append (eos) are not added.
"""

from __future__ import annotations

CHAT_FORMATS = ("vicuna_v1", "template")

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER, ASSISTANT = "USER", "ASSISTANT"
SEP = " "
DEFAULT_EOS = "</s>"
IMAGE_PLACEHOLDER = "<image>"
_ROLES = {"human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"}


class ChatTemplateError(ValueError):
    """The tokenizer's chat_template cannot be used (missing, failing, or not incremental); names the tokenizer."""


def tokenizer_name(tokenizer) -> str:
    """A readable name for messages: the checkpoint path or the class name."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    return f"{type(tokenizer).__name__}({name!r})" if name else type(tokenizer).__name__


def chat_tokenizer(processor):
    """The tokenizer that renders a model's conversations: ``processor.tokenizer`` (or the tokenizer itself),
    carrying the processor's chat_template when only the processor has one (llava-hf checkpoints ship the
    template as the processor's ``chat_template.json``, beside a tokenizer without it)."""
    tok = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None)
    if tok is not processor and template and not getattr(tok, "chat_template", None):
        tok.chat_template = template
    return tok


def check_chat_format(chat_format: str) -> None:
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format ({chat_format!r}) must be one of {CHAT_FORMATS}")


def _roles(messages: list[dict]) -> list[tuple[str, str]]:
    """[(role 'user'|'assistant', text)], checked: alternating, starting with a user turn."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages ({messages!r}) must be a non-empty list of {{'from', 'value'}} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("value"), str) or m.get("from") not in _ROLES:
            raise ValueError(f"messages[{i}] ({m!r}) must be {{'from': 'human'|'gpt', 'value': str}}")
        role = _ROLES[m["from"]]
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise ValueError(f"messages[{i}] has role {m['from']!r}: turns must alternate human, gpt, ... "
                             "starting with human")
        out.append((role, m["value"]))
    return out


def _expand(text: str, image_expansion: str | None) -> str:
    return text.replace(IMAGE_PLACEHOLDER, image_expansion) if image_expansion is not None else text


def eos_text(tokenizer) -> str:
    """The end-of-turn text of vicuna_v1: the tokenizer's eos token, else '</s>'."""
    eos = getattr(tokenizer, "eos_token", None) if tokenizer is not None else None
    return eos if isinstance(eos, str) and eos else DEFAULT_EOS


# --- vicuna_v1 ---------------------------------------------------------------------------------------------


def _vicuna_pieces(turns, eos: str, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """(text, supervised) pieces whose concatenation is the prompt."""
    pieces: list[tuple[str, bool]] = []
    prompt = SYSTEM_PROMPT + SEP
    for i, (role, text) in enumerate(turns):
        if role == "user":
            last = i == len(turns) - 1
            prompt += f"{USER}: {text}" + ("" if last and not add_generation_prompt else f"{SEP}{ASSISTANT}:")
        else:
            pieces.append((prompt, False))
            pieces.append((f" {text}{eos}", True))
            prompt = ""
    if prompt:
        pieces.append((prompt, False))
    return pieces


# --- template ----------------------------------------------------------------------------------------------


def _typed(text: str) -> list[dict]:
    """String content as a typed content list (templates such as llava-hf's iterate over content parts)."""
    parts: list[dict] = []
    for j, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if j:
            parts.append({"type": "image"})
            chunk = chunk[1:] if chunk.startswith("\n") else chunk  # such templates write "<image>\n" themselves
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def _lost_turn(rendered: str, turns) -> int | None:
    """The first turn whose words a rendering lost (a text chunk, image placeholders aside, that does not
    appear in order), or None. Templates that iterate typed content render plain string content as nothing,
    without an error: llava-hf's llava-1.5 template gives "USER: ASSISTANT: " for any conversation."""
    pos = 0
    for k, (_, text) in enumerate(turns):
        for chunk in text.split(IMAGE_PLACEHOLDER):
            chunk = chunk.strip()
            if not chunk:
                continue
            at = rendered.find(chunk, pos)
            if at < 0:
                return k
            pos = at + len(chunk)
    return None


def _apply_template(tokenizer, turns, add_generation_prompt: bool) -> str:
    """Render ``turns`` with the tokenizer's chat_template: string content first; typed content (a list of
    {"type": "text"|"image"} parts) when the template fails on strings or silently drops their words."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"chat_format 'template': tokenizer {tokenizer_name(tokenizer)} has no chat_template; "
                                "use chat_format 'vicuna_v1' or give the tokenizer a chat_template")
    if not turns:  # the empty conversation (nothing before the first reply is rendered here)
        return ""

    def render(content) -> str:
        conv = [{"role": r, "content": content(t)} for r, t in turns]
        return tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)

    try:
        text = render(lambda t: t)
        first: Exception | None = None
        lost = _lost_turn(text, turns)
        if lost is None:
            return text
    except Exception as e:  # noqa: BLE001 - retry with typed content, then report the first error
        first, lost = e, None
    try:
        typed = render(_typed)
    except Exception as e:  # noqa: BLE001
        raise ChatTemplateError(f"chat_template of tokenizer {tokenizer_name(tokenizer)} failed on this "
                                f"conversation: {type(first or e).__name__}: {first or e}") from (first or e)
    lost_typed = _lost_turn(typed, turns)
    if lost_typed is not None:
        k = lost_typed if lost is None else lost
        raise ChatTemplateError(f"chat_template of tokenizer {tokenizer_name(tokenizer)} drops the words of turn {k} "
                                f"({turns[k][1][:40]!r}...) with string and with typed content; use chat_format "
                                "'vicuna_v1'")
    return typed


def special_token_texts(tokenizer) -> list[str]:
    """Texts of the tokenizer's special tokens (bos/eos/pad/unk, extra specials, added tokens marked special)."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            out.add(str(t.content))
    return sorted((t for t in out if t), key=len, reverse=True)


def _template_spans(tokenizer, turns, image_expansion) -> tuple[str, list[tuple[int, int]]]:
    render = lambda ts, gen: _expand(_apply_template(tokenizer, ts, gen), image_expansion)  # noqa: E731
    full = render(turns, False)
    specials = special_token_texts(tokenizer)
    spans = []
    for k, (role, text) in enumerate(turns):
        if role != "assistant":
            continue
        p, q = render(turns[:k], True), render(turns[: k + 1], False)
        if not (q.startswith(p) and full.startswith(q)):
            raise ChatTemplateError(
                f"chat_template of tokenizer {tokenizer_name(tokenizer)} does not render conversations incrementally "
                f"(the text up to assistant turn {k} is not a prefix of the whole conversation), so the assistant's "
                "characters cannot be told apart; use chat_format 'vicuna_v1'")
        body = _expand(text, image_expansion).strip()
        c = q.find(body, len(p)) if body else len(p)
        if c < 0:
            raise ChatTemplateError(f"chat_template of tokenizer {tokenizer_name(tokenizer)} does not reproduce the "
                                    f"text of assistant turn {k} ({body[:40]!r}...)")
        # No end-of-turn special: the span ends with the reply's text (a trailing separator such as llava-hf's
        # ' ' belongs to the next turn, whose first token would otherwise be supervised through it).
        end = max(c + len(body), len(q.rstrip()))
        hits = [(q.find(s, c + len(body)), s) for s in specials]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if hits:
            pos, s = min(hits, key=lambda h: (h[0], -len(h[1])))
            end = pos + len(s)
        spans.append((len(p), end))
    return full, spans


# --- public API --------------------------------------------------------------------------------------------


def build_prompt(messages: list[dict], chat_format: str, tokenizer, *, image_expansion: str | None = None,
                 add_generation_prompt: bool = True) -> str:
    """The prompt text for generation (or any rendering) of `messages` in `chat_format`.

    For generation the last message is a human turn and the returned text ends where the assistant's reply
    starts (``... ASSISTANT:`` for vicuna_v1, the template's assistant header for 'template').  With
    add_generation_prompt=False the messages are rendered as they are.  "<image>" is replaced by
    image_expansion when given.  Tokenize the result with :func:`tokenize_prompt`.
    """
    check_chat_format(chat_format)
    turns = _roles(messages)
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError("build_prompt(add_generation_prompt=True): the last message must be a human turn "
                         f"(got {messages[-1].get('from')!r})")
    if chat_format == "vicuna_v1":
        return _expand("".join(t for t, _ in _vicuna_pieces(turns, eos_text(tokenizer), add_generation_prompt)),
                       image_expansion)
    return _expand(_apply_template(tokenizer, turns, add_generation_prompt), image_expansion)


def render_training(messages: list[dict], chat_format: str, tokenizer, *,
                    image_expansion: str | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(full text, character spans [start, end) of the supervised parts: assistant replies + end-of-turn).

    Spans are sorted and disjoint.  A trailing human turn without a reply is not rendered (nothing to learn).
    """
    check_chat_format(chat_format)
    turns = _roles(messages)
    if turns[-1][0] == "user":
        turns = turns[:-1]
    if not turns:
        raise ValueError("render_training: the conversation has no assistant reply")
    if chat_format == "template":
        return _template_spans(tokenizer, turns, image_expansion)
    text, spans = "", []
    for piece, supervised in _vicuna_pieces(turns, eos_text(tokenizer), False):
        piece = _expand(piece, image_expansion)
        if supervised:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def starts_with_bos(text: str, tokenizer) -> bool:
    """True when the rendered text already begins with the tokenizer's bos (templates that write it)."""
    bos = getattr(tokenizer, "bos_token", None)
    return isinstance(bos, str) and bool(bos) and text.startswith(bos)


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """(leading, trailing) special ids the tokenizer adds around a text, e.g. ([bos], []) for Llama."""
    with_sp = list(tokenizer("x", add_special_tokens=True)["input_ids"])
    core = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(core) + 1):
        if with_sp[i : i + len(core)] == core:
            return with_sp[:i], with_sp[i + len(core) :]
    return [], []


def leading_specials(text: str, tokenizer, affixes: tuple[list[int], list[int]] | None = None) -> list[int]:
    """The special ids to put in front of `text`: the tokenizer's leading ones (bos), none if the text has the bos.

    Trailing specials (an eos some tokenizers append) are never added: a prompt must not end with eos, and a
    training text already ends with its end-of-turn marker.
    """
    if starts_with_bos(text, tokenizer):
        return []
    return list((affixes or special_affixes(tokenizer))[0])


def tokenize_prompt(text: str, tokenizer) -> list[int]:
    """Token ids of a rendered prompt, as training tokenizes it: leading specials (see above) + the text."""
    return leading_specials(text, tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
