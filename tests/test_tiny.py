"""make-tiny output reloads offline through the real `from_pretrained` paths.

pytest tests/test_tiny.py -x -q
"""

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    AutoTokenizer,
    Blip2ForConditionalGeneration,
    GPT2LMHeadModel,
    LlavaForConditionalGeneration,
)

from dalipipe.models.cavmae import AudioEncoderConfig, CavMaeAudioEncoder, load_cavmae_checkpoint
from dalipipe.models.tokenizer import build_tokenizer
from dalipipe.testing.checkpoints import main


def test_llava_processor_counts_image_tokens_right(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models.llava)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.llava)
    image = Image.fromarray(np.full((40, 50, 3), 128, dtype=np.uint8))
    inputs = processor(images=[image], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == (32 // 8) ** 2
    out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_llava_336_has_the_real_geometry(tiny_models):
    model = LlavaForConditionalGeneration.from_pretrained(tiny_models.llava_336)
    vision = model.config.vision_config
    assert (vision.image_size, vision.patch_size) == (336, 14)
    assert model.config.vision_feature_layer == -2


def test_blip2_captions_an_image(tiny_models):
    processor = AutoProcessor.from_pretrained(tiny_models.blip2)
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_models.blip2).eval()
    image = Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8))
    inputs = processor(images=[image, image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    texts = processor.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 2 and texts[0] == texts[1]


def test_gpt2_and_its_tokenizer_reload(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models.gpt2)
    model = GPT2LMHeadModel.from_pretrained(tiny_models.gpt2)
    ids = tok(["a dog barks"], return_tensors="pt")["input_ids"]
    assert tok.decode(ids[0]) == "a dog barks"
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_cavmae_file_loads_into_the_encoder(tiny_models):
    config = AudioEncoderConfig(**tiny_models.audio_encoder_settings())
    missing, unexpected = load_cavmae_checkpoint(CavMaeAudioEncoder(config), tiny_models.cavmae)
    assert sorted(missing) == ["proj.bias", "proj.weight"]
    assert sorted(unexpected) == ["modality_v", "norm_v.weight"]
    encoder = tiny_models.audio_encoder()
    assert encoder(torch.zeros(2, 64, 32)).shape == (2, 8, 32)


def test_tokenizer_round_trip_and_special_tokens():
    tok = build_tokenizer(["a red bell rings twice"], vocab_size=500)
    text = "USER: <image>\nWhat can you see? ASSISTANT: a red bell"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 1
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert "Ġbell" in tok.get_vocab()  # corpus words become single tokens


def test_make_tiny_command(tmp_path):
    assert main(["--out", str(tmp_path)]) == 0
    for name in ("llava", "llava-336", "blip2", "gpt2"):
        assert (tmp_path / name / "config.json").is_file()
    assert (tmp_path / "cavmae" / "cav-mae-tiny.pth").is_file()
