"""Vision-language models: a tiny Llava (CLIP vision tower + Llama) with a processor built offline."""

from __future__ import annotations

import pytest
import torch
from tests.models.seed_workflows import WORKFLOWS, Case, tiny_image
from transformers import (
    AutoTokenizer,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from glassbox import TransformersModel, VisionLanguageModel
from glassbox.offline import smollm2_path

LONG, SHORT = "<image> What is in this picture?", "<image> Hi"


@pytest.fixture(scope="module")
def processor():
    """SmolLM2's tokenizer plus an <image> token, and a CLIP image processor: 2x2 patches of 8 px."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.fixture(scope="module")
def llava(processor):
    torch.manual_seed(0)
    tokenizer = processor.tokenizer
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval()


def _inputs(text, seed):
    return (text,), {"images": [tiny_image(seed)]}


@pytest.fixture(scope="module", params=["language_model", "vision_tower"])
def case(request, llava, processor):
    model = VisionLanguageModel(llava, processor=processor)
    plain = dict(processor(text=LONG, images=[tiny_image(1)], return_tensors="pt"))
    if request.param == "vision_tower":
        return Case(model, llava, "model.vision_tower.encoder.layers.0", _inputs(LONG, 1), plain,
                    _inputs(SHORT, 2))
    return Case(model, llava, "model.language_model.layers.0", _inputs(LONG, 1), plain, _inputs(SHORT, 2),
                hidden_states=lambda out: out.hidden_states[1])


@pytest.mark.parametrize("check", WORKFLOWS, ids=lambda check: check.__name__)
def test_seed_workflows(case, check):
    check(case)


def test_generate_with_images_equals_hugging_face(llava, processor):
    model = VisionLanguageModel(llava, processor=processor)
    assert model.task == "image-text-to-text" and model.tokenizer is processor.tokenizer
    encoded = processor(text=SHORT, images=[tiny_image(2)], return_tensors="pt")
    expected = llava.generate(**encoded, max_new_tokens=3, do_sample=False)
    with model.generate(SHORT, images=[tiny_image(2)], max_new_tokens=3, do_sample=False) as tracer:
        image_features = model.model.multi_modal_projector.output.save()
        ids = tracer.result.save()
    assert torch.equal(ids, expected)
    assert image_features.shape == (1, 4, 32)                  # 2x2 patches, projected to the LM width
    assert torch.equal(model.generate(encoded, max_new_tokens=3, do_sample=False), expected)  # processed


def test_patch_image_features_between_invokes_and_steer_generation(llava, processor):
    model = TransformersModel(llava, processor=processor, task="image-text-to-text")
    with model.trace() as tracer:
        with tracer.invoke(SHORT, images=[tiny_image(1)]):
            first_image = model.model.multi_modal_projector.output.save()
        with tracer.invoke(SHORT, images=[tiny_image(2)]):
            model.model.multi_modal_projector.output[:] = first_image
            patched = model.output[:, -1].save()
    with model.trace(SHORT, images=[tiny_image(1)]):
        alone = model.output[:, -1].save()
    torch.testing.assert_close(patched, alone)                  # image 2 replaced by image 1's features

    def steer(module, inputs, output):
        output[:, -1] += 0.5

    with model.generate(SHORT, images=[tiny_image(1)], max_new_tokens=3, do_sample=False) as tracer:
        with tracer.all():
            model.model.language_model.layers[1].output[:, -1] += 0.5
    steered = tracer.result  # as nnsight: `with tracer.all():` ends the block; the result is kept
    handle = llava.model.language_model.layers[1].register_forward_hook(steer)
    try:
        encoded = processor(text=SHORT, images=[tiny_image(1)], return_tensors="pt")
        assert torch.equal(steered, llava.generate(**encoded, max_new_tokens=3, do_sample=False))
    finally:
        handle.remove()


def test_folder_loads_lazily_with_its_processor(tmp_path, llava, processor):
    llava.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = VisionLanguageModel(tmp_path)
    assert model._module.device.type == "meta" and model.processor is not None
    with model.trace(SHORT, images=[tiny_image(2)]):
        logits = model.output.logits.save()
    expected = llava(**processor(text=SHORT, images=[tiny_image(2)], return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected)
