"""The conversation templates and prompts LLaVA-class captioners are asked with.

    TEMPLATES["llava_v1"].format(prompt=PROMPTS["code"])

Shared by the captioner (dalipipe/models/captioner.py) and the caption filter's LLaVA
(dalipipe/data/filter.py), so the data stages need nothing from the models package.
"""

IMAGE_SLOT = "<image>"  # where the image (or audio) tokens go

_SYSTEM = (
    "A chat between a curious {who} and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the {who}'s questions. "
)
# The authors train with vicuna_v1 and caption with llava_v1 (upstream LLaVA's mismatch).
TEMPLATES = {
    "vicuna_v1": _SYSTEM.format(who="user") + "USER: <image>\n{prompt} ASSISTANT:",
    "llava_v1": _SYSTEM.format(who="human") + "USER: <image>\n{prompt} ASSISTANT:",
    "plain": "USER: <image>\n{prompt} ASSISTANT:",
}
# the authors' code's prompt and the paper's
PROMPTS = {
    "code": "Describe the sound that can be heard in this scene.",
    "paper": "What sound can be heard in this scene ?",
}
