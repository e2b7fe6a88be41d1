"""Tokenizer keywords and chat messages given to trace / invoke / generate reach the tokenizer
(issue 22, item 1): every check compares with what the model's own tokenizer makes of the same
input and keywords, on real offline models (SmolLM2, the tiny GPT-2, MiniLM's BERT tokenizer)."""

from __future__ import annotations

import pytest
import torch
from tests.models.seed_workflows import tiny_image
from tests.models.test_vlm import LONG, llava, processor  # noqa: F401 (fixtures)

from glassbox import LanguageModel, TransformersModel, VisionLanguageModel
from glassbox.offline import minilm_path, tiny_gpt2_path

TEXT = "The capital of France is"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def model_call(model, *args, **kwargs):
    """The ids, attention mask and logits the model ran on for one trace."""
    with model.trace(*args, **kwargs):
        call = model.inputs.save()
        logits = model.lm_head.output.save()
    return call[1]["input_ids"], call[1]["attention_mask"], logits


def test_truncation_gives_the_tokenizers_tokens(smollm2):
    expected = smollm2.tokenizer(TEXT, truncation=True, max_length=3)["input_ids"]
    ids, mask, logits = model_call(smollm2, TEXT, truncation=True, max_length=3)
    assert len(expected) == 3 and ids.tolist() == [expected] and mask.tolist() == [[1, 1, 1]]
    assert logits.shape == (1, 3, 49152)
    _, _, alone = model_call(smollm2, expected)
    assert torch.equal(logits, alone)


def test_max_length_alone_truncates_as_the_tokenizer_does(smollm2):
    expected = smollm2.tokenizer(TEXT, max_length=2)["input_ids"]
    ids, _, _ = model_call(smollm2, TEXT, max_length=2)
    assert ids.tolist() == [expected] and len(expected) == 2


def test_padding_to_max_length_left_pads_with_the_tokenizers_mask(smollm2):
    expected = smollm2.tokenizer("Paris is", padding="max_length", max_length=6)
    ids, mask, logits = model_call(smollm2, "Paris is", padding="max_length", max_length=6)
    assert ids.tolist() == [expected["input_ids"]] and mask.tolist() == [expected["attention_mask"]]
    assert logits.shape[1] == 6 and mask.tolist() == [[0, 0, 0, 0, 1, 1]]
    _, _, alone = model_call(smollm2, "Paris is")
    assert torch.allclose(logits[:, -2:], alone, atol=1e-4)  # padding is masked, positions kept


def test_pad_to_multiple_of(smollm2):
    expected = smollm2.tokenizer(TEXT, padding=True, pad_to_multiple_of=8)
    ids, mask, _ = model_call(smollm2, TEXT, padding=True, pad_to_multiple_of=8)
    assert ids.shape == (1, 8) and ids.tolist() == [expected["input_ids"]]
    assert mask.tolist() == [expected["attention_mask"]]


@pytest.mark.filterwarnings("ignore:Module .* has a submodule named")  # BERT's attention.output
def test_add_special_tokens_false_drops_them():
    bert = LanguageModel(minilm_path())  # a BERT tokenizer adds [CLS] ... [SEP]
    with bert.trace("hello world"):
        plain = bert.inputs.save()[1]["input_ids"]
    with bert.trace("hello world", add_special_tokens=False):
        bare = bert.inputs.save()[1]["input_ids"]
    assert plain.tolist() == [bert.tokenizer("hello world")["input_ids"]] and plain.shape[1] == 4
    assert bare.tolist() == [bert.tokenizer("hello world", add_special_tokens=False)["input_ids"]]
    assert bare.shape[1] == 2


def test_a_list_of_prompts_is_truncated_row_by_row(smollm2):
    prompts = ["The Eiffel Tower is in the city of", "Rome"]
    expected = smollm2.tokenizer(prompts, truncation=True, max_length=4)["input_ids"]
    ids, mask, _ = model_call(smollm2, prompts, truncation=True, max_length=4)
    assert ids.shape == (2, 4) and ids[0].tolist() == expected[0]
    assert ids[1, -len(expected[1]):].tolist() == expected[1] and mask[1].sum() == len(expected[1])


def test_an_invokes_keywords_are_its_own(smollm2):
    truncated = smollm2.tokenizer(TEXT, truncation=True, max_length=3)["input_ids"]
    with smollm2.trace() as tracer:
        with tracer.invoke(TEXT, truncation=True, max_length=3):
            short = smollm2.lm_head.output[:, -1].save()
        with tracer.invoke(TEXT):
            full = smollm2.lm_head.output[:, -1].save()
    _, _, short_alone = model_call(smollm2, truncated)
    _, _, full_alone = model_call(smollm2, TEXT)
    assert torch.allclose(short, short_alone[:, -1], atol=1e-4)
    assert torch.allclose(full, full_alone[:, -1], atol=1e-4)
    assert not torch.allclose(short, full, atol=1e-2)


def test_trace_keywords_without_an_input_reach_every_invoke(smollm2):
    """nnsight's ``model.trace(output_hidden_states=True)`` with invokes: arguments of each invoke."""
    with smollm2.trace(output_hidden_states=True, truncation=True, max_length=3) as tracer:
        with tracer.invoke(TEXT):
            states = smollm2.output.hidden_states.save()
        with tracer.invoke("Paris"):
            other = smollm2.output.hidden_states.save()
    with smollm2.trace(TEXT, output_hidden_states=True, truncation=True, max_length=3):
        alone = smollm2.output.hidden_states.save()
    assert len(states) == len(other) == len(alone) == len(smollm2.model.layers) + 1
    assert states[0].shape[1] == 3  # truncated as the trace's keywords say
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-3) for a, b in zip(states, alone))
    with smollm2.trace(truncation=True, max_length=3) as tracer:
        with tracer.invoke(TEXT, max_length=4):  # an invoke's own keywords win
            ids = smollm2.inputs[1]["input_ids"].save()
    assert ids.tolist() == [smollm2.tokenizer(TEXT)["input_ids"][:4]]


@pytest.mark.parametrize("form", ["list", "tensor", "encoding"])
def test_token_ids_are_truncated_and_padded_too(smollm2, form):
    ids = smollm2.tokenizer(TEXT)["input_ids"]
    given = {"list": ids, "tensor": torch.tensor([ids]), "encoding": smollm2.tokenizer(TEXT)}[form]
    cut, _, _ = model_call(smollm2, given, truncation=True, max_length=3)
    assert cut.tolist() == [ids[:3]]
    padded, mask, _ = model_call(smollm2, given, padding="max_length", max_length=7)
    assert padded.tolist() == [[smollm2.tokenizer.pad_token_id] * 2 + ids]
    assert mask.tolist() == [[0, 0] + [1] * 5]


def test_a_padded_encoding_keeps_its_width(smollm2):
    encoding = smollm2.tokenizer(TEXT, padding="max_length", max_length=8, return_tensors="pt")
    ids, mask, _ = model_call(smollm2, encoding)
    assert torch.equal(ids, encoding["input_ids"]) and torch.equal(mask, encoding["attention_mask"])


def test_return_flags_change_nothing(smollm2):
    _, _, plain = model_call(smollm2, TEXT)
    _, mask, flagged = model_call(smollm2, TEXT, return_tensors="pt", return_attention_mask=False,
                                  return_token_type_ids=False)
    assert torch.equal(plain, flagged) and mask.tolist() == [[1] * 5]


def test_forward_keywords_still_reach_forward(smollm2):
    with smollm2.trace(TEXT, truncation=True, max_length=3, output_hidden_states=True):
        out = smollm2.output.save()
    assert len(out.hidden_states) == 31 and out.hidden_states[0].shape == (1, 3, 576)


def test_options_that_cannot_apply_are_refused(smollm2):
    ids = smollm2.tokenizer(TEXT)["input_ids"]
    with pytest.raises(TypeError, match="token ids are used as they are"):
        model_call(smollm2, ids, stride=1)
    with pytest.raises(TypeError, match="add_special_tokens=True does not apply to token ids"):
        model_call(smollm2, ids, add_special_tokens=True)
    with pytest.raises(TypeError, match="apply to chat messages"):
        model_call(smollm2, TEXT, continue_final_message=True)
    with pytest.raises(ValueError, match="padding_side='right' is not supported"):
        model_call(smollm2, TEXT, padding_side="right")


def test_generate_tokenizes_the_prompt_with_its_keywords(smollm2):
    truncated = smollm2.tokenizer(TEXT, truncation=True, max_length=3, return_tensors="pt")["input_ids"]
    with smollm2.generate(TEXT, truncation=True, max_length=3, max_new_tokens=2, do_sample=False) as tracer:
        out = tracer.result.save()
    direct = smollm2._module.generate(truncated, attention_mask=torch.ones_like(truncated), max_new_tokens=2,
                                      do_sample=False, pad_token_id=smollm2.tokenizer.pad_token_id)
    assert out.shape == (1, 5) and torch.equal(out[:, :3], truncated) and torch.equal(out, direct)


def test_generate_invokes_take_keywords(smollm2):
    with smollm2.generate(max_new_tokens=1, do_sample=False) as tracer:
        with tracer.invoke(TEXT, truncation=True, max_length=3):
            pass
    assert tracer.result.shape == (1, 4)
    assert tracer.result[0, :3].tolist() == smollm2.tokenizer(TEXT)["input_ids"][:3]


def test_chat_messages_go_through_the_chat_template(smollm2):
    expected = smollm2.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)
    ids, mask, logits = model_call(smollm2, CHAT)
    assert ids.tolist() == [expected["input_ids"]] and mask.tolist() == [expected["attention_mask"]]
    # ends with the assistant: continued, as nnsight's text-generation pipeline does
    prefill = [*CHAT, {"role": "assistant", "content": "The capital"}]
    continued = smollm2.tokenizer.apply_chat_template(prefill, continue_final_message=True, return_dict=True)
    ids, _, _ = model_call(smollm2, prefill)
    assert ids.tolist() == [continued["input_ids"]]
    # a list of conversations: one row each, each as alone
    ids, mask, both = model_call(smollm2, [CHAT, prefill])
    assert ids.shape[0] == 2 and ids[0, -len(expected["input_ids"]):].tolist() == expected["input_ids"]
    assert torch.allclose(both[0, -1], logits[0, -1], atol=1e-4)


def test_chat_messages_take_tokenizer_keywords(smollm2):
    expected = smollm2.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, truncation=True,
                                                     max_length=4, return_dict=True)["input_ids"]
    ids, _, _ = model_call(smollm2, CHAT, truncation=True, max_length=4)
    assert ids.tolist() == [expected] and len(expected) == 4


def test_generate_from_chat_messages(smollm2):
    prompt = smollm2.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    with smollm2.generate(CHAT, max_new_tokens=3, do_sample=False) as tracer:
        out = tracer.result.save()
    assert out.shape == (1, len(prompt) + 3) and out[0, :len(prompt)].tolist() == prompt
    ids = torch.tensor([prompt])
    direct = smollm2._module.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                      do_sample=False, pad_token_id=smollm2.tokenizer.pad_token_id)
    assert torch.equal(out, direct) and smollm2.tokenizer.decode(out[0, len(prompt):]) == "The capital of"


def test_chat_without_a_template_says_how_to_set_one(gpt2_lm):
    assert gpt2_lm.tokenizer.chat_template is None
    with pytest.raises(ValueError, match=r"has no chat_template\. Set one.*chat_template ="):
        model_call(gpt2_lm, CHAT)
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    expected = gpt2_lm.tokenizer.apply_chat_template(CHAT, chat_template=template,
                                                     add_generation_prompt=True)["input_ids"]
    ids, _, _ = model_call(gpt2_lm, CHAT, chat_template=template)
    assert ids.tolist() == [expected]


def test_transformers_model_routes_them_too():
    model = TransformersModel(tiny_gpt2_path(), task="causal-lm")
    expected = model.tokenizer(TEXT, truncation=True, max_length=2)["input_ids"]
    ids, _, logits = model_call(model, TEXT, truncation=True, max_length=2)
    assert ids.tolist() == [expected] and logits.shape[1] == 2


def test_generate_from_ids_keeps_max_length_for_generation(smollm2):
    ids = torch.tensor([smollm2.tokenizer(TEXT)["input_ids"]])
    with smollm2.generate(ids, max_length=7, do_sample=False) as tracer:  # nnsight: ids are not cut
        out = tracer.result.save()
    direct = smollm2._module.generate(ids, attention_mask=torch.ones_like(ids), max_length=7, do_sample=False,
                                      pad_token_id=smollm2.tokenizer.pad_token_id)
    assert out.shape == (1, 7) and torch.equal(out, direct)


def test_a_processors_text_takes_them(request):
    module, processor_ = request.getfixturevalue("llava"), request.getfixturevalue("processor")
    model = VisionLanguageModel(module, processor=processor_)
    image = tiny_image(1)
    expected = processor_(text=LONG, images=[image], padding="max_length", max_length=20, return_tensors="pt")
    with model.trace(LONG, images=[image], padding="max_length", max_length=20):
        call = model.inputs.save()
    ids, mask = call[1]["input_ids"], call[1]["attention_mask"]
    assert ids.shape == expected["input_ids"].shape == (1, 20)  # the processor's padding, moved to the left
    assert torch.equal(ids[mask == 1], expected["input_ids"][expected["attention_mask"] == 1])
    assert mask.sum() == expected["attention_mask"].sum() < 20
    plain = processor_(text=LONG, images=[image], return_tensors="pt")
    total = plain["input_ids"].shape[1] + 2
    with model.generate(LONG, images=[image], max_length=total, do_sample=False) as tracer:
        out = tracer.result.save()
    direct = module.generate(**plain, max_length=total, do_sample=False,
                            pad_token_id=processor_.tokenizer.pad_token_id)
    assert out.shape == (1, total) and torch.equal(out, direct)
