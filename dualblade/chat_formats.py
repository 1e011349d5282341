"""Chat formats dualblade adds to llama_cpp's registry.

"transcript": for base (pretrained, not instruction-tuned) models, which have no chat template and
never saw turn markers. A plain "User: / Assistant:" transcript is what such a model continues
sensibly (Gemma-3-270M answers "The capital of France is Paris." in it, and repeats the question
in Gemma's own turn format). A turn is one line: the reply ends at the end of its line, before the
model goes on to invent the next speaker ("User:", "You:", "Q:", ...).
"""
from __future__ import annotations

from llama_cpp import llama_chat_format as _lcf

TRANSCRIPT = "transcript"
_ROLES = {"user": "User", "assistant": "Assistant"}


@_lcf.register_chat_format(TRANSCRIPT)
def format_transcript(messages, **kwargs) -> _lcf.ChatFormatterResponse:
    system = "".join(m["content"] or "" for m in messages if m["role"] == "system")
    lines = [system.strip() + "\n\n"] if system.strip() else []
    for m in messages:
        role = _ROLES.get(m["role"])
        if role and m.get("content") is not None:
            lines.append(f"{role}: {m['content'].strip()}\n")
    lines.append("Assistant:")
    return _lcf.ChatFormatterResponse(prompt="".join(lines), stop=["\n"])
