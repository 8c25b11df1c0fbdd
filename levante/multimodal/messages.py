"""Images and audio in OpenAI-style chat messages: take them out, leave `{"type": "image"}` or
`{"type": "audio"}` for the template.

Content parts understood: `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` (or `"image_url": "..."`),
`{"type": "image", "image": <PIL.Image | url | path>}` and, for models that take audio,
`{"type": "input_audio", "input_audio": {"data": base64, "format": "wav" | "mp3"}}` (decoded by
multimodal/audio.py into an `AudioClip`, in the same list as the images). Chat templates of vision models
(Qwen-VL, Gemma 3) render an `image` part as the model's placeholder; for a template that
cannot (plain text only), `flatten` writes the placeholder text inline instead; for a text
model, `join_text_parts` turns content that is text parts only into one string.
"""
from __future__ import annotations

from collections.abc import Callable

from levante.errors import InvalidRequest


def _source(part: dict):
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not url:
            raise InvalidRequest("image_url content part: 'url' is required")
        return url
    if kind == "image" or (kind is None and "image" in part):
        if part.get("image") is None:
            raise InvalidRequest("image content part: 'image' is required")
        return part["image"]
    return None


def has_images(messages: list[dict]) -> bool:
    """Whether any message has an image or audio content part (without loading it)."""
    return any(isinstance(part, dict) and (part.get("type") in ("image_url", "image", "input_audio")
                                           or (part.get("type") is None and ("image_url" in part or "image" in part
                                                                             or "input_audio" in part)))
               for message in messages if isinstance(message.get("content"), list) for part in message["content"])


def to_image(source, load: Callable | None = None):
    """A PIL image as is; a URL or path through `load` (default: multimodal/images.py's `load_image`)."""
    if not isinstance(source, (str, bytes)):
        return source
    if load is None:
        from levante.multimodal.images import load_image as load
    return load(source)


def is_audio_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") == "input_audio"
                                       or (part.get("type") is None and "input_audio" in part))


def extract_images(messages: list[dict], load: Callable | None = None,
                   audio: bool = False) -> tuple[list[dict], list]:
    """(messages with each image part replaced by {"type": "image"} and each audio part by
    {"type": "audio"}, the images and `AudioClip`s in order).

    `load(url_or_path) -> PIL.Image` turns URLs and paths into images (default:
    multimodal/images.py's `load_image`); PIL images pass through. `audio`: whether the model
    takes audio parts (else they are refused, naming the part).
    """
    images, out = [], []
    for m, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        parts = []
        for p, part in enumerate(content):
            if is_audio_part(part):
                where = f"messages[{m}].content[{p}]"
                if not audio:
                    raise InvalidRequest(f"{where}: this model does not take audio (input_audio content parts)")
                from levante.multimodal.audio import input_audio_clip

                images.append(input_audio_clip(part.get("input_audio"), where))
                parts.append({"type": "audio"})
                continue
            source = _source(part) if isinstance(part, dict) else None
            if source is None:
                parts.append(part)
                continue
            images.append(to_image(source, load))
            parts.append({"type": "image"})
        out.append({**message, "content": parts})
    return out, images


def text_of(content) -> str:
    """The text of a message's content: a string as it is, text parts joined by newlines (images
    and other parts left out), anything else empty."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part.get("text") or "" for part in content if isinstance(part, dict))
    return ""


def flatten(messages: list[dict], placeholder: str, audio_placeholder: str = "") -> list[dict]:
    """Content part lists joined into one string, each image written as `placeholder` (audio as
    `audio_placeholder`)."""
    marks = {"image": placeholder, "audio": audio_placeholder}
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = "".join(marks[p["type"]] if isinstance(p, dict) and p.get("type") in marks
                           else (p.get("text") or "") if isinstance(p, dict) else str(p) for p in content)
            message = {**message, "content": text}
        out.append(message)
    return out


def join_text_parts(messages: list[dict]) -> list[dict]:
    """Content given as text parts only (`[{"type": "text", "text": ...}, ...]`, as many OpenAI
    clients send it) joined into one string; other content is left to the template."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text"), str) for part in content):
            message = {**message, "content": "".join(part["text"] for part in content)}
        out.append(message)
    return out
