"""TransformersModel over Hugging Face text tasks: tiny models built from configs, offline."""

from __future__ import annotations

import pytest
import torch
from tests.models.seed_workflows import WORKFLOWS, Case
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertForTokenClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from glassbox import LanguageModel, TraceStateError, TransformersModel
from glassbox.models import tasks
from glassbox.offline import gpt2_tokenizer_path, tiny_gpt2_path
from glassbox.tracing import Body, run_together

LONG, SHORT = "Hello world, how are you", "Hi"
EOS = 50256


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gpt2_tokenizer_path())


def _bert(head, **extra):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=EOS + 1, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, pad_token_id=EOS, **extra)
    return head(config).eval()


def _t5():
    torch.manual_seed(0)
    config = T5Config(vocab_size=EOS + 1, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=EOS, eos_token_id=EOS)
    return T5ForConditionalGeneration(config).eval()


def _text_case(module, tokenizer, path, hidden_states=None, **plain):
    model = TransformersModel(module, tokenizer=tokenizer)
    return Case(model, module, path, ((LONG,), {}), {**tokenizer(LONG, return_tensors="pt"), **plain},
                ((SHORT,), {}), side="right", hidden_states=hidden_states)


CASES = {
    "masked-lm": lambda tok: _text_case(_bert(BertForMaskedLM), tok, "bert.encoder.layer.0",
                                        lambda out: out.hidden_states[1]),
    "sequence-classification": lambda tok: _text_case(
        _bert(BertForSequenceClassification, num_labels=3), tok, "bert.encoder.layer.1",
        lambda out: out.hidden_states[2]),
    "token-classification": lambda tok: _text_case(
        _bert(BertForTokenClassification, num_labels=4), tok, "bert.encoder.layer.0"),
    "seq2seq-encoder": lambda tok: _text_case(_t5(), tok, "encoder.block.0",
                                              lambda out: out.encoder_hidden_states[1],
                                              decoder_input_ids=torch.tensor([[0]])),
    "seq2seq-decoder": lambda tok: _text_case(_t5(), tok, "decoder.block.0",
                                              lambda out: out.decoder_hidden_states[1],
                                              decoder_input_ids=torch.tensor([[0]])),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tokenizer):
    return CASES[request.param](tokenizer)


@pytest.mark.parametrize("check", WORKFLOWS, ids=lambda check: check.__name__)
def test_seed_workflows(case, check):
    check(case)


def test_tasks_pick_the_auto_class_and_the_padding(tokenizer):
    assert tasks.canonical("text-generation") == "causal-lm" and tasks.canonical("fill-mask") == "masked-lm"
    assert tasks.automodel("seq2seq").__name__ == "AutoModelForSeq2SeqLM"
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        tasks.canonical("poetry")
    bert = TransformersModel(_bert(BertForTokenClassification), tokenizer=tokenizer)
    t5 = TransformersModel(_t5(), tokenizer=tokenizer)
    assert (bert.task, t5.task) == ("token-classification", "seq2seq")
    assert not tasks.pads_left(bert._module) and not tasks.pads_left(t5._module)


def test_folder_is_built_on_meta_with_the_task_read_off_the_checkpoint(tmp_path, tokenizer):
    _bert(BertForSequenceClassification, num_labels=3).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = TransformersModel(tmp_path)
    assert model.task == "sequence-classification" and model._module.device.type == "meta"
    assert type(model._module).__name__ == "BertForSequenceClassification"
    with model.trace() as tracer:
        with tracer.invoke(LONG):
            long_logits = model.output.logits.save()
        with tracer.invoke(SHORT):
            short_logits = model.output.save()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokens = model.tokenizer
    torch.testing.assert_close(long_logits, plain(**tokens(LONG, return_tensors="pt")).logits)
    assert torch.equal(short_logits[:, 0], short_logits.logits[:, 0])   # indexes like the logits
    torch.testing.assert_close(short_logits.logits, plain(**tokens(SHORT, return_tensors="pt")).logits)


def test_causal_lm_task_is_language_model():
    plain = LanguageModel(tiny_gpt2_path())
    by_task = TransformersModel(tiny_gpt2_path(), task="text-generation")
    assert TransformersModel(tiny_gpt2_path()).task == "causal-lm"
    results = []
    for model in (plain, by_task):
        with model.trace() as tracer:
            with tracer.invoke(LONG):
                long_logits = model.output.logits.save()
            with tracer.invoke(SHORT):
                short_logits = model.output.logits.save()   # left-padded: [:, -1] is its last token
        results.append((long_logits, short_logits))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_seq2seq_generate_equals_hugging_face_and_exposes_the_encoder(tokenizer):
    module = _t5()
    model = TransformersModel(module, tokenizer=tokenizer, task="seq2seq")
    with model.generate(LONG, max_new_tokens=3, do_sample=False) as tracer:
        encoded = model.encoder.output.last_hidden_state.save()
        for _ in tracer.iter[:]:
            model.decoder.block[1].output[0][:] *= 1.0   # reachable at every step
    ids = tracer.result  # the open loop ended the block; the result is kept
    inputs = tokenizer(LONG, return_tensors="pt")
    expected = module.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=EOS)
    assert torch.equal(ids, expected) and ids.shape == (1, 4)
    torch.testing.assert_close(encoded, module.encoder(**inputs).last_hidden_state)
    assert torch.equal(model.generate(LONG, max_new_tokens=3, do_sample=False), expected)


def test_token_type_ids_of_zeros_and_refusals(tokenizer):
    model = TransformersModel(_bert(BertForMaskedLM), tokenizer=tokenizer)
    long, short = (dict(tokenizer(text, return_tensors="pt")) for text in (LONG, SHORT))
    long["token_type_ids"] = torch.zeros_like(long["input_ids"])   # what BERT tokenizers add
    with model.trace() as tracer:
        with tracer.invoke(long):
            from_dict = model.bert.encoder.layer[0].output.save()
        with tracer.invoke(short):
            pass
    with model.trace(LONG):
        from_text = model.bert.encoder.layer[0].output.save()
    torch.testing.assert_close(from_dict, from_text)
    with pytest.raises(ValueError, match="same kinds of input"):
        with model.trace() as tracer:
            with tracer.invoke(LONG):
                pass
            with tracer.invoke(SHORT, token_type_ids=torch.ones(1, 1, dtype=torch.long)):
                pass
    with pytest.raises(TraceStateError, match="causal language models"):
        with model.trace(SHORT, remote="local"):
            pass
    empty = compile("pass", "<body>", "exec")
    bodies = [Body(empty, {}, model._prepare((text,), {}), text) for text in (LONG, SHORT)]
    with pytest.raises(TraceStateError, match="pads on the right"):   # cutting leading padding: wrong side
        run_together(model, bodies)
