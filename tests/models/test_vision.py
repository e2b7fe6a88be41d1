"""Vision models through TransformersModel: ViT (image classification) and CLIP (both towers)."""

from __future__ import annotations

import pytest
import torch
from tests.models.seed_workflows import WORKFLOWS, Case, tiny_image
from transformers import (
    AutoModelForImageClassification,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
)

from glassbox import TransformersModel
from glassbox.offline import gpt2_tokenizer_path

EOS = 50256
# CLIP's tokenizer ends every text with its end-of-text token (CLIP pools there); so do these
CAT, DOG = "a photo of a cat<|endoftext|>", "dog<|endoftext|>"
TOWER = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def _vit():
    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_labels=3, **TOWER)
    return ViTForImageClassification(config).eval(), ViTImageProcessorPil(size={"height": 32, "width": 32})


def _clip():
    torch.manual_seed(0)
    text = dict(vocab_size=EOS + 1, max_position_embeddings=32, eos_token_id=EOS, bos_token_id=EOS,
                pad_token_id=EOS, **TOWER)
    config = CLIPConfig(text_config=text, vision_config=dict(image_size=32, patch_size=8, **TOWER),
                        projection_dim=8)
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer_path())
    processor = CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    return CLIPModel(config).eval(), processor


def _vit_case(as_tensor):
    module, images = _vit()
    model = TransformersModel(module, image_processor=images)
    pixels = [images(tiny_image(seed), return_tensors="pt")["pixel_values"] for seed in (1, 2)]
    inputs = [pixels[0]] if as_tensor else [tiny_image(1)]
    other = [pixels[1]] if as_tensor else [tiny_image(2)]
    return Case(model, module, "vit.layers.0", (tuple(inputs), {}), {"pixel_values": pixels[0]},
                (tuple(other), {}), hidden_states=lambda out: out.hidden_states[1])


def _clip_case(tower):
    module, processor = _clip()
    model = TransformersModel(module, processor=processor)
    cat, dog = dict(text=[CAT], images=[tiny_image(1)]), dict(text=[DOG], images=[tiny_image(2)])
    plain = dict(processor(return_tensors="pt", padding=True, **cat))
    if tower == "text":
        return Case(model, module, "text_model.encoder.layers.1", ((), cat), plain, ((), dog), side="right",
                    hidden_states=lambda out: out.text_model_output.hidden_states[2],
                    output=lambda out: out.text_embeds)
    return Case(model, module, "vision_model.encoder.layers.0", ((), cat), plain, ((), dog), side="right",
                hidden_states=lambda out: out.vision_model_output.hidden_states[1],
                output=lambda out: out.image_embeds)


CASES = {
    "vit-images": lambda: _vit_case(as_tensor=False),
    "vit-pixel-tensor": lambda: _vit_case(as_tensor=True),
    "clip-vision-tower": lambda: _clip_case("vision"),
    "clip-text-tower": lambda: _clip_case("text"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return CASES[request.param]()


@pytest.mark.parametrize("check", WORKFLOWS, ids=lambda check: check.__name__)
def test_seed_workflows(case, check):
    check(case)


def test_vit_folder_loads_lazily_with_its_image_processor(tmp_path):
    module, images = _vit()
    module.save_pretrained(tmp_path)
    images.save_pretrained(tmp_path)
    model = TransformersModel(tmp_path)
    assert model.task == "image-classification" and model._module.device.type == "meta"
    assert model.tokenizer is None and model.image_processor is not None
    with model.trace() as tracer:
        with tracer.invoke([tiny_image(1), tiny_image(2)]):   # two images, one invoke
            cls_tokens = model.vit.layers[1].output[:, 0].save()
            logits = model.output.save()
    plain = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    expected = plain(**images([tiny_image(1), tiny_image(2)], return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(logits.logits, expected.logits)
    torch.testing.assert_close(cls_tokens, expected.hidden_states[2][:, 0])


def test_clip_patch_one_image_into_another_invoke():
    module, processor = _clip()
    model = TransformersModel(module, processor=processor)
    assert model.task == "zero-shot-image-classification"
    with model.trace() as tracer:
        with tracer.invoke(text=[CAT], images=[tiny_image(1)]):
            cat_patches = model.vision_model.encoder.layers[0].output.save()
        with tracer.invoke(text=[CAT], images=[tiny_image(2)]):
            model.vision_model.encoder.layers[0].output[:] = cat_patches
            patched = model.output.image_embeds.save()
        with tracer.invoke():
            both = model.output.image_embeds.save()
    torch.testing.assert_close(patched, both[:1])            # the second image now looks like the first
    with model.trace(text=[CAT, DOG], images=[tiny_image(1)]):  # one invoke: any text and image counts
        per_text = model.output.logits_per_image.save()
    assert per_text.shape == (1, 2)
    with pytest.raises(ValueError, match="one image per prompt"):
        with model.trace() as tracer:
            with tracer.invoke(text=[CAT, DOG], images=[tiny_image(1)]):
                pass
            with tracer.invoke(text=[CAT], images=[tiny_image(2)]):
                pass
