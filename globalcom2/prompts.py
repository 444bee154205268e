"""The Vicuna-v1 conversation format LLaVA-NeXT (vicuna) was trained and evaluated with.

LLaVA's ``conv_vicuna_v1`` (haotian-liu/LLaVA c121f043 ``llava/conversation.py`` L242-252, ``sep_style=TWO``,
``sep=" "``; rendered by ``get_prompt`` L54-63) turns one user turn into
``"<system> USER: <image>\\n<question> ASSISTANT:"``, with the system prompt "A chat between a curious
user and … the user's questions". The published LLaVA-NeXT numbers, and the GlobalCom² paper's, were
produced with it (every ``scripts/v1_5/eval/*.sh`` passes ``--conv-mode vicuna_v1``); lmms-eval's own
``llava`` model uses it too. ``conv_llava_v1`` (L325-335, the argparse default of ``model_vqa_loader.py``, ``model_vqa.py`` and
``model_vqa_mmbench.py``; ``model_vqa_science.py``'s is ``llava_v0``) differs only in
saying "human" for "user"; it is not what was evaluated. The harness builds the prompt itself instead of
relying on whatever chat template a checkpoint ships.
"""

from __future__ import annotations

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TOKEN = "<image>"

# The same format as a Jinja chat template, so `processor.apply_chat_template` agrees with
# `vicuna_v1_prompt` (tests check that they render identically).
VICUNA_V1_CHAT_TEMPLATE = (
    "{{ '" + VICUNA_V1_SYSTEM.replace("'", "\\'") + "' }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ ' USER: ' }}"
    "{% for part in parts %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ASSISTANT: ' }}"
    "{% for part in parts %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{{ '</s>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def vicuna_v1_prompt(question: str, num_images: int = 1) -> str:
    """One user turn with ``num_images`` images placed before the question, ready for generation."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    images = f"{IMAGE_TOKEN}\n" * num_images
    return f"{VICUNA_V1_SYSTEM} USER: {images}{question} ASSISTANT:"
